// The weighted combine and its two gradients, shared by dispatch_combine.cpp (the combine of the kernels
// that keep the Python expert step) and segment_mlp.cpp (the fused gather -> experts -> combine node), so
// both run one copy of the arithmetic whose bits the Python composite fixes (tests/test_dispatch_combine.py,
// tests/test_fused_moe.py):
//   forward   y[token[p]] += out[p] * w[order[p]]          (mul, then index_add_ in plan order)
//   backward  g_out[p]   = gy[token[p]] * w[order[p]]      (IndexAddBackward's index_select, MulBackward)
//             g_w[order[p]] = sum_j gy[token[p], j] * out[p, j]   (MulBackward's product, then at::sum
//             over j as sum_to_size does, then IndexBackward's 0 + g)
// Compiled with -ffp-contract=off (harness/layers/cpp.py) so no multiply and add fuse into one rounding.
// Every tensor is float32 / int64, contiguous, on the CPU: the callers check.
#pragma once
#include <torch/extension.h>

namespace harness_combine {

// out [S, d] expert outputs in plan order, w [N] slot weights (k-major), order/token [S] -> y [T, d]
inline at::Tensor weighted_scatter_add(const at::Tensor& out, const at::Tensor& w, const at::Tensor& order,
                                       const at::Tensor& token, int64_t num_tokens) {
  const int64_t S = out.size(0), d = out.size(1);
  auto y = at::zeros({num_tokens, d}, out.options());
  const float* __restrict__ src = out.data_ptr<float>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const int64_t* o = order.data_ptr<int64_t>();
  const int64_t* tk = token.data_ptr<int64_t>();
  float* __restrict__ dst = y.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) {
    const float wv = wp[o[p]];
    const float* __restrict__ s = src + p * d;
    float* __restrict__ r = dst + tk[p] * d;
    for (int64_t j = 0; j < d; ++j) {
      const float prod = s[j] * wv;  // rounded here, as the composite's mul is
      r[j] = r[j] + prod;
    }
  }
  return y;
}

// gy [T, d] -> g_out [S, d]: each slot's token row of gy times the slot's weight
inline at::Tensor grad_outputs(const at::Tensor& gy, const at::Tensor& w, const at::Tensor& order,
                               const at::Tensor& token, int64_t S, int64_t d) {
  auto g_out = at::empty({S, d}, gy.options());
  const float* __restrict__ g = gy.data_ptr<float>();
  const float* __restrict__ wp = w.data_ptr<float>();
  const int64_t* o = order.data_ptr<int64_t>();
  const int64_t* tk = token.data_ptr<int64_t>();
  float* __restrict__ go = g_out.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) {
    const float wv = wp[o[p]];
    const float* __restrict__ gr = g + tk[p] * d;
    for (int64_t j = 0; j < d; ++j) go[p * d + j] = gr[j] * wv;
  }
  return g_out;
}

// gy [T, d], out [S, d] -> g_w [N]: the slot weights' gradient (zero for slots the plan dropped)
inline at::Tensor grad_weights(const at::Tensor& gy, const at::Tensor& out, const at::Tensor& order,
                               const at::Tensor& token, int64_t N) {
  const int64_t S = out.size(0), d = out.size(1);
  auto prod = at::empty({S, d}, out.options());
  const float* __restrict__ g = gy.data_ptr<float>();
  const float* __restrict__ src = out.data_ptr<float>();
  const int64_t* o = order.data_ptr<int64_t>();
  const int64_t* tk = token.data_ptr<int64_t>();
  float* __restrict__ pr = prod.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) {
    const float* __restrict__ gr = g + tk[p] * d;
    for (int64_t j = 0; j < d; ++j) pr[p * d + j] = gr[j] * src[p * d + j];
  }
  auto per_slot = at::sum(prod, {1});  // the reduction sum_to_size runs: its bits
  auto g_w = at::zeros({N}, out.options());
  const float* __restrict__ ps = per_slot.data_ptr<float>();
  float* __restrict__ gw = g_w.data_ptr<float>();
  for (int64_t p = 0; p < S; ++p) gw[o[p]] = gw[o[p]] + ps[p];
  return g_w;
}

}  // namespace harness_combine
