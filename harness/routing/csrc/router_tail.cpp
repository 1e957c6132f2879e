// The fused router tail (harness/routing/router_tail.py): softmax -> top-k -> combine weights -> Switch
// balance loss -> ST-MoE z-loss, forward and backward each one call over the [T, E] router scores.
//
// The equations are those of the composite in baselines/smoe.py (softmax_topk, gate_weights) and
// harness/routing/losses.py (switch_balance_loss, router_z_loss); what differs is the order and kind of the
// floating-point operations (router_tail.py's docstring says where). Why: at T = 1,024, E = 8 the composite
// is ~40 small ATen ops costing ~0.6-1.1 ms forward + backward per layer at one thread, much of it per-op
// overhead and ATen's softmax over a last dimension of 8 (a slow path, ~150 us forward + ~65 us backward).
//
// Rows are processed in fixed blocks of BLOCK rows; each block writes its own partial sums (column sums of
// the probabilities, expert counts, sum of logsumexp^2) and the blocks are added in order afterwards, so the
// losses are the same bits whatever the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

// The block loops are compiled twice on x86-64 Linux, for AVX2 and for the baseline, and the loader picks one
// (GCC / clang function multi-versioning). Both give the same bits: no FMA contraction (-ffp-contract=off in
// router_tail.py) and IEEE single precision either way.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define HARNESS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HARNESS_CLONES
#endif
#define HARNESS_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t BLOCK = 256;
enum Balance : int64_t { NONE = 0, FIRST = 1, SLOTS = 2, K_SLOTS = 3 };  // router_tail.py BALANCE_CODES

// exp for the softmax and logsumexp rows: Cephes' expf (range reduction by ln 2 in two parts, a degree-7
// polynomial; < 1 ulp over the normal range against float64, and the probabilities within 4 ulp of ATen's:
// tests/test_fast_router_tail.py),
// written without branches or library calls so that the compiler vectorises the row loops: the C library's
// expf is one call per element (~4 ns; 30 us of the 1,024 x 8 forward). 2^n is applied in two halves so
// that results in the subnormal range are rounded once. Inputs here are finite.
HARNESS_INLINE float exp_fast(float x) {
  x = x < -104.0f ? -104.0f : x;  // exp(-104) is below half the smallest subnormal: rounds to 0
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4, the first part exact in 9 bits
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t k1 = ni >> 1, k2 = ni - k1;
  const int32_t b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  return y * s1 * s2;
}

HARNESS_INLINE float exp_t(float x) { return exp_fast(x); }
HARNESS_INLINE double exp_t(double x) { return std::exp(x); }  // float64: gradcheck and tests only

// A block of n rows is transposed into buf ([E, n]) so that every per-row reduction (max, sum, the top
// two) runs across the n rows at once, in vector lanes, instead of as one dependent chain (and, for the
// top-k, unpredictable branches) per row.
// [n, E] rows -> [E, n] (and back), 8 rows at a time: contiguous reads of 8 rows, 8-wide column writes
template <typename scalar_t>
HARNESS_INLINE void transpose_in(const scalar_t* x, scalar_t* xt, int64_t n, int64_t E) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int64_t i = 0; i < E; ++i) {
      scalar_t tile[8];
      for (int r = 0; r < 8; ++r) tile[r] = x[(t + r) * E + i];
      for (int r = 0; r < 8; ++r) xt[i * n + t + r] = tile[r];
    }
  }
  for (; t < n; ++t)
    for (int64_t i = 0; i < E; ++i) xt[i * n + t] = x[t * E + i];
}

template <typename scalar_t>
HARNESS_INLINE void transpose_out(const scalar_t* xt, scalar_t* x, int64_t n, int64_t E) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int64_t i = 0; i < E; ++i) {
      scalar_t tile[8];
      for (int r = 0; r < 8; ++r) tile[r] = xt[i * n + t + r];
      for (int r = 0; r < 8; ++r) x[(t + r) * E + i] = tile[r];
    }
  }
  for (; t < n; ++t)
    for (int64_t i = 0; i < E; ++i) x[t * E + i] = xt[i * n + t];
}

