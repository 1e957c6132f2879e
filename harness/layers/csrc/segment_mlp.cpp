// The ``fused`` expert kernel (harness/layers/fused_experts.py): the per-expert loop of
// ``loop_recompute`` (harness/layers/segment_mlp.py) in C++, forward and backward each one call.
//
// Expert e runs on the e-th contiguous segment of the expert-sorted rows: the same ATen ops
// (addmm / mm / sum / gelu / gelu_backward ...) on the same operands in the same order as the
// Python kernel, so its results are the loop's bit for bit at one thread (tests/test_fused_experts.py).
// What it saves is the Python and autograd bookkeeping around ~8 small ops per expert and map.
// With more than one intra-op thread the experts run in parallel (at::parallel_for), each expert's
// GEMMs then on one thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

#include "combine.h"

namespace {

enum Act : int64_t { GELU = 0, RELU = 1, SILU = 2 };

at::Tensor act_fwd(const at::Tensor& pre, int64_t act) {
  switch (act) {
    case GELU: return at::gelu(pre);
    case RELU: return at::relu(pre);
    case SILU: return at::silu(pre);
  }
  TORCH_CHECK(false, "fused experts: unknown activation code ", act);
}

// what autograd's GeluBackward0 / ReluBackward0 / SiluBackward0 compute
at::Tensor act_bwd(const at::Tensor& grad, const at::Tensor& pre, const at::Tensor& out, int64_t act) {
  switch (act) {
    case GELU: return at::gelu_backward(grad, pre);
    case RELU: return at::threshold_backward(grad, out, 0);
    case SILU: return at::silu_backward(grad, pre);
  }
  TORCH_CHECK(false, "fused experts: unknown activation code ", act);
}

// whether an elementwise op over all [S, d_ff] rows gives the bits of the per-expert calls (see forward_impl):
// 64 floats is a whole number of ATen's SIMD chunks (2 vectors) up to AVX-512
bool whole_rows_ok(int64_t d_ff) { return d_ff % 64 == 0; }

std::vector<int64_t> starts_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> s(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) s[e + 1] = s[e] + counts[e];
  return s;
}

template <typename F>
void for_experts(const std::vector<int64_t>& live, F body) {
  if (at::get_num_threads() > 1 && live.size() > 1) {
    at::parallel_for(0, (int64_t)live.size(), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(live[i]);
    });
  } else {
    for (int64_t e : live) body(e);
  }
}


// x[token] row by row (a copy: index_select's bits)
at::Tensor gather_rows(const at::Tensor& x_in, const at::Tensor& token) {
  auto x = x_in.contiguous();
  const int64_t S = token.numel(), d = x.size(1);
  auto out = at::empty({S, d}, x.options());
  const float* __restrict__ src = x.data_ptr<float>();
  const int64_t* tk = token.data_ptr<int64_t>();
  float* __restrict__ dst = out.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) std::memcpy(dst + p * d, src + tk[p] * d, sizeof(float) * d);
  return out;
}

// zeros [T, d] with g's rows added at token in order: index_add_'s bits (IndexSelectBackward)
at::Tensor scatter_add_rows(const at::Tensor& g_in, const at::Tensor& token, int64_t T) {
  auto g = g_in.contiguous();
  const int64_t S = token.numel(), d = g.size(1);
  auto out = at::zeros({T, d}, g.options());
  const float* __restrict__ src = g.data_ptr<float>();
  const int64_t* tk = token.data_ptr<int64_t>();
  float* __restrict__ dst = out.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) {
    float* __restrict__ row = dst + tk[p] * d;
    const float* __restrict__ s = src + p * d;
    for (int64_t j = 0; j < d; ++j) row[j] = row[j] + s[j];
  }
  return out;
}

}  // namespace

