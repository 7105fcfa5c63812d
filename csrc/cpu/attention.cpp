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
// Backward (one work item = one (batch, head, slot of key blocks)): for each key block recompute S^T = K Q^T and P^T from lse2,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta); dV += P^T dO and dK += dS^T Q stay in the item's accumulators,
// dQ += dS K goes into one of S slot buffers (fixed key blocks per slot), summed in a fixed order at the
// end: no atomics, and the same result run to run.
// Sequence lengths are padded to a multiple of 16 in the packed copies; padded keys are masked.
#include "vec_config.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "cpu/cpu_common.h"
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

template <int D> constexpr int64_t block_n() { return D == 16 ? 1024 : (D == 32 ? 512 : 256); }
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
inline VF vexp2(VF x) { return cpu::vexp2_avx512(x); }  // csrc/cpu/cpu_common.h
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
  for (int i = 0; i < VS; ++i) t[i] = t[i] < -126.f ? 0.f : std::exp2(t[i]);
  return Vec::loadu(t);
}
#endif

inline float exp2_scalar(float x) { return x < -126.f ? 0.f : std::exp2(x); }

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

// Backward tiles with the softmax fused into the epilogue (lse2 is known, so no row max is needed):
//   p_tile:  P[r, c]  = 2^(sum_k A[r, k] Bt[k, c] - lse2[c])            (A = K rows, Bt = (Q*scale)^T)
//   ds_tile: dS[r, c] = P[r, c] * (sum_k A[r, k] Bt[k, c] - delta[c])  (A = V rows, Bt = dO^T)
template <int D, int NV>
inline void p_tile(const float* A, int64_t lda, const float* Bt, int64_t ldb, const float* lse2, float* P, int64_t lds) {
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
  VF l[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) l[v] = vload(lse2 + v * VS);
#pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) vstore(P + r * lds + v * VS, vexp2(vsub(acc[r][v], l[v])));
}

template <int D, int NV>
inline void ds_tile(const float* A, int64_t lda, const float* Bt, int64_t ldb, const float* delta, const float* P,
                    float* dS, int64_t lds) {
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
  VF dl[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) dl[v] = vload(delta + v * VS);
#pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      vstore(dS + r * lds + v * VS, vmul(vload(P + r * lds + v * VS), vsub(acc[r][v], dl[v])));
}

