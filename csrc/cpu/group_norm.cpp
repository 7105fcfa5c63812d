// CPU kernels of the fused GroupNorm(1, C) + ReLU + time-embedding add, forward and backward, NCHW and
// channels_last (NHWC). Activations (x, y, dy, dx) in float32 or bfloat16; parameters, embedding and statistics
// read and computed in float32 (bf16 values widened on load, results rounded to nearest even once on store). One sample's C*H*W elements are contiguous in both layouts, so the
// statistics are layout-blind; the per-channel parts have one loop per layout.
#include "vec_config.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace fast_unet {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kStatChunk = 16384;  // elements per partial sum (float lanes, then double)
// Fewest elements worth a parallel chunk: below it at::parallel_for runs inline, with no thread barrier
// (a barrier costs more than the work when another process holds the other core).
constexpr int64_t kGrain = 65536;

inline int64_t grain(int64_t elems_per_item) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(elems_per_item, 1)); }

inline float hsum(const Vec& v) {
  alignas(64) float tmp[kVec];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kVec; ++i) s += tmp[i];
  return s;
}

// Loads kVec activations as float32, stores float32 as kVec activations.
inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline void store_f(float* p, const Vec& v) { v.store(p); }
inline Vec load_f(const at::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16)));
#else
  alignas(64) float t[kVec];
  for (int64_t i = 0; i < kVec; ++i) t[i] = float(p[i]);
  return Vec::loadu(t);
#endif
}
inline void store_f(at::BFloat16* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(__m512(v)));
#else
  alignas(64) float t[kVec];
  v.store(t);
  for (int64_t i = 0; i < kVec; ++i) p[i] = at::BFloat16(t[i]);  // round to nearest even, NaN kept
#endif
}

// A (C,) or (B, C) tensor as contiguous float32.
inline at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