template <typename scalar_t>
HARNESS_INLINE bool all_finite(const scalar_t* v, int64_t len) {
  int64_t bad = 0;
  for (int64_t j = 0; j < len; ++j) bad += !(std::fabs(v[j]) <= std::numeric_limits<scalar_t>::max());
  return bad == 0;
}

// In place on xt ([E, n]): exp(x - max) per row, times 1 / sum when `normalise`; lse (if not null) gets
// max + log(sum). The softmax as ATen's last-dimension kernel orders it: max, exp(x - max), the sum over
// i = 0..E-1 in order, times the reciprocal; logsumexp as at::logsumexp: max + log(sum exp(x - max)).
template <typename scalar_t>
HARNESS_INLINE void softmax_t(scalar_t* xt, scalar_t* m, scalar_t* sum, scalar_t* lse, bool normalise, int64_t n,
                              int64_t E) {
  for (int64_t t = 0; t < n; ++t) m[t] = xt[t];
  for (int64_t i = 1; i < E; ++i)
    for (int64_t t = 0; t < n; ++t) m[t] = xt[i * n + t] > m[t] ? xt[i * n + t] : m[t];
  for (int64_t t = 0; t < n; ++t) sum[t] = 0;
  for (int64_t i = 0; i < E; ++i) {
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t e = exp_t(xt[i * n + t] - m[t]);
      xt[i * n + t] = e;
      sum[t] += e;
    }
  }
  if (lse != nullptr)
    for (int64_t t = 0; t < n; ++t) lse[t] = m[t] + std::log(sum[t]);
  if (normalise) {
    for (int64_t t = 0; t < n; ++t) sum[t] = scalar_t(1) / sum[t];
    for (int64_t i = 0; i < E; ++i)
      for (int64_t t = 0; t < n; ++t) xt[i * n + t] *= sum[t];
  }
}

// The two largest per row of pt ([E, n]) with their experts, by strict comparisons (an equal value never
// displaces an earlier one), and redo[t] = 1 where the choice is ambiguous -- the k chosen not strictly
// ordered, or other values equal to the k-th -- so that the row must be chosen as torch.topk does.
template <typename scalar_t>
HARNESS_INLINE void top2_t(const scalar_t* pt, int64_t n, int64_t E, int64_t k, scalar_t* b0, scalar_t* b1,
                           int32_t* i0, int32_t* i1, int32_t* redo) {
  for (int64_t t = 0; t < n; ++t) {
    b0[t] = pt[t];
    b1[t] = -std::numeric_limits<scalar_t>::infinity();
    i0[t] = 0;
    i1[t] = 0;
    redo[t] = 0;
  }
  for (int64_t i = 1; i < E; ++i) {
    const scalar_t* v = pt + i * n;
    const int32_t ii = static_cast<int32_t>(i);
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t x = v[t];
      const bool g0 = x > b0[t], g1 = x > b1[t];
      const scalar_t nb1 = g0 ? b0[t] : (g1 ? x : b1[t]);
      const int32_t ni1 = g0 ? i0[t] : (g1 ? ii : i1[t]);
      b0[t] = g0 ? x : b0[t];
      i0[t] = g0 ? ii : i0[t];
      b1[t] = nb1;
      i1[t] = ni1;
    }
  }
  const scalar_t* kth = k == 1 ? b0 : b1;
  for (int64_t i = 0; i < E; ++i)
    for (int64_t t = 0; t < n; ++t) redo[t] += pt[i * n + t] >= kth[t];  // values reaching the k-th
  for (int64_t t = 0; t < n; ++t) redo[t] = (redo[t] != k) || (k == 2 && !(b0[t] > b1[t]));
}