// G rows of P and dS over ncol columns (a multiple of VS).
template <int D>
inline void p_ds_rows(const float* K, const float* QsT, const float* V, const float* dOT, int64_t ldb, const float* lse2,
                      const float* delta, float* P, float* dS, int64_t lds, int64_t ncol) {
  int64_t j = 0;
  for (; j + 2 * VS <= ncol; j += 2 * VS) {
    asm volatile("" : "+r"(K), "+r"(V));
    p_tile<D, 2>(K, D, QsT + j, ldb, lse2 + j, P + j, lds);
    ds_tile<D, 2>(V, D, dOT + j, ldb, delta + j, P + j, dS + j, lds);
  }
  for (; j < ncol; j += VS) {
    asm volatile("" : "+r"(K), "+r"(V));
    p_tile<D, 1>(K, D, QsT + j, ldb, lse2 + j, P + j, lds);
    ds_tile<D, 1>(V, D, dOT + j, ldb, delta + j, P + j, dS + j, lds);
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
      p_ds_rows<D>(K + (k0 + g) * D, QsT + qb, V + (k0 + g) * D, dOT + qb, Np, lse2 + qb, delta + qb, PT + g * kBQ,
                   dST + g * kBQ, kBQ, nq);
      for (int r = 0; r < G; ++r) {
        if (k0 + g + r >= N) {  // padded key: no probability, no gradient
          std::fill(PT + (g + r) * kBQ, PT + (g + r) * kBQ + nq, 0.f);
          std::fill(dST + (g + r) * kBQ, dST + (g + r) * kBQ + nq, 0.f);
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
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, what,
              ": qkv must be float32 or bfloat16, got ", qkv.scalar_type());
  const int64_t d = qkv.size(4);
  TORCH_CHECK(d == 16 || d == 32 || d == 64, what, ": head dim (qkv.size(4)) must be 16, 32 or 64, got ", d);
  TORCH_CHECK(qkv.size(1) > 0, what, ": qkv must hold at least one token, got shape ", qkv.sizes());
}

// Packing of one (batch, head): src(n, d) = src[n * ns + d * ds] for n < N (any strides).
// rows: dst (Np, D) row-major; cols: dst (D, Np) (transposed). Rows/columns past N are zero.
void pack_rows(float* dst, const float* src, int64_t ns, int64_t ds, int64_t N, int64_t Np, int64_t D, float scale) {
  for (int64_t n = 0; n < N; ++n) {
    const float* s = src + n * ns;
    float* d = dst + n * D;
    if (ds == 1) {
      for (int64_t j = 0; j < D; j += VS) vstore(d + j, vmul(vload(s + j), vset(scale)));
    } else {
      for (int64_t j = 0; j < D; ++j) d[j] = s[j * ds] * scale;
    }
  }
  std::fill(dst + N * D, dst + Np * D, 0.f);
}

void pack_cols(float* dst, const float* src, int64_t ns, int64_t ds, int64_t N, int64_t Np, int64_t D, float scale) {
  constexpr int64_t kT = 16;  // 16 x D tiles: reads rows, writes 16-wide column runs
  for (int64_t n0 = 0; n0 < N; n0 += kT) {
    const int64_t n1 = std::min(N, n0 + kT);
    for (int64_t j = 0; j < D; ++j)
      for (int64_t n = n0; n < n1; ++n) dst[j * Np + n] = src[n * ns + j * ds] * scale;
  }
  for (int64_t j = 0; j < D; ++j) std::fill(dst + j * Np + N, dst + (j + 1) * Np, 0.f);
}

using cpu::parallel_dynamic;

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
  // One work item per (batch, head, slot): slot s takes the key blocks s, s + S, s + 2S, ... in that order
  // and accumulates their dQ into its own buffer, so neither the buffer a key block lands in nor the order
  // of its additions depends on which thread runs the item: the result is the same run to run.
  const int64_t nslots = dq_tls.size(0);
  parallel_dynamic(B * H * nslots, [&](int64_t it) {
    const int64_t bh = it / nslots, slot = it % nslots, b = bh / H, h = bh % H;
    const int64_t rs = Np * D;
    for (int64_t kb = slot; kb < nkb; kb += nslots) {
      const int64_t k0 = kb * kBK, nk = std::min(kBK, Np - k0);
      float* row = dp + ((b * N + k0) * 3) * H * D + h * D;  // dqkv[b, k0, 0, h, :]
      bwd_item<D>(Qs.const_data_ptr<float>() + bh * rs, QsT.const_data_ptr<float>() + bh * rs,
                  K.const_data_ptr<float>() + bh * rs, V.const_data_ptr<float>() + bh * rs,
                  dO.const_data_ptr<float>() + bh * rs, dOT.const_data_ptr<float>() + bh * rs,
                  lse2.const_data_ptr<float>() + bh * Np, delta.const_data_ptr<float>() + bh * Np, N, Np, k0, nk,
                  row + H * D, row + 2 * H * D, 3 * H * D, dqp + (slot * B * H + bh) * rs);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv) {
  check_qkv(qkv, "attention");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  if (qkv.scalar_type() == at::kBFloat16) {
    // bf16: the tile-unit kernel (attention_amx.cpp) where the CPU and the build have one, else this
    // float32 kernel on an upcast copy, its output rounded to bf16 once.
    auto out = at::empty({B, N, H * D}, qkv.options().memory_format(at::MemoryFormat::Contiguous));
    auto lse2 = at::empty({B, H, N}, qkv.options().dtype(at::kFloat));
    if (attention_fwd_bf16_amx(qkv, out, lse2)) return {out, lse2};
    auto [o32, l32] = attention_fwd_cpu(qkv.to(at::kFloat));
    return {o32.to(at::kBFloat16), l32};
  }
  const int64_t Np = (N + kPad - 1) / kPad * kPad;
  const float qscale = float(double(kLog2e) / std::sqrt(double(D)));
  auto opts = qkv.options().memory_format(at::MemoryFormat::Contiguous);
  auto Qs = at::empty({B, H, Np, D}, opts), Kt = at::empty({B, H, D, Np}, opts), V = at::empty({B, H, Np, D}, opts);
  auto out = at::empty({B, N, H * D}, opts);
  auto lse2 = at::empty({B, H, N}, opts);
  {  // pack Q (scaled), K^T and V of every (batch, head): one parallel region
    const float* src = qkv.const_data_ptr<float>();
    const int64_t s0 = qkv.stride(0), s1 = qkv.stride(1), s2 = qkv.stride(2), s3 = qkv.stride(3), s4 = qkv.stride(4);
    float* qp = Qs.mutable_data_ptr<float>();
    float* kp = Kt.mutable_data_ptr<float>();
    float* vp = V.mutable_data_ptr<float>();
    parallel_dynamic(B * H * 3, [&](int64_t it) {
      const int64_t bh = it / 3, what = it % 3, b = bh / H, h = bh % H;
      const float* base = src + b * s0 + what * s2 + h * s3;
      if (what == 0) pack_rows(qp + bh * Np * D, base, s1, s4, N, Np, D, qscale);
      else if (what == 1) pack_cols(kp + bh * Np * D, base, s1, s4, N, Np, D, 1.f);
      else pack_rows(vp + bh * Np * D, base, s1, s4, N, Np, D, 1.f);
    });
  }
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
  if (qkv.scalar_type() == at::kBFloat16) {
    // bf16: the float32 backward on upcast copies (exact: every bf16 value is a float32), dqkv rounded once.
    TORCH_CHECK(dout.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16,
                "attention backward: dout and out must be bfloat16 like qkv, got ", dout.scalar_type(), " and ",
                out.scalar_type());
    return attention_bwd_cpu(dout.to(at::kFloat), qkv.to(at::kFloat), out.to(at::kFloat), lse2).to(at::kBFloat16);
  }
  TORCH_CHECK(dout.sizes() == at::IntArrayRef({B, N, H * D}) && dout.scalar_type() == at::kFloat && dout.is_cpu(),
              "attention backward: dout must be a float32 CPU tensor of shape (", B, ", ", N, ", ", H * D, "), got ",
              dout.sizes(), " ", dout.scalar_type());
  TORCH_CHECK(out.sizes() == dout.sizes() && out.scalar_type() == at::kFloat, "attention backward: out must have dout's shape");
  TORCH_CHECK(lse2.sizes() == at::IntArrayRef({B, H, N}) && lse2.scalar_type() == at::kFloat,
              "attention backward: lse2 must be float32 of shape (", B, ", ", H, ", ", N, "), got ", lse2.sizes());
  const int64_t Np = (N + kPad - 1) / kPad * kPad;
  const float qscale = float(double(kLog2e) / std::sqrt(double(D)));
  const auto dout_c = dout.contiguous();
  const auto out_c = out.contiguous();
  const auto lse2_c = lse2.contiguous();
  auto opts = qkv.options().memory_format(at::MemoryFormat::Contiguous);
  auto Qs = at::empty({B, H, Np, D}, opts), QsT = at::empty({B, H, D, Np}, opts);
  auto K = at::empty({B, H, Np, D}, opts), V = at::empty({B, H, Np, D}, opts);
  auto dO = at::empty({B, H, Np, D}, opts), dOT = at::empty({B, H, D, Np}, opts);
  auto lse2p = at::empty({B, H, Np}, opts), delta = at::empty({B, H, Np}, opts);
  const int64_t nthreads = at::get_num_threads();  // S: one dQ slot buffer per thread, memory as per-thread ones
  auto dq_tls = at::empty({nthreads, B, H, Np, D}, opts);
  auto dqkv = at::empty({B, N, 3, H, D}, opts);
  const int64_t HD = H * D, rs = Np * D;
  {  // one parallel region packs everything per (batch, head)
    const float* src = qkv.const_data_ptr<float>();
    const int64_t s0 = qkv.stride(0), s1 = qkv.stride(1), s2 = qkv.stride(2), s3 = qkv.stride(3), s4 = qkv.stride(4);
    const float* gp = dout_c.const_data_ptr<float>();
    const float* op = out_c.const_data_ptr<float>();
    const float* lp = lse2_c.const_data_ptr<float>();
    float* dqt = dq_tls.mutable_data_ptr<float>();
    parallel_dynamic(B * H * 7, [&](int64_t it) {
      const int64_t bh = it / 7, what = it % 7, b = bh / H, h = bh % H;
      const float* qkv_bh = src + b * s0 + h * s3;
      const float* g_bh = gp + b * N * HD + h * D;
      switch (what) {
        case 0: pack_rows(Qs.mutable_data_ptr<float>() + bh * rs, qkv_bh, s1, s4, N, Np, D, qscale); break;
        case 1: pack_cols(QsT.mutable_data_ptr<float>() + bh * rs, qkv_bh, s1, s4, N, Np, D, qscale); break;
        case 2: pack_rows(K.mutable_data_ptr<float>() + bh * rs, qkv_bh + s2, s1, s4, N, Np, D, 1.f); break;
        case 3: pack_rows(V.mutable_data_ptr<float>() + bh * rs, qkv_bh + 2 * s2, s1, s4, N, Np, D, 1.f); break;
        case 4: {  // dO rows and delta = rowsum(dO * O)
          pack_rows(dO.mutable_data_ptr<float>() + bh * rs, g_bh, HD, 1, N, Np, D, 1.f);
          float* dl = delta.mutable_data_ptr<float>() + bh * Np;
          const float* o_bh = op + b * N * HD + h * D;
          for (int64_t n = 0; n < N; ++n) {
            VF acc = vset(0.f);
            for (int64_t j = 0; j < D; j += VS) acc = vfma(vload(g_bh + n * HD + j), vload(o_bh + n * HD + j), acc);
            dl[n] = hsum(acc);
          }
          std::fill(dl + N, dl + Np, 0.f);
          break;
        }
        case 5: pack_cols(dOT.mutable_data_ptr<float>() + bh * rs, g_bh, HD, 1, N, Np, D, 1.f); break;
        default: {  // lse2 with +inf on padded queries (their P is 0); zero this head's dQ accumulators
          float* l = lse2p.mutable_data_ptr<float>() + bh * Np;
          std::copy(lp + bh * N, lp + bh * N + N, l);
          std::fill(l + N, l + Np, std::numeric_limits<float>::infinity());
          for (int64_t t = 0; t < nthreads; ++t) std::fill(dqt + (t * B * H + bh) * rs, dqt + (t * B * H + bh + 1) * rs, 0.f);
        }
      }
    });
  }
  switch (D) {
    case 16: bwd_launch<16>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
    case 32: bwd_launch<32>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
    default: bwd_launch<64>(Qs, QsT, K, V, dO, dOT, lse2p, delta, dqkv, dq_tls, B, H, N, Np); break;
  }
  {  // dQ = scale * (sum of the per-thread accumulators), into dqkv[:, :, 0]
    const float dscale = float(1.0 / std::sqrt(double(D)));
    const float* dqt = dq_tls.const_data_ptr<float>();
    float* dp = dqkv.mutable_data_ptr<float>();
    parallel_dynamic(B * H, [&](int64_t bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t n = 0; n < N; ++n) {
        float* row = dp + ((b * N + n) * 3) * HD + h * D;
        for (int64_t j = 0; j < D; j += VS) {
          VF acc = vload(dqt + bh * rs + n * D + j);
          for (int64_t t = 1; t < nthreads; ++t) acc = vadd(acc, vload(dqt + (t * B * H + bh) * rs + n * D + j));
          vstore(row + j, vmul(acc, vset(dscale)));
        }
      }
    });
  }
  return dqkv;
}

}  // namespace fast_unet
