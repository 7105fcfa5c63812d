// CPU flash attention forward in bfloat16 on AMX tiles (Intel Sapphire Rapids and later), head dims 16/32/64.
//
// Same contract as the float32 kernel in attention.cpp (reads the packed QKV projection (B, N, 3, heads, d)
// through its strides, writes (B, N, heads * d) and lse2 (B, heads, N) float32), with bf16 inputs and output.
// One work item = one (batch, head, 64-query block), taken 16 queries at a time, transposed so that each
// query is one AVX-512 lane; for each block of 64 keys:
//   S^T (64 x 16, float32) = K (64 x d, bf16) Q^T  on the tile unit (TDPBF16PS, float32 accumulation),
//   online softmax in float32 on AVX-512, vertical in the lanes (exp2 polynomial; the scale 1/sqrt(d) * log2(e)
//   is applied to S in float32, so Q is never rounded after scaling); P^T rounded to bf16 (nearest even) for
//   O^T_blk (d x 16, float32) = V^T (d x 64, bf16) P^T  on the tile unit, then O^T = O^T * alpha + O^T_blk.
// The sums l use the float32 P, the output O / l is rounded to bf16 once. Keys are padded to a multiple of 64
// in the packed copies; padded keys get P = 0.
// The tile unit needs the OS's permission (Linux: arch_prctl ARCH_REQ_XCOMP_PERM) and the CPU's AMX-BF16;
// without either, or in a build without -mamx-bf16 (FAST_UNET_CPU_ARCH), the entry returns false and the
// caller runs the float32 kernel on an upcast copy (as it does with FAST_UNET_CPU_AMX=0).
#include "vec_config.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>

#include "cpu/cpu_common.h"
#include "ops.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#define FAST_UNET_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fast_unet {