// sum_t v_t (or v_t^2) in float64 over 8 fixed lanes: vectorises, and the same bits at any thread count
template <typename scalar_t>
HARNESS_INLINE double lane_sum(const scalar_t* v, int64_t n, bool square) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int j = 0; j < 8; ++j) {
      const double a = v[t + j];
      l[j] += square ? a * a : a;
    }
  }
  for (; t < n; ++t) {
    const double a = v[t];
    l[t & 7] += square ? a * a : a;
  }
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename scalar_t>
struct Block {
  const scalar_t* x;   // [n, E] scores (softmax_inside) or probabilities
  const scalar_t* zl;  // [n, E] the z-loss logits when they are not x, else null
  scalar_t* p;         // [n, E] out: the probabilities (softmax_inside)
  scalar_t* lse;       // [n] out, or null without a z-loss
  int64_t* idx;        // [n, k] out (k <= 2; rows with redo[t] = 1 are left to the caller)
  scalar_t* w;         // [n, k] out, likewise
  int32_t* redo;       // [n] out: 1 where the caller must choose the row as torch.topk does (every row if k > 2)
  double* colsum;      // [E] += sum_t p_ti, or null without a balance loss
  double* zsq;         // += sum_t lse_t^2, or null without a z-loss
  scalar_t* buf;       // (E + 4) * n scratch
  int32_t* ibuf;       // 2 * n scratch
  int64_t n, E, k;
  bool softmax_inside, z_on_x, renorm;
};

// One block; false (and nothing else done) if a value of x or zl is not finite.
template <typename scalar_t>
HARNESS_INLINE bool block_body(const Block<scalar_t>& b) {
  const int64_t n = b.n, E = b.E, k = b.k;
  scalar_t* pt = b.buf;
  scalar_t* m = pt + E * n;
  scalar_t* sum = m + n;
  scalar_t* top0 = sum + n;
  scalar_t* top1 = top0 + n;
  if (b.zl != nullptr) {  // the z-loss of separate logits first: pt is then free for x
    transpose_in(b.zl, pt, n, E);
    if (!all_finite(pt, E * n)) return false;
    softmax_t(pt, m, sum, b.lse, false, n, E);
  }
  transpose_in(b.x, pt, n, E);
  if (!all_finite(pt, E * n)) return false;
  if (b.softmax_inside) softmax_t(pt, m, sum, b.z_on_x ? b.lse : nullptr, true, n, E);
  if (k <= 2) {
    top2_t(pt, n, E, k, top0, top1, b.ibuf, b.ibuf + n, b.redo);
    const scalar_t eps = scalar_t(1e-9);  // gate_weights: p_j / (sum_j p_j).clamp_min(1e-9)
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t S = k == 1 ? top0[t] : top0[t] + top1[t];
      const scalar_t Sc = b.renorm ? (S < eps ? eps : S) : scalar_t(1);
      b.idx[t * k] = b.ibuf[t];
      b.w[t * k] = b.renorm ? top0[t] / Sc : top0[t];
      if (k == 2) {
        b.idx[t * k + 1] = b.ibuf[n + t];
        b.w[t * k + 1] = b.renorm ? top1[t] / Sc : top1[t];
      }
    }
  } else {
    for (int64_t t = 0; t < n; ++t) b.redo[t] = 1;
  }
  if (b.softmax_inside) transpose_out(pt, b.p, n, E);
  if (b.colsum != nullptr)
    for (int64_t i = 0; i < E; ++i) b.colsum[i] += lane_sum(pt + i * n, n, false);
  if (b.zsq != nullptr) *b.zsq += lane_sum(b.lse, n, true);
  return true;
}

HARNESS_CLONES bool block_f32(const Block<float>& b) { return block_body(b); }
bool run_block(const Block<float>& b) { return block_f32(b); }
bool run_block(const Block<double>& b) { return block_body(b); }