// -> (out [S, d_out], pre [S, d_ff], h [S, d_ff] if keep_h)
std::vector<at::Tensor> forward_impl(const at::Tensor& x, std::vector<int64_t> counts, int64_t act,
                                     const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                     const at::Tensor& b2, bool keep_h) {
  const int64_t S = x.size(0);
  auto pre = at::empty({S, w1.size(2)}, x.options());
  auto out = at::empty({S, w2.size(2)}, x.options());
  at::Tensor hs;  // the activation output, returned where the caller keeps it for backward
  auto st = starts_of(counts);
  std::vector<int64_t> live;
  for (size_t e = 0; e < counts.size(); ++e) if (counts[e]) live.push_back(e);
  // The activation runs once over all S rows, between the two GEMM loops, where that gives the per-expert
  // calls' bits: one call over [S, d_ff] cost about half as much per element as E calls over the segments
  // at d_ff 128 (1 thread, model-level profile). ATen's elementwise kernels run SIMD chunks and a scalar
  // tail, whose bits can differ (SiLU's do); with d_ff a multiple of whole_rows_ok's 64 floats every segment
  // starts on a chunk boundary and has no tail, so the split changes nothing. Otherwise: per expert.
  const bool whole = whole_rows_ok(w1.size(2));
  at::Tensor h = whole ? at::Tensor() : at::empty_like(pre);
  for_experts(live, [&](int64_t e) {
    auto pe = pre.narrow(0, st[e], counts[e]);
    at::addmm_out(pe, b1.select(0, e), x.narrow(0, st[e], counts[e]), w1.select(0, e));
    if (!whole) h.narrow(0, st[e], counts[e]).copy_(act_fwd(pe, act));
  });
  if (whole) h = act_fwd(pre, act);
  for_experts(live, [&](int64_t e) {
    auto oe = out.narrow(0, st[e], counts[e]);
    at::addmm_out(oe, b2.select(0, e), h.narrow(0, st[e], counts[e]), w2.select(0, e));
  });
  if (keep_h) hs = h;
  return {out, pre, hs};
}

std::vector<at::Tensor> forward(const at::Tensor& x, std::vector<int64_t> counts, int64_t act,
                                const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                const at::Tensor& b2) {
  auto r = forward_impl(x, counts, act, w1, b1, w2, b2, false);
  return {r[0], r[1]};
}

// -> (gx or undefined, gw1, gb1, gw2, gb2 or undefined)
// h_saved: the activation output when the caller kept it (fused moe), else undefined (recomputed from pre)
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& pre,
                                      const at::Tensor& h_saved, std::vector<int64_t> counts, int64_t act,
                                      const at::Tensor& w1, const at::Tensor& w2, bool need_x, bool need_w) {
  auto grad = grad_in.contiguous();
  auto st = starts_of(counts);
  std::vector<int64_t> live;
  for (size_t e = 0; e < counts.size(); ++e) if (counts[e]) live.push_back(e);
  const bool all_live = live.size() == counts.size();
  auto mk = [&](const at::Tensor& like) { return all_live ? at::empty_like(like) : at::zeros_like(like); };
  at::Tensor gw1, gb1, gw2, gb2, gx;
  if (need_w) {
    gw1 = mk(w1); gb1 = mk(w1.select(1, 0)); gw2 = mk(w2); gb2 = mk(w2.select(1, 0));
  }
  if (need_x) gx = at::empty_like(x);
  auto gh = at::empty_like(pre);
  for_experts(live, [&](int64_t e) {
    auto ghe = gh.narrow(0, st[e], counts[e]);
    at::mm_out(ghe, grad.narrow(0, st[e], counts[e]), w2.select(0, e).t());
  });
  // the activation and its backward over all rows at once, or per expert: as the forward (whole_rows_ok)
  at::Tensor h = h_saved, gpre;
  if (whole_rows_ok(pre.size(1))) {
    if (!h.defined()) h = act_fwd(pre, act);  // recomputed: the same bits
    gpre = act_bwd(gh, pre, h, act);
  } else {
    if (!h.defined()) h = at::empty_like(pre);
    gpre = at::empty_like(pre);
    for (int64_t e : live) {
      auto ps = pre.narrow(0, st[e], counts[e]);
      auto he = h.narrow(0, st[e], counts[e]);
      if (!h_saved.defined()) he.copy_(act_fwd(ps, act));
      gpre.narrow(0, st[e], counts[e]).copy_(act_bwd(gh.narrow(0, st[e], counts[e]), ps, he, act));
    }
  }
  for_experts(live, [&](int64_t e) {
    auto gs = grad.narrow(0, st[e], counts[e]);
    auto gp = gpre.narrow(0, st[e], counts[e]);
    if (need_w) {
      auto gw2e = gw2.select(0, e); at::mm_out(gw2e, h.narrow(0, st[e], counts[e]).t(), gs);
      auto gb2e = gb2.select(0, e); at::sum_out(gb2e, gs, {0});
      auto gw1e = gw1.select(0, e); at::mm_out(gw1e, x.narrow(0, st[e], counts[e]).t(), gp);
      auto gb1e = gb1.select(0, e); at::sum_out(gb1e, gp, {0});
    }
    if (need_x) {
      auto gxe = gx.narrow(0, st[e], counts[e]);
      at::mm_out(gxe, gp, w1.select(0, e).t());
    }
  });
  return {gx, gw1, gb1, gw2, gb2};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& pre,
                                 std::vector<int64_t> counts, int64_t act, const at::Tensor& w1,
                                 const at::Tensor& w2, bool need_x, bool need_w) {
  return backward_impl(grad_in, x, pre, at::Tensor(), counts, act, w1, w2, need_x, need_w);
}