#ifdef FAST_UNET_AMX
namespace {

constexpr int64_t kKB = 64;  // keys per block (4 S tiles of 16 keys)
constexpr int64_t kQB = 64;  // queries per work item (4 groups of 16 rows)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: float32 accumulators (16 x 16); tmm4: K rows (16 keys x min(d, 32) bf16); tmm5: V^T rows (16
// features x 32 keys bf16); tmm6: Q^T in pairs (min(d, 32) / 2 rows x 16 queries x 2); tmm7: P^T in key pairs
// (16 rows x 16 queries x 2).
template <int D>
void config_tiles() {
  constexpr int KD = D < 32 ? D : 32;
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = 16, cfg.colsb[4] = KD * 2;
  cfg.rows[5] = 16, cfg.colsb[5] = 64;
  cfg.rows[6] = KD / 2, cfg.colsb[6] = 64;
  cfg.rows[7] = 16, cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
}

using cpu::parallel_dynamic;
inline __m512 vexp2(__m512 x) { return cpu::vexp2_avx512(x); }  // csrc/cpu/cpu_common.h

// One work item: queries [q0, q0 + rows) of one (batch, head), in chunks of 16 queries held one per vector lane,
// so the softmax's max, sum and rescale are plain vertical operations (no horizontal reductions, no scalars).
// K: (Np, D) bf16 rows; Qp: Q^T in 16-query chunks, each (D/2) x 16 x 2; VT: (D, Np) bf16.
// Per key block: S^T (64 keys x 16 queries) = K Q^T; P^T = 2^(S^T * c - m); O^T (D x 16) += V^T P^T.
template <int D>
void fwd_item(const uint16_t* K, const uint16_t* Qp, const uint16_t* VT, int64_t N, int64_t Np, int64_t q0,
              int64_t rows, uint16_t* out, int64_t ostride, float* lse2, float c) {
  constexpr int KD = D < 32 ? D : 32;
  constexpr int NT = D / 16;  // output feature tiles
  constexpr int64_t NG = kQB / 16;
  alignas(64) float ST[kKB * 16];
  alignas(64) uint16_t PT[kKB * 16];   // (kKB / 2) key pairs x 16 queries x 2
  alignas(64) float Ob[D * 16];
  alignas(64) float OT[NG * D * 16];
  __m512 m[NG], l[NG];
  const int64_t ng = (rows + 15) / 16;
  for (int64_t g = 0; g < ng; ++g) {
    m[g] = _mm512_set1_ps(kNegInf);
    l[g] = _mm512_setzero_ps();
  }
  std::fill(OT, OT + ng * D * 16, 0.f);
  const __m512 cv = _mm512_set1_ps(c);
  // Interleaves two rows of 16 bf16 (keys 2k, 2k + 1) into the tile unit's pair layout.
  const __m512i pair_idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                            23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  config_tiles<D>();
  for (int64_t kb = 0; kb < Np; kb += kKB) {
    const int64_t valid = std::min<int64_t>(kKB, N - kb);
    const uint16_t* Kb = K + kb * D;
    for (int64_t g = 0; g < ng; ++g) {
      const uint16_t* Qg = Qp + (q0 + g * 16) * D;  // chunk (q0 / 16 + g): (D/2) x 32 elements
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
#pragma GCC unroll 2
      for (int ks = 0; ks < D; ks += KD) {
        _tile_loadd(6, Qg + (ks / 2) * 32, 64);
        _tile_loadd(4, Kb + ks, D * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(4, Kb + 16 * D + ks, D * 2);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(4, Kb + 32 * D + ks, D * 2);
        _tile_dpbf16ps(2, 4, 6);
        _tile_loadd(4, Kb + 48 * D + ks, D * 2);
        _tile_dpbf16ps(3, 4, 6);
      }
      _tile_stored(0, ST, 64);
      _tile_stored(1, ST + 256, 64);
      _tile_stored(2, ST + 512, 64);
      _tile_stored(3, ST + 768, 64);
      __m512 mx0 = _mm512_set1_ps(kNegInf), mx1 = mx0;
      int64_t j = 0;
      for (; j + 2 <= valid; j += 2) {
        mx0 = _mm512_max_ps(mx0, _mm512_load_ps(ST + j * 16));
        mx1 = _mm512_max_ps(mx1, _mm512_load_ps(ST + j * 16 + 16));
      }
      if (j < valid) mx0 = _mm512_max_ps(mx0, _mm512_load_ps(ST + j * 16));
      // max_ps returns its second operand when either is NaN: a NaN block max reaches m (and l, the output).
      const __m512 mnew = _mm512_max_ps(m[g], _mm512_mul_ps(_mm512_max_ps(mx0, mx1), cv));
      const __m512 alpha = vexp2(_mm512_sub_ps(m[g], mnew));  // 0 on the first block (m = -inf)
      const __m512 nm = _mm512_sub_ps(_mm512_setzero_ps(), mnew);
      __m512 s0 = _mm512_setzero_ps(), s1 = s0;
      for (j = 0; j + 2 <= valid; j += 2) {
        const __m512 p0 = vexp2(_mm512_fmadd_ps(_mm512_load_ps(ST + j * 16), cv, nm));
        const __m512 p1 = vexp2(_mm512_fmadd_ps(_mm512_load_ps(ST + j * 16 + 16), cv, nm));
        s0 = _mm512_add_ps(s0, p0);
        s1 = _mm512_add_ps(s1, p1);
        _mm512_store_si512(PT + j * 16, _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
      }
      if (j < valid) {  // an odd last key: its pair partner is padding, P = 0
        const __m512 p0 = vexp2(_mm512_fmadd_ps(_mm512_load_ps(ST + j * 16), cv, nm));
        s0 = _mm512_add_ps(s0, p0);
        _mm512_store_si512(PT + j * 16,
                           _mm512_permutexvar_epi16(pair_idx, (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), p0)));
        j += 2;
      }
      for (; j < kKB; j += 2) _mm512_store_si512(PT + j * 16, _mm512_setzero_si512());
      l[g] = _mm512_fmadd_ps(l[g], alpha, _mm512_add_ps(s0, s1));
      m[g] = mnew;
      _tile_zero(0);
      if constexpr (NT > 1) _tile_zero(1);
      if constexpr (NT > 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
#pragma GCC unroll 2
      for (int ks = 0; ks < 2; ++ks) {  // 2 x 32 keys
        _tile_loadd(7, PT + ks * 16 * 32, 64);
        const uint16_t* vt = VT + kb + ks * 32;
        _tile_loadd(5, vt, Np * 2);
        _tile_dpbf16ps(0, 5, 7);
        if constexpr (NT > 1) {
          _tile_loadd(5, vt + 16 * Np, Np * 2);
          _tile_dpbf16ps(1, 5, 7);
        }
        if constexpr (NT > 2) {
          _tile_loadd(5, vt + 32 * Np, Np * 2);
          _tile_dpbf16ps(2, 5, 7);
          _tile_loadd(5, vt + 48 * Np, Np * 2);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, Ob, 64);
      if constexpr (NT > 1) _tile_stored(1, Ob + 256, 64);
      if constexpr (NT > 2) {
        _tile_stored(2, Ob + 512, 64);
        _tile_stored(3, Ob + 768, 64);
      }
      float* o = OT + g * D * 16;
#pragma GCC unroll 8
      for (int f = 0; f < D; ++f)
        _mm512_store_ps(o + f * 16, _mm512_fmadd_ps(_mm512_load_ps(o + f * 16), alpha, _mm512_load_ps(Ob + f * 16)));
    }
  }
  _tile_release();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t nq = std::min<int64_t>(16, std::min(rows, N - q0) - g * 16);
    if (nq <= 0) break;
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l[g]);
    float* o = OT + g * D * 16;
    for (int f = 0; f < D; ++f) _mm512_store_ps(o + f * 16, _mm512_mul_ps(_mm512_load_ps(o + f * 16), inv));
    for (int64_t q = 0; q < nq; ++q) {
      uint16_t* orow = out + (g * 16 + q) * ostride;
      for (int f = 0; f < D; ++f) orow[f] = c10::BFloat16(o[f * 16 + q]).x;
    }
    alignas(64) float lg[16], mg[16];
    _mm512_store_ps(lg, l[g]);
    _mm512_store_ps(mg, m[g]);
    for (int64_t q = 0; q < nq; ++q) lse2[g * 16 + q] = mg[q] + std::log2(lg[q]);
  }
}

template <int D>
void fwd_launch(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, uint16_t* op, float* lp, int64_t B,
                int64_t H, int64_t N, int64_t Np, float c) {
  const int64_t nqb = (N + kQB - 1) / kQB;
  parallel_dynamic(B * H * nqb, [&](int64_t it) {
    const int64_t bh = it / nqb, q0 = (it % nqb) * kQB, b = bh / H, h = bh % H;
    const int64_t rows = std::min(kQB, N - q0);
    fwd_item<D>(kp + bh * Np * D, qp + bh * Np * D, vp + bh * Np * D, N, Np, q0, rows,
                op + (b * N + q0) * H * D + h * D, H * D, lp + bh * N + q0, c);
  });
}

bool amx_usable() {
  static bool ok = false;
  static std::once_flag once;
  std::call_once(once, [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool tile = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) && (d & (1u << 24));
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    const bool avx512bf16 = __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5));
    if (tile && avx512bf16) {
      constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }
  });
  return ok;
}