// torch.topk's CPU selection (aten/src/ATen/native/TopKImpl.h, topk_impl_loop, largest=true, sorted=true),
// repeated call for call so that ties between equal probabilities go to the same experts: ATen does not
// break ties by the lower index (nth_element / partial_sort are not stable). Used only for rows where the
// top k are not strictly ordered above the rest; otherwise every correct selection gives the same answer.
template <typename scalar_t>
void topk_like_aten(const scalar_t* v, int64_t E, int64_t k, int64_t* out_idx,
                    std::vector<std::pair<scalar_t, int64_t>>& queue) {
  using elem_t = std::pair<scalar_t, int64_t>;
  queue.resize(E);
  for (int64_t j = 0; j < E; ++j) queue[j] = {v[j], j};
  auto greater = [](const elem_t& x, const elem_t& y) -> bool {
    return ((std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first));
  };
  if (k * 64 <= E) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), greater);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), greater);
    std::sort(queue.begin(), queue.begin() + k - 1, greater);
  }
  for (int64_t j = 0; j < k; ++j) out_idx[j] = queue[j].second;
}

// The k largest of one row (finite values; k > 2, the vectorised top2_t does k <= 2), indices into idx
// and values into top: a selection by insertion, then a check that it is unambiguous (the k values strictly
// decreasing, exactly k values reaching the k-th); otherwise the row goes through topk_like_aten.
template <typename scalar_t>
void topk_row(const scalar_t* v, int64_t E, int64_t k, int64_t* idx, scalar_t* top,
              std::vector<std::pair<scalar_t, int64_t>>& queue) {
  int64_t n = 0;
  for (int64_t i = 0; i < E; ++i) {
    const scalar_t x = v[i];
    if (n == k && !(x > top[k - 1])) continue;
    int64_t j = (n < k) ? n++ : k - 1;
    for (; j > 0 && x > top[j - 1]; --j) {
      top[j] = top[j - 1];
      idx[j] = idx[j - 1];
    }
    top[j] = x;
    idx[j] = i;
  }
  bool strict = true;
  for (int64_t j = 1; j < k; ++j) strict = strict && (top[j - 1] > top[j]);
  int64_t reach = 0;
  for (int64_t i = 0; i < E; ++i) reach += (v[i] >= top[k - 1]);
  if (!strict || reach != k) {
    topk_like_aten(v, E, k, idx, queue);
    for (int64_t j = 0; j < k; ++j) top[j] = v[idx[j]];
  }
}

struct Options {
  bool softmax_inside;  // x holds scores (the probabilities are made here), else the probabilities
  bool z_on_x;          // the z-loss is of x itself (x holds the logits)
  int64_t k;
  bool renorm;
  int64_t balance;      // enum Balance
  double balance_weight, z_weight;
};

using Forward = std::tuple<std::vector<at::Tensor>, bool>;

template <typename scalar_t>
void weights_row(const scalar_t* top, int64_t k, bool renorm, scalar_t* w) {
  if (renorm) {  // gate_weights: p_j / (sum_j p_j).clamp_min(1e-9)
    const scalar_t eps = scalar_t(1e-9);
    scalar_t S = 0;
    for (int64_t j = 0; j < k; ++j) S += top[j];
    const scalar_t Sc = S < eps ? eps : S;
    for (int64_t j = 0; j < k; ++j) w[j] = top[j] / Sc;
  } else {
    for (int64_t j = 0; j < k; ++j) w[j] = top[j];
  }
}