// The whole token-choice MoE FFN after the plan (harness/layers/fused_experts.py ``fused_moe``): gather the
// slots' token rows, the expert loop above, and the weighted combine, forward and backward each one call.
// The same ATen ops and float operations in the same order as the Python composite (index_select ->
// the loop -> out * w -> index_add_ into zeros; backward: IndexAddBackward's gather, MulBackward's two
// products and sum_to_size's at::sum, IndexBackward's 0 + g, IndexSelectBackward's index_add_ into
// zeros), so the bits are the ``loop`` kernel's with the Python steps at one thread (tests/test_fused_moe.py).
// -> (y [T, d], x_sorted [S, d], pre [S, d_ff], h [S, d_ff] the activation output, out [S, d])
std::vector<at::Tensor> moe_forward(const at::Tensor& x, const at::Tensor& token, const at::Tensor& order,
                                    const at::Tensor& w_slot_in, std::vector<int64_t> counts, int64_t act,
                                    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                    const at::Tensor& b2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_slot_in.scalar_type() == at::kFloat,
              "fused moe: float32 only (other dtypes take the Python path)");
  auto xs = gather_rows(x, token);
  auto r = forward_impl(xs, counts, act, w1, b1, w2, b2, true);
  auto out = r[0];
  auto y = harness_combine::weighted_scatter_add(out, w_slot_in.contiguous(), order, token, x.size(0));
  return {y, xs, r[1], r[2], out};
}

// -> (gx [T, d] or undefined, g_w [N] or undefined, gw1, gb1, gw2, gb2 or undefined)
std::vector<at::Tensor> moe_backward(const at::Tensor& gy_in, int64_t num_tokens, const at::Tensor& xs,
                                     const at::Tensor& token, const at::Tensor& order, const at::Tensor& w_slot_in,
                                     const at::Tensor& pre, const at::Tensor& h, const at::Tensor& out, std::vector<int64_t> counts, int64_t act,
                                     const at::Tensor& w1, const at::Tensor& w2, bool need_x, bool need_slot_w,
                                     bool need_w) {
  auto gy = gy_in.contiguous();
  auto w_slot = w_slot_in.contiguous();
  at::Tensor g_w;
  if (need_slot_w) g_w = harness_combine::grad_weights(gy, out, order, token, w_slot.numel());
  at::Tensor gx, gw1, gb1, gw2, gb2;
  if (need_x || need_w) {
    auto g_out = harness_combine::grad_outputs(gy, w_slot, order, token, out.size(0), out.size(1));
    auto r = backward_impl(g_out, xs, pre, h, counts, act, w1, w2, need_x, need_w);
    if (need_x) gx = scatter_add_rows(r[0], token, num_tokens);
    gw1 = r[1]; gb1 = r[2]; gw2 = r[3]; gb2 = r[4];
  }
  return {gx, g_w, gw1, gb1, gw2, gb2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "expert segments forward: (out, pre)");
  m.def("backward", &backward, "expert segments backward: (gx, gw1, gb1, gw2, gb2)");
  m.def("moe_forward", &moe_forward, "gather, expert segments, weighted combine: (y, pre, out)");
  m.def("moe_backward", &moe_backward, "(gx, g_slot_w, gw1, gb1, gw2, gb2)");
}