// FAST_UNET_CPU_AMX=0 turns the tile unit off (read at each call): the float32 kernel on an upcast copy runs.
bool amx_wanted() {
  const char* e = std::getenv("FAST_UNET_CPU_AMX");
  return !(e && e[0] == '0' && e[1] == '\0');
}

}  // namespace

bool attention_amx_available() { return amx_usable() && amx_wanted(); }

bool attention_fwd_bf16_amx(const at::Tensor& qkv, at::Tensor& out, at::Tensor& lse2) {
  if (!attention_amx_available()) return false;
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  const int64_t Np = (N + kKB - 1) / kKB * kKB;
  auto opts = qkv.options().memory_format(at::MemoryFormat::Contiguous);
  auto Qb = at::empty({B, H, Np, D}, opts), Kb = at::empty({B, H, Np, D}, opts), Vb = at::empty({B, H, Np, D}, opts);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(qkv.const_data_ptr<at::BFloat16>());
  uint16_t* qp = reinterpret_cast<uint16_t*>(Qb.mutable_data_ptr<at::BFloat16>());
  uint16_t* kp = reinterpret_cast<uint16_t*>(Kb.mutable_data_ptr<at::BFloat16>());
  uint16_t* vp = reinterpret_cast<uint16_t*>(Vb.mutable_data_ptr<at::BFloat16>());
  const int64_t s0 = qkv.stride(0), s1 = qkv.stride(1), s2 = qkv.stride(2), s3 = qkv.stride(3), s4 = qkv.stride(4);
  // Pack per (batch, head): Q^T in 16-query chunks of (D/2) x 16 x 2 (the tile unit's pair layout), K rows,
  // V^T. Element (n, j) of Q/K/V: src[b*s0 + n*s1 + what*s2 + h*s3 + j*s4]. Padding (n >= N) is zero.
  parallel_dynamic(B * H * 3, [&](int64_t it) {
    const int64_t bh = it / 3, what = it % 3, b = bh / H, h = bh % H;
    const uint16_t* base = src + b * s0 + what * s2 + h * s3;
    uint16_t* dst = (what == 0 ? qp : what == 1 ? kp : vp) + bh * Np * D;
    if (what == 0) {  // chunk n/16, pair j/2, query n%16, half j%2
      std::fill(dst + (N / 16) * 16 * D, dst + Np * D, uint16_t(0));
      for (int64_t n = 0; n < N; ++n) {
        uint16_t* ch = dst + (n / 16) * 16 * D + (n % 16) * 2;
        for (int64_t j = 0; j < D; ++j) ch[(j / 2) * 32 + (j % 2)] = base[n * s1 + j * s4];
      }
    } else if (what == 1) {
      std::fill(dst + N * D, dst + Np * D, uint16_t(0));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < D; ++j) dst[n * D + j] = base[n * s1 + j * s4];
    } else {
      for (int64_t j = 0; j < D; ++j) {
        for (int64_t n = 0; n < N; ++n) dst[j * Np + n] = base[n * s1 + j * s4];
        std::fill(dst + j * Np + N, dst + (j + 1) * Np, uint16_t(0));
      }
    }
  });
  const float c = float(double(kLog2e) / std::sqrt(double(D)));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
  float* lp = lse2.mutable_data_ptr<float>();
  switch (D) {
    case 16: fwd_launch<16>(qp, kp, vp, op, lp, B, H, N, Np, c); break;
    case 32: fwd_launch<32>(qp, kp, vp, op, lp, B, H, N, Np, c); break;
    default: fwd_launch<64>(qp, kp, vp, op, lp, B, H, N, Np, c); break;
  }
  return true;
}

#else  // no AMX in this build

bool attention_amx_available() { return false; }
bool attention_fwd_bf16_amx(const at::Tensor&, at::Tensor&, at::Tensor&) { return false; }

#endif

}  // namespace fast_unet