template <typename scalar_t>
Forward forward_impl(const at::Tensor& x, const at::Tensor& zl, const Options& o) {
  const int64_t T = x.size(0), E = x.size(1), k = o.k;
  const bool want_z = o.z_weight != 0.0, want_bal = o.balance != NONE;
  auto probs = o.softmax_inside ? at::empty_like(x) : x;
  auto idx = at::empty({T, k}, x.options().dtype(at::kLong));
  auto weights = at::empty({T, k}, x.options());
  auto lse = at::empty({want_z ? T : 0}, x.options());
  const int64_t nblocks = (T + BLOCK - 1) / BLOCK, width = 2 * E + 2;
  // per block: E column sums of p, E expert counts, the sum of lse^2, 1 if every value was finite
  std::vector<double> part(nblocks * width, 0.0);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  const scalar_t* zd = (want_z && !o.z_on_x) ? zl.data_ptr<scalar_t>() : nullptr;
  scalar_t* pd = probs.data_ptr<scalar_t>();
  int64_t* id = idx.data_ptr<int64_t>();
  scalar_t* wd = weights.data_ptr<scalar_t>();
  scalar_t* ld = want_z ? lse.data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<scalar_t, int64_t>> queue;
    std::vector<scalar_t> buf((E + 4) * BLOCK), top(k);
    std::vector<int32_t> ibuf(3 * BLOCK);
    for (int64_t b = b0; b < b1; ++b) {
      double* acc = part.data() + b * width;
      const int64_t t0 = b * BLOCK, n = std::min(T, t0 + BLOCK) - t0;
      int32_t* redo = ibuf.data() + 2 * BLOCK;
      const Block<scalar_t> blk{xd + t0 * E, zd ? zd + t0 * E : nullptr, pd + t0 * E, ld ? ld + t0 : nullptr,
                                id + t0 * k, wd + t0 * k, redo, want_bal ? acc : nullptr,
                                want_z ? acc + 2 * E : nullptr, buf.data(), ibuf.data(), n, E, k,
                                o.softmax_inside, o.z_on_x, o.renorm};
      const bool finite = run_block(blk);
      acc[2 * E + 1] = finite ? 1.0 : 0.0;
      if (!finite) continue;  // the caller runs the composite
      for (int64_t t = 0; t < n; ++t) {
        if (!redo[t]) continue;
        const scalar_t* pr = pd + (t0 + t) * E;
        int64_t* ir = id + (t0 + t) * k;
        if (k > 2) {
          topk_row(pr, E, k, ir, top.data(), queue);
        } else {
          topk_like_aten(pr, E, k, ir, queue);
          for (int64_t j = 0; j < k; ++j) top[j] = pr[ir[j]];
        }
        weights_row(top.data(), k, o.renorm, wd + (t0 + t) * k);
      }
      if (want_bal) {
        const int64_t counted = o.balance == FIRST ? 1 : k;
        for (int64_t t = t0; t < t0 + n; ++t)
          for (int64_t j = 0; j < counted; ++j) acc[E + id[t * k + j]] += 1.0;
      }
    }
  });

  std::vector<double> tot(width, 0.0);
  bool finite = true;
  for (int64_t b = 0; b < nblocks; ++b) {
    const double* acc = part.data() + b * width;
    for (int64_t i = 0; i < 2 * E + 1; ++i) tot[i] += acc[i];
    finite = finite && acc[2 * E + 1] != 0.0;
  }
  // f_i as expert_fractions makes it: counts / chosen.numel() in the probabilities' precision (times k)
  auto f = at::empty({want_bal ? E : 0}, x.options());
  double balance = 0.0;
  if (want_bal) {
    scalar_t* fd = f.data_ptr<scalar_t>();
    const scalar_t n = scalar_t(o.balance == FIRST ? T : T * k);
    for (int64_t i = 0; i < E; ++i) {
      fd[i] = scalar_t(tot[E + i]) / n;
      if (o.balance == K_SLOTS) fd[i] *= scalar_t(k);
      balance += double(fd[i]) * (tot[i] / double(T));  // f_i P_i, P_i = mean_t p_ti
    }
    balance *= double(E) * o.balance_weight;
  }
  const double z = want_z ? o.z_weight * tot[2 * E] / double(T) : 0.0;
  std::vector<at::Tensor> out{weights, idx, at::scalar_tensor(balance, x.options()),
                              at::scalar_tensor(z, x.options()), probs, lse, f};
  return {out, finite};
}