bool is_nhwc(const at::Tensor& x) {
  // A tensor with C == 1 or H*W == 1 is both; the NCHW loops handle it.
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_fwd(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& emb_opt,
    double eps) {
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = C * HW;
  auto y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  auto mean = at::empty({B}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({B}, x.options().dtype(at::kFloat));
  const at::Tensor w = as_f32(weight), b = as_f32(bias);
  at::Tensor emb;
  if (emb_opt.has_value() && emb_opt->defined()) emb = as_f32(*emb_opt);
  const T* xp = x.const_data_ptr<T>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* ep = emb.defined() ? emb.const_data_ptr<float>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();

  // 1. statistics: shifted sums (shift = the sample's first element) per chunk, combined in double.
  const int64_t nchunk = (M + kStatChunk - 1) / kStatChunk;
  std::vector<double> s1(B * nchunk), s2(B * nchunk);
  at::parallel_for(0, B * nchunk, grain(kStatChunk), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / nchunk, ci = i % nchunk;
      const T* p = xp + bi * M;
      const Vec shift = Vec(float(p[0]));
      const int64_t lo = ci * kStatChunk, hi = std::min(M, lo + kStatChunk);
      Vec a1(0.f), a2(0.f);
      int64_t j = lo;
      for (; j + kVec <= hi; j += kVec) {
        Vec d = load_f(p + j) - shift;
        a1 = a1 + d;
        a2 = at::vec::fmadd(d, d, a2);
      }
      double t1 = hsum(a1), t2 = hsum(a2);
      for (; j < hi; ++j) {
        double d = double(float(p[j])) - double(float(p[0]));
        t1 += d;
        t2 += d * d;
      }
      s1[i] = t1;
      s2[i] = t2;
    }
  });
  std::vector<float> scale(B * C), shift(B * C);  // y = relu(x * scale + shift) + emb
  float* mp = mean.mutable_data_ptr<float>();
  float* rp = rstd.mutable_data_ptr<float>();
  for (int64_t bi = 0; bi < B; ++bi) {
    double t1 = 0, t2 = 0;
    for (int64_t ci = 0; ci < nchunk; ++ci) {
      t1 += s1[bi * nchunk + ci];
      t2 += s2[bi * nchunk + ci];
    }
    const double dm = t1 / double(M);
    const double var = std::max(t2 / double(M) - dm * dm, 0.0);
    const double mu = double(float(xp[bi * M])) + dm;
    const double r = 1.0 / std::sqrt(var + eps);
    mp[bi] = float(mu);
    rp[bi] = float(r);
    for (int64_t c = 0; c < C; ++c) {
      const float a = float(r * wp[c]);
      scale[bi * C + c] = a;
      shift[bi * C + c] = bp[c] - float(mu) * a;
    }
  }

  // 2. normalise, affine, ReLU, embedding.
  const Vec zero(0.f);
  if (nhwc) {
    std::vector<float> zeros(ep ? 0 : C, 0.f);
    const int64_t rows = B * HW;
    at::parallel_for(0, rows, grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bi = r / HW;
        const float* sc = scale.data() + bi * C;
        const float* sh = shift.data() + bi * C;
        const float* e = ep ? ep + bi * C : zeros.data();
        const T* xr = xp + r * C;
        T* yr = yp + r * C;
        int64_t c = 0;
        for (; c + kVec <= C; c += kVec) {
          Vec v = at::vec::fmadd(load_f(xr + c), Vec::loadu(sc + c), Vec::loadu(sh + c));
          store_f(yr + c, at::vec::maximum(v, zero) + Vec::loadu(e + c));
        }
        for (; c < C; ++c) yr[c] = std::max(float(xr[c]) * sc[c] + sh[c], 0.f) + e[c];
      }
    });
  } else {
    at::parallel_for(0, B * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const float a = scale[pc], s = shift[pc], e = ep ? ep[pc] : 0.f;
        const Vec av(a), sv(s), ev(e);
        const T* xr = xp + pc * HW;
        T* yr = yp + pc * HW;
        int64_t j = 0;
        for (; j + kVec <= HW; j += kVec)
          store_f(yr + j, at::vec::maximum(at::vec::fmadd(load_f(xr + j), av, sv), zero) + ev);
        for (; j < HW; ++j) yr[j] = std::max(float(xr[j]) * a + s, 0.f) + e;
      }
    });
  }
  return {y, mean, rstd};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb) {
  const int64_t B = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), M = C * HW;
  TORCH_CHECK(mean.numel() == B && rstd.numel() == B && mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "group_norm_relu backward: mean and rstd must be float32 of ", B, " elements");
  const bool nhwc = is_nhwc(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt), dy = dy_in.contiguous(fmt);
  const at::Tensor w = as_f32(weight), b = as_f32(bias);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const T* xp = x.const_data_ptr<T>();
  const T* gp = dy.const_data_ptr<T>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* mp = mean_c.const_data_ptr<float>();
  const float* rp = rstd_c.const_data_ptr<float>();
  auto dx = at::empty_like(x, fmt);
  T* dxp = dx.mutable_data_ptr<T>();

  // Per-sample affine of the forward: z = x * sc[c] + sh[c]; xhat = (x - mean) * rstd.
  std::vector<float> sc(B * C), sh(B * C);
  for (int64_t bi = 0; bi < B; ++bi)
    for (int64_t c = 0; c < C; ++c) {
      sc[bi * C + c] = rp[bi] * wp[c];
      sh[bi * C + c] = bp[c] - mp[bi] * sc[bi * C + c];
    }
  // 1. per (sample, channel): sum dy, sum dz, sum dz * xhat, with dz = threshold_backward(dy, z, 0): dy
  // unless z <= 0 (NaN passes, as in PyTorch's ReLU backward). The forward's ReLU keeps NaN too
  // (at::vec::maximum propagates it; std::max(NaN, 0.f) returns the NaN).
  std::vector<double> sdy(B * C, 0.0), sdz(B * C, 0.0), sdzx(B * C, 0.0);
  const Vec zero(0.f);
  if (nhwc) {
    const int64_t rows_per_chunk = std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1));
    const int64_t nchunk = (HW + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<float> part(B * nchunk * 3 * C);
    at::parallel_for(0, B * nchunk, grain(rows_per_chunk * C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / nchunk, ci = i % nchunk;
        const int64_t r0 = ci * rows_per_chunk, r1 = std::min(HW, r0 + rows_per_chunk);
        float* a_dy = part.data() + i * 3 * C;
        float* a_dz = a_dy + C;
        float* a_dzx = a_dz + C;
        std::fill(a_dy, a_dy + 3 * C, 0.f);
        const float* scb = sc.data() + bi * C;
        const float* shb = sh.data() + bi * C;
        const Vec mv(mp[bi]), rv(rp[bi]);
        for (int64_t r = r0; r < r1; ++r) {
          const T* xr = xp + (bi * HW + r) * C;
          const T* gr = gp + (bi * HW + r) * C;
          int64_t c = 0;
          for (; c + kVec <= C; c += kVec) {
            Vec xv = load_f(xr + c), g = load_f(gr + c);
            Vec z = at::vec::fmadd(xv, Vec::loadu(scb + c), Vec::loadu(shb + c));
            Vec dz = Vec::blendv(g, zero, z <= zero);
            Vec xh = (xv - mv) * rv;
            (Vec::loadu(a_dy + c) + g).store(a_dy + c);
            (Vec::loadu(a_dz + c) + dz).store(a_dz + c);
            at::vec::fmadd(dz, xh, Vec::loadu(a_dzx + c)).store(a_dzx + c);
          }
          for (; c < C; ++c) {
            const float xc = float(xr[c]), gc = float(gr[c]);
            const float z = xc * scb[c] + shb[c];
            const float dz = z <= 0.f ? 0.f : gc;
            a_dy[c] += gc;
            a_dz[c] += dz;
            a_dzx[c] += dz * (xc - mp[bi]) * rp[bi];
          }
        }
      }
    });
    for (int64_t bi = 0; bi < B; ++bi)
      for (int64_t ci = 0; ci < nchunk; ++ci) {
        const float* a = part.data() + (bi * nchunk + ci) * 3 * C;
        for (int64_t c = 0; c < C; ++c) {
          sdy[bi * C + c] += a[c];
          sdz[bi * C + c] += a[C + c];
          sdzx[bi * C + c] += a[2 * C + c];
        }
      }
  } else {
    at::parallel_for(0, B * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const int64_t bi = pc / C;
        const T* xr = xp + pc * HW;
        const T* gr = gp + pc * HW;
        const Vec scv(sc[pc]), shv(sh[pc]), mv(mp[bi]), rv(rp[bi]);
        Vec a_dy(0.f), a_dz(0.f), a_dzx(0.f);
        int64_t j = 0;
        for (; j + kVec <= HW; j += kVec) {
          Vec xv = load_f(xr + j), g = load_f(gr + j);
          Vec dz = Vec::blendv(g, zero, at::vec::fmadd(xv, scv, shv) <= zero);
          a_dy = a_dy + g;
          a_dz = a_dz + dz;
          a_dzx = at::vec::fmadd(dz, (xv - mv) * rv, a_dzx);
        }
        double t_dy = hsum(a_dy), t_dz = hsum(a_dz), t_dzx = hsum(a_dzx);
        for (; j < HW; ++j) {
          const float xj = float(xr[j]), gj = float(gr[j]);
          const float dz = xj * sc[pc] + sh[pc] <= 0.f ? 0.f : gj;
          t_dy += gj;
          t_dz += dz;
          t_dzx += dz * (xj - mp[bi]) * rp[bi];
        }
        sdy[pc] = t_dy;
        sdz[pc] = t_dz;
        sdzx[pc] = t_dzx;
      }
    });
  }

  // 2. parameter and embedding gradients; per-sample terms of dx.
  auto dw = at::zeros({C}, w.options().dtype(at::kFloat));
  auto db = at::zeros({C}, w.options().dtype(at::kFloat));
  at::Tensor demb;
  if (has_emb) demb = at::empty({B, C}, x.options().dtype(at::kFloat));
  float* dwp = dw.mutable_data_ptr<float>();
  float* dbp = db.mutable_data_ptr<float>();
  std::vector<float> k1(B), k2(B);  // dx = rstd * (dz * w - k1 - xhat * k2)
  for (int64_t bi = 0; bi < B; ++bi) {
    double t1 = 0, t2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = bi * C + c;
      t1 += double(wp[c]) * sdz[i];
      t2 += double(wp[c]) * sdzx[i];
      dwp[c] += float(sdzx[i]);
      dbp[c] += float(sdz[i]);
      if (has_emb) demb.mutable_data_ptr<float>()[i] = float(sdy[i]);
    }
    k1[bi] = float(t1 / double(M));
    k2[bi] = float(t2 / double(M));
  }

  // 3. dx.
  if (nhwc) {
    const int64_t rows = B * HW;
    at::parallel_for(0, rows, grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bi = r / HW;
        const float* scb = sc.data() + bi * C;
        const float* shb = sh.data() + bi * C;
        const T* xr = xp + r * C;
        const T* gr = gp + r * C;
        T* dr = dxp + r * C;
        const float m = mp[bi], rs = rp[bi], c1 = k1[bi], c2 = k2[bi];
        const Vec mv(m), rv(rs), c1v(c1), c2v(c2);
        int64_t c = 0;
        for (; c + kVec <= C; c += kVec) {
          Vec xv = load_f(xr + c);
          Vec z = at::vec::fmadd(xv, Vec::loadu(scb + c), Vec::loadu(shb + c));
          Vec dz = Vec::blendv(load_f(gr + c), zero, z <= zero);
          Vec xh = (xv - mv) * rv;
          store_f(dr + c, rv * (dz * Vec::loadu(wp + c) - c1v - xh * c2v));
        }
        for (; c < C; ++c) {
          const float xc = float(xr[c]);
          const float dz = xc * scb[c] + shb[c] <= 0.f ? 0.f : float(gr[c]);
          dr[c] = rs * (dz * wp[c] - c1 - (xc - m) * rs * c2);
        }
      }
    });
  } else {
    at::parallel_for(0, B * C, grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t pc = begin; pc < end; ++pc) {
        const int64_t bi = pc / C, c = pc % C;
        const float m = mp[bi], rs = rp[bi], c1 = k1[bi], c2 = k2[bi], wc = wp[c];
        const Vec mv(m), rv(rs), c1v(c1), c2v(c2), wv(wc), scv(sc[pc]), shv(sh[pc]);
        const T* xr = xp + pc * HW;
        const T* gr = gp + pc * HW;
        T* dr = dxp + pc * HW;
        int64_t j = 0;
        for (; j + kVec <= HW; j += kVec) {
          Vec xv = load_f(xr + j);
          Vec dz = Vec::blendv(load_f(gr + j), zero, at::vec::fmadd(xv, scv, shv) <= zero);
          store_f(dr + j, rv * (dz * wv - c1v - (xv - mv) * rv * c2v));
        }
        for (; j < HW; ++j) {
          const float xj = float(xr[j]);
          const float dz = xj * sc[pc] + sh[pc] <= 0.f ? 0.f : float(gr[j]);
          dr[j] = rs * (dz * wc - c1 - (xj - m) * rs * c2);
        }
      }
    });
  }
  return {dx, dw, db, demb};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_relu_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& emb,
    double eps) {
  check_gn_args(x, weight, bias, emb);
  if (x.scalar_type() == at::kBFloat16) return gn_fwd<at::BFloat16>(x, weight, bias, emb, eps);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "group_norm_relu (CPU): x must be float32 or bfloat16, got ", x.scalar_type());
  return gn_fwd<float>(x, weight, bias, emb, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_relu_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb) {
  check_gn_args(x, weight, bias, std::nullopt);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "group_norm_relu backward (CPU): x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_relu backward: dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "group_norm_relu backward: dy must have x's dtype ", x.scalar_type(),
              ", got ", dy.scalar_type());
  if (x.scalar_type() == at::kBFloat16) return gn_bwd<at::BFloat16>(dy, x, weight, bias, mean, rstd, has_emb);
  return gn_bwd<float>(dy, x, weight, bias, mean, rstd, has_emb);
}

}  // namespace fast_unet
