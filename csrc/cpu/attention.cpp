// CPU flash attention, forward and backward, float32, head dims 16 / 32 / 64.
//
// Reads the packed QKV projection (B, N, 3, heads, d) (any strides) and writes (B, N, heads * d): the
// layouts of nn.MultiheadAttention's in_proj output and out_proj input, so no transposes around the call.
// Scores are computed in the log2 domain: Q is pre-scaled by log2(e) / sqrt(d), so P = exp2(S - m) and the
// saved statistic is lse2 = log2(sum_j exp2(S_j)) per query row (natural lse = lse2 * ln 2).
//
// Forward (one work item = one (batch, head, 64-query block)): for each key block, an 8-row register-tiled
// S = Q K^T (K packed transposed so 16 keys sit in one AVX-512 vector), an online-softmax update with a
// polynomial exp2 (vscalef for the 2^n), and O += P V with P broadcast from L1.
// Backward (one work item = one (batch, head, key block)): recompute S^T = K Q^T and P^T from lse2,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO and dK += dS^T Q stay in the item's accumulators,
// dQ += dS K goes into a per-thread buffer summed at the end (no atomics, deterministic for a thread count).
// Sequence lengths are padded to a multiple of 16 in the packed copies; padded keys are masked.
#include "vec_config.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "ops.h"