template <typename scalar_t>
struct BackBlock {
  const scalar_t* p;    // [n, E] the probabilities
  const int64_t* idx;   // [n, k]
  const scalar_t* gw;   // [n, k] d loss / d weights, or null
  const scalar_t* f;    // [E] f_i, or null without a balance gradient
  const scalar_t* lse;  // [n], or null without a z gradient
  const scalar_t* zl;   // [n, E] the separate z-loss logits, or null
  scalar_t* dx;         // [n, E] out: d scores (softmax_inside) or d probabilities
  scalar_t* dzl;        // [n, E] out: d logits, or null
  scalar_t* buf;        // (2 E + 1) n scratch
  int64_t n, E, k;
  bool softmax_inside, z_on_x, renorm;
  scalar_t c_bal, c_z;  // alpha E / T and 2 beta / T, times the upstream gradients
};

// One block of the backward, transposed as the forward is. d(alpha E sum_i f_i mean_t p_ti) / d p_ti =
// alpha E f_i / T; the weights w_j = a_j / max(S, eps), S = sum_j a_j, a_j = p[idx_j] (or w_j = a_j) give
// d a_j = (g_j - [S >= eps] sum_m g_m w_m) / max(S, eps) (clamp_min passes where S >= eps; factored so that
// renormalised k = 1 weights, w = 1, give exactly 0 where the composite leaves rounding noise); through
// p = softmax(s): ds_i = p_i (dp_i - sum_m dp_m p_m); d(beta mean_t lse_t^2) / d s_ti = 2 beta lse_t / T
// softmax(s)_ti (= p_ti when the z-loss is of the scores; exp(l_ti - lse_t), logsumexp's backward, otherwise).
template <typename scalar_t>
HARNESS_INLINE void back_body(const BackBlock<scalar_t>& b) {
  const int64_t n = b.n, E = b.E, k = b.k;
  const scalar_t eps = scalar_t(1e-9);
  scalar_t* pt = b.buf;
  scalar_t* dp = pt + E * n;
  scalar_t* dot = dp + E * n;
  transpose_in(b.p, pt, n, E);
  for (int64_t i = 0; i < E; ++i) {
    const scalar_t c = b.f != nullptr ? b.c_bal * b.f[i] : scalar_t(0);
    for (int64_t t = 0; t < n; ++t) dp[i * n + t] = c;
  }
  if (b.gw != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t* ir = b.idx + t * k;
      const scalar_t* gr = b.gw + t * k;
      const scalar_t* pr = b.p + t * E;
      if (b.renorm) {
        scalar_t S = 0;
        for (int64_t j = 0; j < k; ++j) S += pr[ir[j]];
        const scalar_t Sc = S < eps ? eps : S;
        scalar_t gw = 0;  // sum_m g_m w_m: the weights' share of the gradient, 0 where the sum was clamped
        if (!(S < eps))
          for (int64_t j = 0; j < k; ++j) gw += gr[j] * (pr[ir[j]] / Sc);
        for (int64_t j = 0; j < k; ++j) dp[ir[j] * n + t] += (gr[j] - gw) / Sc;
      } else {
        for (int64_t j = 0; j < k; ++j) dp[ir[j] * n + t] += gr[j];
      }
    }
  }
  if (b.softmax_inside) {
    for (int64_t t = 0; t < n; ++t) dot[t] = 0;
    for (int64_t i = 0; i < E; ++i)
      for (int64_t t = 0; t < n; ++t) dot[t] += dp[i * n + t] * pt[i * n + t];
    for (int64_t i = 0; i < E; ++i)
      for (int64_t t = 0; t < n; ++t) dp[i * n + t] = pt[i * n + t] * (dp[i * n + t] - dot[t]);
  }
  if (b.lse != nullptr && b.z_on_x) {
    for (int64_t i = 0; i < E; ++i)
      for (int64_t t = 0; t < n; ++t) dp[i * n + t] += (b.c_z * b.lse[t]) * pt[i * n + t];
  }
  transpose_out(dp, b.dx, n, E);
  if (b.dzl != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      const scalar_t cz = b.c_z * b.lse[t];
      for (int64_t i = 0; i < E; ++i) b.dzl[t * E + i] = cz * exp_t(b.zl[t * E + i] - b.lse[t]);
    }
  }
}

