// Pieces the CPU kernels share: a dynamic parallel loop and (AVX-512 builds) the softmax's exp2.
// Include after vec_config.h.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace fast_unet {
namespace cpu {

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

#if defined(CPU_CAPABILITY_AVX512)
// 2^x for x <= 0 (softmax arguments); exactly 0 below 2^-126 and for -inf (no denormals reach the FMAs); NaN
// stays NaN (an unordered compare keeps it, as exp2 in SDPA propagates a NaN score).
// x = n + f, f in [-1/2, 1/2]; 2^f by a degree-5 Chebyshev fit (max rel. error 1.04e-7); 2^n by vscalefps.
inline __m512 vexp2_avx512(__m512 x) {
  const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
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
#endif

}  // namespace cpu
}  // namespace fast_unet