namespace fast_unet {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int VS = Vec::size();
constexpr int64_t kPad = 16;   // sequence padding (a multiple of every vector width)
constexpr int G = 8;           // rows of the S micro-tile
constexpr int64_t kBM = 64;    // forward: queries per work item
constexpr int64_t kBK = 64;    // backward: keys per work item
constexpr int64_t kBQ = 64;    // backward: queries per inner block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <int D> constexpr int64_t block_n() { return D == 16 ? 256 : (D == 32 ? 128 : 64); }
template <int D> constexpr int pv_rows() { return D == 16 ? 8 : 4; }

// The micro-kernels use raw AVX-512 registers where the build has them: GCC keeps arrays of __m512 in
// registers but spills arrays of Vectorized<float> to the stack on every iteration (measured 1.7x slower).
#if defined(CPU_CAPABILITY_AVX512)
using VF = __m512;
inline VF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF vset(float x) { return _mm512_set1_ps(x); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vadd(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF vsub(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vmax(VF a, VF b) { return _mm512_max_ps(a, b); }
inline float hmax(VF a) { return _mm512_reduce_max_ps(a); }
inline float hsum(VF a) { return _mm512_reduce_add_ps(a); }
// 2^x for x <= 0 (softmax arguments); exactly 0 below 2^-126 (no denormals reach the FMAs).
// x = n + f, f in [-1/2, 1/2]; 2^f by a degree-5 Chebyshev fit (max rel. error 1.04e-7); 2^n by vscalefps.
inline VF vexp2(VF x) {
  const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.3400432165577227e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.676037097866618e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550327214208539e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402210735583101e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472067106208e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000000754953482f));
  return _mm512_maskz_scalef_ps(ok, p, n);
}
#else
using VF = Vec;
inline VF vload(const float* p) { return Vec::loadu(p); }
inline void vstore(float* p, VF v) { v.store(p); }
inline VF vset(float x) { return Vec(x); }
inline VF vfma(VF a, VF b, VF c) { return at::vec::fmadd(a, b, c); }
inline VF vadd(VF a, VF b) { return a + b; }
inline VF vsub(VF a, VF b) { return a - b; }
inline VF vmul(VF a, VF b) { return a * b; }
inline VF vmax(VF a, VF b) { return at::vec::maximum(a, b); }
inline float hmax(VF a) {
  alignas(64) float t[VS];
  a.store(t);
  float m = t[0];
  for (int i = 1; i < VS; ++i) m = std::max(m, t[i]);
  return m;
}
inline float hsum(VF a) {
  alignas(64) float t[VS];
  a.store(t);
  float s = 0.f;
  for (int i = 0; i < VS; ++i) s += t[i];
  return s;
}
inline VF vexp2(VF x) {
  alignas(64) float t[VS];
  x.store(t);
  for (int i = 0; i < VS; ++i) t[i] = t[i] >= -126.f ? std::exp2(t[i]) : 0.f;
  return Vec::loadu(t);
}
#endif

inline float exp2_scalar(float x) { return x >= -126.f ? std::exp2(x) : 0.f; }

// S[r, 0:NV*VS] = sum_k A[r, k] * Bt[k, 0:NV*VS] for the G rows of A; optionally rmax[r] = max(rmax[r], S[r, :]).
template <int D, int NV, bool MAX>
inline void s_tile(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* S, int64_t lds, VF* rmax) {
  VF acc[G][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = vset(0.f);
#pragma GCC unroll 16
  for (int k = 0; k < D; ++k) {
    VF b[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vload(Bt + k * ldb + v * VS);
    #pragma GCC unroll 16
    for (int r = 0; r < G; ++r) {
      const VF a = vset(A[r * lda + k]);
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(a, b[v], acc[r][v]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      vstore(S + r * lds + v * VS, acc[r][v]);
      if (MAX) rmax[r] = vmax(rmax[r], acc[r][v]);
    }
}

// G rows of S = A (G x D, row stride lda) times Bt (D x ncol, row stride ldb); ncol a multiple of VS.
template <int D, bool MAX>
inline void s_rows(const float* A, int64_t lda, const float* Bt, int64_t ldb, float* S, int64_t lds, int64_t ncol,
                   VF* rmax) {
  int64_t j = 0;
  for (; j + 2 * VS <= ncol; j += 2 * VS) {
    // Opaque to the optimiser: stops it hoisting all G*D broadcasts of A out of this loop (they would spill).
    asm volatile("" : "+r"(A));
    s_tile<D, 2, MAX>(A, lda, Bt + j, ldb, S + j, lds, rmax);
  }
  for (; j < ncol; j += VS) {
    asm volatile("" : "+r"(A));
    s_tile<D, 1, MAX>(A, lda, Bt + j, ldb, S + j, lds, rmax);
  }
}

// O[r, :] += sum_j P(r, j) * V[j, :] for R rows; P(r, j) = P[r * prs + j * pcs]; V rows are D floats apart.
template <int D, int R>
inline void pv_tile(const float* P, int64_t prs, int64_t pcs, const float* V, int64_t nj, float* O) {
  constexpr int NV = D / VS;
  VF acc[R][NV];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(O + r * D + v * VS);
  for (int64_t j = 0; j < nj; ++j) {
    VF b[NV];
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = vload(V + j * D + v * VS);
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const VF p = vset(P[r * prs + j * pcs]);
      #pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(p, b[v], acc[r][v]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(O + r * D + v * VS, acc[r][v]);
}

// One forward work item: queries [q0, q0 + rows) of one (batch, head).
// Q: (Np, D) pre-scaled; Kt: (D, Np); V: (Np, D); out: row q0's output, rows ostride apart; lse2: at q0.
template <int D>
void fwd_item(const float* Q, const float* Kt, const float* V, int64_t N, int64_t Np, int64_t q0, int64_t rows,
              float* out, int64_t ostride, float* lse2) {
  constexpr int64_t BN = block_n<D>();
  constexpr int R = pv_rows<D>();
  alignas(64) float S[G * BN];
  alignas(64) float O[kBM * D];
  float m[kBM], l[kBM];
  std::fill(O, O + rows * D, 0.f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.f);
  for (int64_t kb = 0; kb < Np; kb += BN) {
    const int64_t nb = std::min(BN, Np - kb);
    const int64_t valid = std::min(nb, N - kb);  // keys past N are padding
    for (int64_t g = 0; g < rows; g += G) {
      VF rmax[G];
      for (int r = 0; r < G; ++r) rmax[r] = vset(kNegInf);
      s_rows<D, true>(Q + (q0 + g) * D, D, Kt + kb, Np, S, BN, nb, rmax);
      if (valid < nb) {
        for (int r = 0; r < G; ++r) {
          std::fill(S + r * BN + valid, S + r * BN + nb, kNegInf);
          VF mx = vset(kNegInf);
          for (int64_t j = 0; j < nb; j += VS) mx = vmax(mx, vload(S + r * BN + j));
          rmax[r] = mx;
        }
      }
      for (int r = 0; r < G; ++r) {
        const int64_t i = g + r;
        const float mnew = std::max(m[i], hmax(rmax[r]));
        const float alpha = exp2_scalar(m[i] - mnew);  // 0 on the first block (m = -inf)
        const VF mv = vset(mnew);
        VF sum = vset(0.f);
        float* s = S + r * BN;
        for (int64_t j = 0; j < nb; j += VS) {
          const VF p = vexp2(vsub(vload(s + j), mv));
          vstore(s + j, p);
          sum = vadd(sum, p);
        }
        l[i] = l[i] * alpha + hsum(sum);
        m[i] = mnew;
        if (alpha != 1.f) {
          const VF av = vset(alpha);
          for (int v = 0; v < D; v += VS) vstore(O + i * D + v, vmul(vload(O + i * D + v), av));
        }
      }
      for (int r = 0; r < G; r += R) pv_tile<D, R>(S + r * BN, BN, 1, V + kb * D, nb, O + (g + r) * D);
    }
  }
  for (int64_t i = 0; i < rows && q0 + i < N; ++i) {
    const VF inv = vset(1.f / l[i]);
    for (int v = 0; v < D; v += VS) vstore(out + i * ostride + v, vmul(vload(O + i * D + v), inv));
    lse2[i] = m[i] + std::log2(l[i]);
  }
}

// One backward work item: keys [k0, k0 + nk) of one (batch, head), against every query block.
// Qs, K, V, dO: (Np, D); QsT, dOT: (D, Np); lse2 (+inf on padded queries), delta: (Np,).
// dK, dV: the item's rows of the outputs (row stride ostride); dQ: this thread's (Np, D) accumulator.
template <int D>
void bwd_item(const float* Qs, const float* QsT, const float* K, const float* V, const float* dO, const float* dOT,
              const float* lse2, const float* delta, int64_t N, int64_t Np, int64_t k0, int64_t nk, float* dK,
              float* dV, int64_t ostride, float* dQ) {
  constexpr int R = pv_rows<D>();
  alignas(64) float PT[kBK * kBQ];
  alignas(64) float dST[kBK * kBQ];
  alignas(64) float dKa[kBK * D];
  alignas(64) float dVa[kBK * D];
  std::fill(dKa, dKa + nk * D, 0.f);
  std::fill(dVa, dVa + nk * D, 0.f);
  for (int64_t qb = 0; qb < Np; qb += kBQ) {
    const int64_t nq = std::min(kBQ, Np - qb);
    for (int64_t g = 0; g < nk; g += G) {
      s_rows<D, false>(K + (k0 + g) * D, D, QsT + qb, Np, PT + g * kBQ, kBQ, nq, nullptr);
      s_rows<D, false>(V + (k0 + g) * D, D, dOT + qb, Np, dST + g * kBQ, kBQ, nq, nullptr);
      for (int r = 0; r < G; ++r) {
        float* p = PT + (g + r) * kBQ;
        float* ds = dST + (g + r) * kBQ;
        if (k0 + g + r >= N) {  // padded key
          std::fill(p, p + nq, 0.f);
          std::fill(ds, ds + nq, 0.f);
          continue;
        }
        for (int64_t j = 0; j < nq; j += VS) {
          const VF pv = vexp2(vsub(vload(p + j), vload(lse2 + qb + j)));
          vstore(p + j, pv);
          vstore(ds + j, vmul(pv, vsub(vload(ds + j), vload(delta + qb + j))));
        }
      }
    }
    for (int64_t g = 0; g < nk; g += R) {
      pv_tile<D, R>(PT + g * kBQ, kBQ, 1, dO + qb * D, nq, dVa + g * D);
      pv_tile<D, R>(dST + g * kBQ, kBQ, 1, Qs + qb * D, nq, dKa + g * D);
    }
    for (int64_t r = 0; r < nq; r += R) pv_tile<D, R>(dST + r, 1, kBQ, K + k0 * D, nk, dQ + (qb + r) * D);
  }
  const VF kscale = vset(1.f / kLog2e);
  for (int64_t i = 0; i < nk && k0 + i < N; ++i)
    for (int v = 0; v < D; v += VS) {
      vstore(dK + i * ostride + v, vmul(vload(dKa + i * D + v), kscale));
      vstore(dV + i * ostride + v, vload(dVa + i * D + v));
    }
}

void check_qkv(const at::Tensor& qkv, const char* what) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, what, ": qkv must have shape (B, N, 3, heads, d), got ", qkv.sizes());
  TORCH_CHECK(qkv.device().is_cpu(), what, ": qkv must be a CPU tensor, got ", qkv.device());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat, what, ": qkv must be float32, got ", qkv.scalar_type());
  const int64_t d = qkv.size(4);
  TORCH_CHECK(d == 16 || d == 32 || d == 64, what, ": head dim (qkv.size(4)) must be 16, 32 or 64, got ", d);
  TORCH_CHECK(qkv.size(1) > 0, what, ": qkv must hold at least one token, got shape ", qkv.sizes());
}

// (B, N, heads, d) strided view -> (B*heads, Np, d) contiguous, rows past N zero, times `scale`.
at::Tensor pack_rows(const at::Tensor& t, int64_t Np, double scale = 1.0) {
  const int64_t B = t.size(0), N = t.size(1), H = t.size(2), D = t.size(3);
  auto out = at::empty({B, H, Np, D}, t.options().memory_format(at::MemoryFormat::Contiguous));
  auto body = out.narrow(2, 0, N);
  body.copy_(t.permute({0, 2, 1, 3}));
  if (scale != 1.0) body.mul_(scale);
  if (Np > N) out.narrow(2, N, Np - N).zero_();
  return out;
}

// (B, N, heads, d) strided view -> (B*heads, d, Np) contiguous (transposed), columns past N zero.
at::Tensor pack_cols(const at::Tensor& t, int64_t Np, double scale = 1.0) {
  const int64_t B = t.size(0), N = t.size(1), H = t.size(2), D = t.size(3);
  auto out = at::empty({B, H, D, Np}, t.options().memory_format(at::MemoryFormat::Contiguous));
  auto body = out.narrow(3, 0, N);
  body.copy_(t.permute({0, 2, 3, 1}));
  if (scale != 1.0) body.mul_(scale);
  if (Np > N) out.narrow(3, N, Np - N).zero_();
  return out;
}

// Run f(i) for i in [0, n) on ATen's threads, handing items out one at a time: a thread that another
// process slows down takes fewer items instead of holding up the others (static splits did, 2x here).
template <typename F>
void parallel_dynamic(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n; i = next.fetch_add(1, std::memory_order_relaxed))
      f(i);
  });
}

template <int D>
void fwd_launch(const at::Tensor& Qs, const at::Tensor& Kt, const at::Tensor& V, at::Tensor& out, at::Tensor& lse2,
                int64_t B, int64_t H, int64_t N, int64_t Np) {
  const int64_t nqb = (Np + kBM - 1) / kBM;
  const float* qp = Qs.const_data_ptr<float>();
  const float* kp = Kt.const_data_ptr<float>();
  const float* vp = V.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  float* lp = lse2.mutable_data_ptr<float>();
  parallel_dynamic(B * H * nqb, [&](int64_t it) {
    const int64_t bh = it / nqb, q0 = (it % nqb) * kBM, b = bh / H, h = bh % H;
    const int64_t rows = std::min(kBM, Np - q0);
    fwd_item<D>(qp + bh * Np * D, kp + bh * D * Np, vp + bh * Np * D, N, Np, q0, rows,
                op + (b * N + q0) * H * D + h * D, H * D, lp + bh * N + q0);
  });
}

template <int D>
void bwd_launch(const at::Tensor& Qs, const at::Tensor& QsT, const at::Tensor& K, const at::Tensor& V,
                const at::Tensor& dO, const at::Tensor& dOT, const at::Tensor& lse2, const at::Tensor& delta,
                at::Tensor& dqkv, at::Tensor& dq_tls, int64_t B, int64_t H, int64_t N, int64_t Np) {
  const int64_t nkb = (Np + kBK - 1) / kBK;
  float* dp = dqkv.mutable_data_ptr<float>();
  float* dqp = dq_tls.mutable_data_ptr<float>();
  const int64_t nthreads = dq_tls.size(0);
  parallel_dynamic(B * H * nkb, [&](int64_t it) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < nthreads, "attention backward: thread id ", tid, " out of range ", nthreads);
    {
      const int64_t bh = it / nkb, k0 = (it % nkb) * kBK, b = bh / H, h = bh % H;
      const int64_t nk = std::min(kBK, Np - k0);
      const int64_t rs = Np * D;
      float* row = dp + ((b * N + k0) * 3) * H * D + h * D;  // dqkv[b, k0, 0, h, :]
      bwd_item<D>(Qs.const_data_ptr<float>() + bh * rs, QsT.const_data_ptr<float>() + bh * rs,
                  K.const_data_ptr<float>() + bh * rs, V.const_data_ptr<float>() + bh * rs,
                  dO.const_data_ptr<float>() + bh * rs, dOT.const_data_ptr<float>() + bh * rs,
                  lse2.const_data_ptr<float>() + bh * Np, delta.const_data_ptr<float>() + bh * Np, N, Np, k0, nk,
                  row + H * D, row + 2 * H * D, 3 * H * D, dqp + (tid * B * H + bh) * rs);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv) {
  check_qkv(qkv, "attention");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  const int64_t Np = (N + kPad - 1) / kPad * kPad;
  const double qscale = double(kLog2e) / std::sqrt(double(D));
  auto Qs = pack_rows(qkv.select(2, 0), Np, qscale);
  auto Kt = pack_cols(qkv.select(2, 1), Np);
  auto V = pack_rows(qkv.select(2, 2), Np);
  auto out = at::empty({B, N, H * D}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse2 = at::empty({B, H, N}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  switch (D) {
    case 16: fwd_launch<16>(Qs, Kt, V, out, lse2, B, H, N, Np); break;
    case 32: fwd_launch<32>(Qs, Kt, V, out, lse2, B, H, N, Np); break;
    default: fwd_launch<64>(Qs, Kt, V, out, lse2, B, H, N, Np); break;
  }
  return {out, lse2};
}

at::Tensor attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                             const at::Tensor& lse2) {
  check_qkv(qkv, "attention backward");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({B, N, H * D}) && dout.scalar_type() == at::kFloat && dout.is_cpu(),
              "attention backward: dout must be a float32 CPU tensor of shape (", B, ", ", N, ", ", H * D, "), got ",
              dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK(out.sizes() == dout.sizes() && out.scalar_type() == at::kFloat, "attention backward: out must have dout's shape");
  TORCH_CHECK(lse2.sizes() == at::IntArrayRef({B, H, N}) && lse2.scalar_type() == at::kFloat,
              "attention backward: lse2 must be float32 of shape (", B, ", ", H, ", ", N, "), got ", lse2.sizes());
  const int64_t Np = (N + kPad - 1) / kPad * kPad;
  const double qscale = double(kLog2e) / std::sqrt(double(D));
  const auto q = qkv.select(2, 0), k = qkv.select(2, 1), v = qkv.select(2, 2);
  const auto dout_c = dout.contiguous();
  const auto dO4 = dout_c.view({B, N, H, D});
  auto Qs = pack_rows(q, Np, qscale);
  auto QsT = pack_cols(q, Np, qscale);
  auto K = pack_rows(k, Np);
  auto V = pack_rows(v, Np);
  auto dO = pack_rows(dO4, Np);
  auto dOT = pack_cols(dO4, Np);
  auto lse2p = at::full({B, H, Np}, std::numeric_limits<float>::infinity(), lse2.options());
  lse2p.narrow(2, 0, N).copy_(lse2);
  auto delta = at::zeros({B, H, Np}, lse2.options());
  delta.narrow(2, 0, N).copy_((dout_c * out).view({B, N, H, D}).sum(-1).permute({0, 2, 1}));
  auto dqkv = at::empty({B, N, 3, H, D}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
  auto dq_tls = at::zeros({at::get_num_threads(), B, H, Np, D}, qkv.options());
  switch (D) {
    case 16: bwd_launch<16>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
    case 32: bwd_launch<32>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
    default: bwd_launch<64>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
  }
  auto dq = dq_tls.size(0) == 1 ? dq_tls[0] : dq_tls.sum(0);
  dqkv.select(2, 0).copy_(dq.narrow(2, 0, N).permute({0, 2, 1, 3}).mul(1.0 / std::sqrt(double(D))));
  return dqkv;
}

}  // namespace fast_unet