HARNESS_CLONES void back_f32(const BackBlock<float>& b) { back_body(b); }
void run_back(const BackBlock<float>& b) { back_f32(b); }
void run_back(const BackBlock<double>& b) { back_body(b); }

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& gw, double g_bal, double g_z, const at::Tensor& probs,
                                      const at::Tensor& idx, const at::Tensor& lse, const at::Tensor& f,
                                      const at::Tensor& zl, const Options& o) {
  const int64_t T = probs.size(0), E = probs.size(1), k = o.k;
  const bool want_z = o.z_weight != 0.0 && g_z != 0.0;
  const bool z_sep = want_z && !o.z_on_x;  // d logits, else None (no gradient)
  auto dx = at::empty_like(probs);
  auto dzl = z_sep ? at::empty_like(probs) : at::Tensor();
  const scalar_t* pd = probs.data_ptr<scalar_t>();
  const int64_t* id = idx.data_ptr<int64_t>();
  const scalar_t* gd = gw.defined() ? gw.data_ptr<scalar_t>() : nullptr;
  const scalar_t* ld = want_z ? lse.data_ptr<scalar_t>() : nullptr;
  const scalar_t* zd = z_sep ? zl.data_ptr<scalar_t>() : nullptr;
  const scalar_t* fd = (o.balance != NONE && g_bal != 0.0) ? f.data_ptr<scalar_t>() : nullptr;
  scalar_t* dd = dx.data_ptr<scalar_t>();
  scalar_t* dzd = z_sep ? dzl.data_ptr<scalar_t>() : nullptr;
  const scalar_t c_bal = scalar_t(g_bal * o.balance_weight * double(E) / double(T));
  const scalar_t c_z = scalar_t(g_z * o.z_weight * 2.0 / double(T));
  const int64_t nblocks = (T + BLOCK - 1) / BLOCK;

  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<scalar_t> buf((2 * E + 1) * BLOCK);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * BLOCK, n = std::min(T, t0 + BLOCK) - t0;
      const BackBlock<scalar_t> blk{pd + t0 * E, id + t0 * k, gd ? gd + t0 * k : nullptr, fd,
                                    ld ? ld + t0 : nullptr, zd ? zd + t0 * E : nullptr, dd + t0 * E,
                                    dzd ? dzd + t0 * E : nullptr, buf.data(), n, E, k, o.softmax_inside,
                                    o.z_on_x, o.renorm, c_bal, c_z};
      run_back(blk);
    }
  });
  return {dx, dzl};
}

Options options(bool softmax_inside, bool z_on_x, int64_t k, bool renorm, int64_t balance, double bw, double zw) {
  TORCH_CHECK(balance >= NONE && balance <= K_SLOTS, "router tail: unknown balance code ", balance);
  return Options{softmax_inside, z_on_x, k, renorm, balance, bw, zw};
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(),
              "router tail: ", what, " must be a contiguous [T, E] CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "router tail: ", what, " must be float32 or float64");
}

// The autograd node: forward's results are computed before it is applied (so that a non-finite input can
// go to the composite without a node), handed over in `Computed`, and saved for the hand-written backward.
struct Computed {
  std::vector<at::Tensor> out;  // weights, idx, balance, z, probs, lse, f
  Options o;
};

}  // namespace

