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
#include <vector>

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

}  // namespace

// -> (out [S, d_out], pre [S, d_ff])
std::vector<at::Tensor> forward(const at::Tensor& x, std::vector<int64_t> counts, int64_t act,
                                const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                const at::Tensor& b2) {
  const int64_t S = x.size(0);
  auto pre = at::empty({S, w1.size(2)}, x.options());
  auto out = at::empty({S, w2.size(2)}, x.options());
  auto st = starts_of(counts);
  std::vector<int64_t> live;
  for (size_t e = 0; e < counts.size(); ++e) if (counts[e]) live.push_back(e);
  for_experts(live, [&](int64_t e) {
    auto xs = x.narrow(0, st[e], counts[e]);
    auto pe = pre.narrow(0, st[e], counts[e]);
    auto oe = out.narrow(0, st[e], counts[e]);
    at::addmm_out(pe, b1.select(0, e), xs, w1.select(0, e));
    at::addmm_out(oe, b2.select(0, e), act_fwd(pe, act), w2.select(0, e));
  });
  return {out, pre};
}

// -> (gx or undefined, gw1, gb1, gw2, gb2 or undefined)
std::vector<at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& pre,
                                 std::vector<int64_t> counts, int64_t act, const at::Tensor& w1,
                                 const at::Tensor& w2, bool need_x, bool need_w) {
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
  for_experts(live, [&](int64_t e) {
    auto gs = grad.narrow(0, st[e], counts[e]);
    auto xs = x.narrow(0, st[e], counts[e]);
    auto ps = pre.narrow(0, st[e], counts[e]);
    auto h = act_fwd(ps, act);  // recomputed: the forward's bits
    auto gpre = act_bwd(at::mm(gs, w2.select(0, e).t()), ps, h, act);
    if (need_w) {
      auto gw2e = gw2.select(0, e); at::mm_out(gw2e, h.t(), gs);
      auto gb2e = gb2.select(0, e); at::sum_out(gb2e, gs, {0});
      auto gw1e = gw1.select(0, e); at::mm_out(gw1e, xs.t(), gpre);
      auto gb1e = gb1.select(0, e); at::sum_out(gb1e, gpre, {0});
    }
    if (need_x) {
      auto gxe = gx.narrow(0, st[e], counts[e]);
      at::mm_out(gxe, gpre, w1.select(0, e).t());
    }
  });
  return {gx, gw1, gb1, gw2, gb2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "expert segments forward: (out, pre)");
  m.def("backward", &backward, "expert segments backward: (gx, gw1, gb1, gw2, gb2)");
}
