// The MoE layer's permute plan and weighted combine in C++ (harness/layers/dispatch_combine.py).
//
// Why: at the default LM size (1,024 tokens, d 64, E 8, top-2) the Python permute (bincount, a stable
// argsort, arange/repeat, two index ops, the capacity mask) and combine (weight gather, multiply,
// index_add_, and their autograd nodes) were ~20 small ATen ops per layer forward+backward, each a few
// to a few tens of microseconds; here they are one call each way.
//
// Bits: the plan is integer (the same kept slots in the same order as the stable argsort), and the
// combine (combine.h, shared with the fused node in segment_mlp.cpp) does the same float operations in the
// same order as the Python composite, so outputs and gradients equal it bit for bit
// (tests/test_dispatch_combine.py). Built with -ffp-contract=off so the compiler never fuses a multiply and
// an add into one rounding.
#include <torch/extension.h>
#include <vector>

#include "combine.h"

namespace {

void check_cpu_long(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "dispatch_combine: ", what, " must be a contiguous 1-D int64 CPU tensor");
}

}  // namespace

// flat [N] expert id of each slot (k-major: slot j*T + t is token t's j-th choice); used [N] bool or None
// (every slot used); cap < 0: no capacity.
// -> (order [S] kept slots sorted by expert, stable; token [S] = order % T; counts [E] after the
//     capacity drop; dropped: a 0-d int64 tensor)
std::vector<at::Tensor> plan(const at::Tensor& flat, const c10::optional<at::Tensor>& used_opt, int64_t num_tokens,
                             int64_t num_experts, int64_t cap) {
  check_cpu_long(flat, "the slots' experts");
  const int64_t N = flat.numel();
  const int64_t* ex = flat.data_ptr<int64_t>();
  const bool* us = nullptr;
  if (used_opt.has_value() && used_opt->defined()) {
    const at::Tensor& used = *used_opt;
    TORCH_CHECK(used.scalar_type() == at::kBool && used.numel() == N && used.is_contiguous(),
                "dispatch_combine: the used mask must be a contiguous bool tensor of the slots' length");
    us = used.data_ptr<bool>();
  }
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t i = 0; i < N; ++i) {
    if (us && !us[i]) continue;
    const int64_t e = ex[i];
    TORCH_CHECK(e >= 0 && e < num_experts, "dispatch_combine: a router chose expert ", e, ", outside 0..",
                num_experts - 1);
    ++counts[e];
  }
  std::vector<int64_t> kept(num_experts), start(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    kept[e] = cap >= 0 ? std::min(counts[e], cap) : counts[e];
    start[e + 1] = start[e] + kept[e];
  }
  auto opts = flat.options();
  auto order = at::empty({start[num_experts]}, opts);
  auto token = at::empty({start[num_experts]}, opts);
  auto counts_t = at::empty({num_experts}, opts);
  int64_t* o = order.data_ptr<int64_t>();
  int64_t* tk = token.data_ptr<int64_t>();
  std::vector<int64_t> fill(num_experts, 0);
  int64_t dropped = 0;
  for (int64_t i = 0; i < N; ++i) {  // slot order: the stable sort's order within each expert
    if (us && !us[i]) continue;
    const int64_t e = ex[i];
    if (fill[e] < kept[e]) {
      const int64_t p = start[e] + fill[e]++;
      o[p] = i;
      tk[p] = num_tokens ? i % num_tokens : 0;
    } else {
      ++dropped;  // over capacity: the latest slots of the expert go, first choices before second
    }
  }
  std::copy(kept.begin(), kept.end(), counts_t.data_ptr<int64_t>());
  return {order, token, counts_t, at::scalar_tensor(dropped, opts)};
}

// out [S, d] expert outputs in plan order, w [N] slot weights (k-major), order/token [S] -> y [T, d]
at::Tensor combine_forward(const at::Tensor& out_in, const at::Tensor& w_in, const at::Tensor& order,
                           const at::Tensor& token, int64_t num_tokens) {
  check_cpu_long(order, "order");
  check_cpu_long(token, "token");
  auto out = out_in.contiguous();
  auto w = w_in.contiguous();
  TORCH_CHECK(out.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "dispatch_combine: float32 only (other dtypes take the Python path)");
  return harness_combine::weighted_scatter_add(out, w, order, token, num_tokens);
}

// -> (g_out [S, d] or undefined, g_w [N] or undefined)
std::vector<at::Tensor> combine_backward(const at::Tensor& gy_in, const at::Tensor& out_in, const at::Tensor& w_in,
                                         const at::Tensor& order, const at::Tensor& token, bool need_out,
                                         bool need_w) {
  auto gy = gy_in.contiguous();
  auto out = out_in.contiguous();
  auto w = w_in.contiguous();
  at::Tensor g_out, g_w;
  if (need_out) g_out = harness_combine::grad_outputs(gy, w, order, token, out.size(0), out.size(1));
  if (need_w) g_w = harness_combine::grad_weights(gy, out, order, token, w.numel());
  return {g_out, g_w};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan, "MoE permute plan: (order, token, counts, dropped)");
  m.def("combine_forward", &combine_forward, "weighted scatter-add of expert outputs: y");
  m.def("combine_backward", &combine_backward, "(g_out, g_w)");
}