namespace harness {

struct RouterTailFunction : public torch::autograd::Function<RouterTailFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& zl, const Computed* c) {
    const Options& o = c->o;
    ctx->saved_data["flags"] = (int64_t(o.softmax_inside) | int64_t(o.z_on_x) << 1 | int64_t(o.renorm) << 2);
    ctx->saved_data["k"] = o.k;
    ctx->saved_data["balance"] = o.balance;
    ctx->saved_data["balance_weight"] = o.balance_weight;
    ctx->saved_data["z_weight"] = o.z_weight;
    // probs, idx, lse, f, zl
    ctx->save_for_backward({c->out[4], c->out[1], c->out[5], c->out[6], zl.value_or(at::Tensor())});
    ctx->mark_non_differentiable({c->out[1]});
    ctx->set_materialize_grads(false);
    return {c->out[0], c->out[2], c->out[3], c->out[1]};  // weights, balance, z, idx
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                "router tail: no double backward (create_graph); HARNESS_NO_FUSED_ROUTER=1 runs the composite");
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const Options o = options(flags & 1, flags & 2, ctx->saved_data["k"].toInt(), flags & 4,
                              ctx->saved_data["balance"].toInt(), ctx->saved_data["balance_weight"].toDouble(),
                              ctx->saved_data["z_weight"].toDouble());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& probs = saved[0];
    at::Tensor gw;
    if (grads[0].defined()) gw = grads[0].to(probs.scalar_type()).contiguous();
    const double g_bal = grads[1].defined() ? grads[1].item<double>() : 0.0;
    const double g_z = grads[2].defined() ? grads[2].item<double>() : 0.0;
    auto d = AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "router_tail_backward", [&] {
      return backward_impl<scalar_t>(gw, g_bal, g_z, probs, saved[1], saved[2], saved[3], saved[4], o);
    });
    return {d[0], d[1], at::Tensor()};
  }
};

}  // namespace harness

// x: scores (softmax_inside) or probabilities, [T, E]; zl: the z-loss logits when they are not x (None
// otherwise). -> [weights [T, k], balance, z (0-dim, weighted), idx [T, k]] with their autograd node, or []
// if x or zl held a non-finite value (the caller then runs the composite).
std::vector<at::Tensor> tail(const at::Tensor& x, const c10::optional<at::Tensor>& zl, bool softmax_inside,
                             bool z_on_x, int64_t k, bool renorm, int64_t balance, double balance_weight,
                             double z_weight) {
  check_input(x, "x");
  TORCH_CHECK(x.size(0) > 0 && k >= 1 && k <= x.size(1), "router tail: needs T > 0 and 1 <= k <= E");
  TORCH_CHECK(softmax_inside || !z_on_x, "router tail: a z-loss of x needs x to hold the logits");
  Computed c;
  c.o = options(softmax_inside, z_on_x, k, renorm, balance, balance_weight, z_weight);
  at::Tensor z;
  if (z_weight != 0.0 && !z_on_x) {
    TORCH_CHECK(zl.has_value() && zl->sizes() == x.sizes() && zl->scalar_type() == x.scalar_type(),
                "router tail: the z-loss logits must match x");
    check_input(*zl, "logits");
    z = *zl;
  }
  bool finite = false;
  {
    at::NoGradGuard no_grad;
    std::tie(c.out, finite) = AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "router_tail_forward", [&] {
      return forward_impl<scalar_t>(x.detach(), z.defined() ? z.detach() : z, c.o);
    });
  }
  if (!finite) return {};
  if (!softmax_inside) c.out[4] = x;  // the probabilities are the input itself: saved as the input
  return harness::RouterTailFunction::apply(x, z.defined() ? c10::optional<at::Tensor>(z) : c10::nullopt, &c);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tail", &tail, "softmax -> top-k -> combine weights -> balance and z losses, with its autograd node");
}
