// CUDA kernels of the fused GroupNorm(1, C) + ReLU + time-embedding add, forward and backward.
// x, y, dy, weight, bias, emb in float32, bfloat16 or float16; all arithmetic and statistics in float32.
// NCHW-contiguous or channels_last (NHWC). One sample's C*H*W elements are contiguous in both layouts.
//
// Forward, two launches:
//   gn_stats:  grid (blocks_per_sample, B): shifted sum and sum of squares of a slice, 16-byte loads
//              -> partials (B, blocks_per_sample, 2);
//   gn_apply:  grid (blocks, B): every block folds the sample's partials into mean/rstd (a few dozen
//              floats), then y = relu(x * rstd * w[c] + (b[c] - mean * rstd * w[c])) + emb[b, c], 16-byte
//              loads/stores where the layout allows (NHWC: C % VEC == 0; NCHW: HW % VEC == 0).
// Backward, four launches:
//   gn_bwd_reduce_{nhwc,nchw}: per (sample, channel) sums of dy, dz and dz * xhat (dz = dy unless z <= 0: NaN passes, as in PyTorch),
//              NHWC over row slices (partials), NCHW one plane per block;
//   gn_bwd_sample:  per sample: demb, and k1 = sum_c w dz / M, k2 = sum_c w dz xhat / M;
//   gn_bwd_param:   dweight, dbias (sums over samples);
//   gn_bwd_dx:      dx = rstd * (dz * w[c] - k1 - xhat * k2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops.h"

namespace fast_unet {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block of up to 3 values; result valid in thread 0. `sh` holds 3 * 32 floats.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarp = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sh[k * 32 + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float t = lane < nwarp ? sh[k * 32 + lane] : 0.f;
      v[k] = warp_sum(t);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_stats(const T* __restrict__ x, int64_t M, float* __restrict__ partial) {
  __shared__ float sh[3 * 32];
  const int b = blockIdx.y, nblk = gridDim.x;
  const T* xs = x + b * M;
  const float shift = to_f(xs[0]);
  const int64_t nvec = M / VEC;
  const int64_t per = (nvec + nblk - 1) / nblk;
  const int64_t lo = blockIdx.x * per, hi = min(nvec, lo + per);
  float s[2] = {0.f, 0.f};
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(xs)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_f(p.v[k]) - shift;
      s[0] += d;
      s[1] = fmaf(d, d, s[1]);
    }
  }
  block_sum<2>(s, sh);
  if (threadIdx.x == 0) {
    partial[(b * nblk + blockIdx.x) * 2 + 0] = s[0];
    partial[(b * nblk + blockIdx.x) * 2 + 1] = s[1];
  }
}

// mean and rstd of sample b from its partials (every thread gets them).
__device__ __forceinline__ void sample_stats(const float* __restrict__ partial, int nblk, int b, float shift, int64_t M,
                                             float eps, float& mean, float& rstd, float* sh) {
  float s[2] = {0.f, 0.f};
  for (int i = threadIdx.x; i < nblk; i += blockDim.x) {
    s[0] += partial[(b * nblk + i) * 2];
    s[1] += partial[(b * nblk + i) * 2 + 1];
  }
  block_sum<2>(s, sh);
  __shared__ float st[2];
  if (threadIdx.x == 0) {
    const float dm = s[0] / float(M);
    const float v = s[1] / float(M) - dm * dm;
    const float var = v < 0.f ? 0.f : v;  // NaN stays NaN (fmaxf would drop it)
    st[0] = shift + dm;
    st[1] = rsqrtf(var + eps);
  }
  __syncthreads();
  mean = st[0];
  rstd = st[1];
}

template <typename T, int VEC, bool NHWC>
__global__ void __launch_bounds__(kThreads) gn_apply(const T* __restrict__ x, const T* __restrict__ w,
                                                     const T* __restrict__ bias, const T* __restrict__ emb,
                                                     const float* __restrict__ partial, int nstat, int64_t C, int64_t HW,
                                                     float eps, T* __restrict__ y, float* __restrict__ mean_out,
                                                     float* __restrict__ rstd_out) {
  __shared__ float sh[3 * 32];
  const int b = blockIdx.y;
  const int64_t M = C * HW;
  const T* xs = x + b * M;
  T* ys = y + b * M;
  float mean, rstd;
  sample_stats(partial, nstat, b, to_f(xs[0]), M, eps, mean, rstd, sh);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    mean_out[b] = mean;
    rstd_out[b] = rstd;
  }
  const int64_t nvec = M / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nvec; i += int64_t(gridDim.x) * blockDim.x) {
    const Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(xs)[i];
    Pack<T, VEC> o;
    const int64_t e0 = i * VEC;
    // NHWC: C % VEC == 0, so a pack holds channels c0 .. c0 + VEC - 1; NCHW: HW % VEC == 0, one channel.
    const int64_t c0 = NHWC ? e0 % C : e0 / HW;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      const float sc = rstd * to_f(w[c]);
      const float z = fmaf(to_f(p.v[k]), sc, to_f(bias[c]) - mean * sc);
      o.v[k] = from_f<T>((z <= 0.f ? 0.f : z) + (emb ? to_f(emb[b * C + c]) : 0.f));  // ReLU keeping NaN
    }
    reinterpret_cast<Pack<T, VEC>*>(ys)[i] = o;
  }
}

// ---- backward ---------------------------------------------------------------------------------------

// NHWC: block (chunk, b) sums rows [r0, r1) for every channel. Threads: tc = channel lane (TC of them),
// tr = row lane. Output partial (B, nchunk, 3, C): sums of dy, dz, dz * xhat.
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_bwd_reduce_nhwc(const T* __restrict__ dy, const T* __restrict__ x,
                                                               const T* __restrict__ w, const T* __restrict__ bias,
                                                               const float* __restrict__ mean,
                                                               const float* __restrict__ rstd, int64_t C, int64_t HW,
                                                               int64_t rows_per_chunk, float* __restrict__ partial) {
  __shared__ float sh[3 * kThreads];
  const int b = blockIdx.y, nchunk = gridDim.x;
  const int TC = C < kThreads ? int(C) : kThreads;
  const int TR = kThreads / TC;
  const int tc = threadIdx.x % TC, tr = threadIdx.x / TC;
  const int64_t r0 = blockIdx.x * rows_per_chunk, r1 = min(HW, r0 + rows_per_chunk);
  const float m = mean[b], rs = rstd[b];
  for (int64_t base = 0; base < C; base += TC) {  // same trip count in every thread (barriers inside)
    const int64_t c = base + tc;
    const bool active = tr < TR && c < C;
    float a_dy = 0.f, a_dz = 0.f, a_dzx = 0.f;
    if (active) {
      const float sc = rs * to_f(w[c]), shf = to_f(bias[c]) - m * sc;
      for (int64_t r = r0 + tr; r < r1; r += TR) {
        const int64_t idx = (b * HW + r) * C + c;
        const float xv = to_f(x[idx]), g = to_f(dy[idx]);
        const float dz = fmaf(xv, sc, shf) <= 0.f ? 0.f : g  /* threshold_backward: NaN passes */;
        a_dy += g;
        a_dz += dz;
        a_dzx = fmaf(dz, (xv - m) * rs, a_dzx);
      }
    }
    __syncthreads();
    sh[threadIdx.x] = a_dy;
    sh[kThreads + threadIdx.x] = a_dz;
    sh[2 * kThreads + threadIdx.x] = a_dzx;
    __syncthreads();
    if (tr == 0 && c < C) {
      for (int j = 1; j < TR; ++j) {
        a_dy += sh[j * TC + tc];
        a_dz += sh[kThreads + j * TC + tc];
        a_dzx += sh[2 * kThreads + j * TC + tc];
      }
      float* out = partial + (int64_t(b) * nchunk + blockIdx.x) * 3 * C;
      out[c] = a_dy;
      out[C + c] = a_dz;
      out[2 * C + c] = a_dzx;
    }
  }
}

// NCHW: block (c, b) sums one contiguous plane of HW elements. Output partial (B, 1, 3, C).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) gn_bwd_reduce_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                                                               const T* __restrict__ w, const T* __restrict__ bias,
                                                               const float* __restrict__ mean,
                                                               const float* __restrict__ rstd, int64_t C, int64_t HW,
                                                               float* __restrict__ partial) {
  __shared__ float sh[3 * 32];
  const int c = blockIdx.x, b = blockIdx.y;
  const float m = mean[b], rs = rstd[b];
  const float sc = rs * to_f(w[c]), shf = to_f(bias[c]) - m * sc;
  const int64_t base = (int64_t(b) * C + c) * HW;
  float s[3] = {0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < HW / VEC; i += blockDim.x) {
    const Pack<T, VEC> xp = reinterpret_cast<const Pack<T, VEC>*>(x + base)[i];
    const Pack<T, VEC> gp = reinterpret_cast<const Pack<T, VEC>*>(dy + base)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xv = to_f(xp.v[k]), g = to_f(gp.v[k]);
      const float dz = fmaf(xv, sc, shf) <= 0.f ? 0.f : g  /* threshold_backward: NaN passes */;
      s[0] += g;
      s[1] += dz;
      s[2] = fmaf(dz, (xv - m) * rs, s[2]);
    }
  }
  block_sum<3>(s, sh);
  if (threadIdx.x == 0) {
    float* out = partial + int64_t(b) * 3 * C;
    out[c] = s[0];
    out[C + c] = s[1];
    out[2 * C + c] = s[2];
  }
}

// Per sample b: fold the chunk partials; write demb[b, :], sums (B, 2, C) of dz and dz*xhat, and k (B, 2).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_bwd_sample(const float* __restrict__ partial, int nchunk,
                                                          const T* __restrict__ w, int64_t C, int64_t M,
                                                          T* __restrict__ demb, float* __restrict__ sums,
                                                          float* __restrict__ k) {
  __shared__ float sh[3 * 32];
  const int b = blockIdx.x;
  float t[2] = {0.f, 0.f};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float s_dy = 0.f, s_dz = 0.f, s_dzx = 0.f;
    for (int j = 0; j < nchunk; ++j) {
      const float* p = partial + (int64_t(b) * nchunk + j) * 3 * C;
      s_dy += p[c];
      s_dz += p[C + c];
      s_dzx += p[2 * C + c];
    }
    if (demb) demb[b * C + c] = from_f<T>(s_dy);
    sums[(b * 2) * C + c] = s_dz;
    sums[(b * 2 + 1) * C + c] = s_dzx;
    const float wc = to_f(w[c]);
    t[0] = fmaf(wc, s_dz, t[0]);
    t[1] = fmaf(wc, s_dzx, t[1]);
  }
  block_sum<2>(t, sh);
  if (threadIdx.x == 0) {
    k[b * 2] = t[0] / float(M);
    k[b * 2 + 1] = t[1] / float(M);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gn_bwd_param(const float* __restrict__ sums, int B, int64_t C,
                                                         T* __restrict__ dw, T* __restrict__ db) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  float a_w = 0.f, a_b = 0.f;
  for (int b = 0; b < B; ++b) {
    a_b += sums[(b * 2) * C + c];
    a_w += sums[(b * 2 + 1) * C + c];
  }
  dw[c] = from_f<T>(a_w);
  db[c] = from_f<T>(a_b);
}

template <typename T, int VEC, bool NHWC>
__global__ void __launch_bounds__(kThreads) gn_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x,
                                                      const T* __restrict__ w, const T* __restrict__ bias,
                                                      const float* __restrict__ mean, const float* __restrict__ rstd,
                                                      const float* __restrict__ k, int64_t C, int64_t HW,
                                                      T* __restrict__ dx) {
  const int b = blockIdx.y;
  const int64_t M = C * HW;
  const float m = mean[b], rs = rstd[b], k1 = k[b * 2], k2 = k[b * 2 + 1];
  const int64_t nvec = M / VEC;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nvec; i += int64_t(gridDim.x) * blockDim.x) {
    const Pack<T, VEC> xp = reinterpret_cast<const Pack<T, VEC>*>(x + b * M)[i];
    const Pack<T, VEC> gp = reinterpret_cast<const Pack<T, VEC>*>(dy + b * M)[i];
    Pack<T, VEC> o;
    const int64_t e0 = i * VEC;
    const int64_t c0 = NHWC ? e0 % C : e0 / HW;
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      const int64_t c = NHWC ? c0 + q : c0;
      const float wc = to_f(w[c]), sc = rs * wc;
      const float xv = to_f(xp.v[q]);
      const float dz = fmaf(xv, sc, to_f(bias[c]) - m * sc) <= 0.f ? 0.f : to_f(gp.v[q]);  // NaN passes
      o.v[q] = from_f<T>(rs * (dz * wc - k1 - (xv - m) * rs * k2));
    }
    reinterpret_cast<Pack<T, VEC>*>(dx + b * M)[i] = o;
  }
}

// ---- host side --------------------------------------------------------------------------------------

// float32, float16, bfloat16 only (no double instantiations: they would double the build time).
#define FAST_UNET_DISPATCH_GN_TYPES(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

bool is_nhwc(const at::Tensor& x) { return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast); }

// Widest pack (16 bytes, or 1 element) for which every pack lies inside one channel of one sample.
template <typename T>
int pick_vec(const void* p0, const void* p1, int64_t C, int64_t HW, bool nhwc) {
  constexpr int V = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(p0) % 16 == 0) && (reinterpret_cast<uintptr_t>(p1) % 16 == 0);
  const bool fits = nhwc ? (C % V == 0) : (HW % V == 0);
  return aligned && fits ? V : 1;
}

int grid_blocks(int64_t work, int B) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (work + kThreads - 1) / kThreads;
  const int64_t cap = std::max<int64_t>(1, 4 * sms / std::max(B, 1));
  return int(std::max<int64_t>(1, std::min(want, cap)));
}

void check_cuda_dtype(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, what,
              ": x must be float32, bfloat16 or float16 on CUDA, got ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_relu_fwd_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                                const at::Tensor& bias,
                                                                const std::optional<at::Tensor>& emb_opt, double eps) {
  check_gn_args(x_in, weight, bias, emb_opt);
  check_cuda_dtype(x_in, "group_norm_relu (CUDA)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = nhwc ? x_in : x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), M = C * HW;
  auto y = at::empty_like(x, nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  auto fopt = x.options().dtype(at::kFloat);
  auto mean = at::empty({B}, fopt), rstd = at::empty({B}, fopt);
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  at::Tensor emb;
  if (emb_opt.has_value() && emb_opt->defined()) emb = emb_opt->contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int nstat = grid_blocks(M / 8, int(B));
  auto partial = at::empty({B, nstat, 2}, fopt);
  FAST_UNET_DISPATCH_GN_TYPES(x.scalar_type(), "gn_relu_fwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t* ep = emb.defined() ? emb.const_data_ptr<scalar_t>() : nullptr;
    constexpr int V = 16 / sizeof(scalar_t);
    const bool stat_vec = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && M % V == 0;
    if (stat_vec)
      gn_stats<scalar_t, V><<<dim3(nstat, B), kThreads, 0, stream>>>(xp, M, partial.mutable_data_ptr<float>());
    else
      gn_stats<scalar_t, 1><<<dim3(nstat, B), kThreads, 0, stream>>>(xp, M, partial.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int vec = pick_vec<scalar_t>(xp, yp, C, HW, nhwc);
    const dim3 grid(grid_blocks(M / vec, int(B)), B);
    auto launch = [&](auto vec_c, auto nhwc_c) {
      gn_apply<scalar_t, decltype(vec_c)::value, decltype(nhwc_c)::value><<<grid, kThreads, 0, stream>>>(
          xp, w.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), ep, partial.const_data_ptr<float>(), nstat,
          C, HW, float(eps), yp, mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    };
    using VV = std::integral_constant<int, V>;
    using V1 = std::integral_constant<int, 1>;
    if (nhwc) {
      if (vec == V) launch(VV{}, std::true_type{}); else launch(V1{}, std::true_type{});
    } else {
      if (vec == V) launch(VV{}, std::false_type{}); else launch(V1{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_relu_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb) {
  check_gn_args(x_in, weight, bias, std::nullopt);
  check_cuda_dtype(x_in, "group_norm_relu backward (CUDA)");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type() && dy_in.device() == x_in.device(),
              "group_norm_relu backward: dy must match x in shape, dtype and device");
  const int64_t B = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3), M = C * HW;
  TORCH_CHECK(mean.numel() == B && rstd.numel() == B && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && mean.device() == x_in.device() && rstd.device() == x_in.device(),
              "group_norm_relu backward: mean and rstd must be float32 of ", B, " elements on x's device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt), dy = dy_in.contiguous(fmt);
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  auto dx = at::empty_like(x, fmt);
  auto dw = at::empty_like(w), db = at::empty_like(b);
  at::Tensor demb;
  if (has_emb) demb = at::empty({B, C}, x.options());
  if (x.numel() == 0) {
    dw.zero_();
    db.zero_();
    if (has_emb) demb.zero_();
    return {dx, dw, db, demb};
  }
  auto fopt = x.options().dtype(at::kFloat);
  auto stream = at::cuda::getCurrentCUDAStream();
  FAST_UNET_DISPATCH_GN_TYPES(x.scalar_type(), "gn_relu_bwd_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    constexpr int V = 16 / sizeof(scalar_t);
    int nchunk = 1;
    at::Tensor partial;
    if (nhwc) {
      const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      nchunk = int(std::max<int64_t>(1, std::min<int64_t>(HW, 2 * sms / std::max<int64_t>(B, 1))));
      const int64_t rows = (HW + nchunk - 1) / nchunk;
      nchunk = int((HW + rows - 1) / rows);
      partial = at::empty({B, nchunk, 3, C}, fopt);
      gn_bwd_reduce_nhwc<scalar_t><<<dim3(nchunk, B), kThreads, 0, stream>>>(
          gp, xp, wp, bp, mc.const_data_ptr<float>(), rc.const_data_ptr<float>(), C, HW, rows,
          partial.mutable_data_ptr<float>());
    } else {
      partial = at::empty({B, 1, 3, C}, fopt);
      const bool vec = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && reinterpret_cast<uintptr_t>(gp) % 16 == 0 && HW % V == 0;
      if (vec)
        gn_bwd_reduce_nchw<scalar_t, V><<<dim3(C, B), kThreads, 0, stream>>>(
            gp, xp, wp, bp, mc.const_data_ptr<float>(), rc.const_data_ptr<float>(), C, HW, partial.mutable_data_ptr<float>());
      else
        gn_bwd_reduce_nchw<scalar_t, 1><<<dim3(C, B), kThreads, 0, stream>>>(
            gp, xp, wp, bp, mc.const_data_ptr<float>(), rc.const_data_ptr<float>(), C, HW, partial.mutable_data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto sums = at::empty({B, 2, C}, fopt);
    auto k = at::empty({B, 2}, fopt);
    gn_bwd_sample<scalar_t><<<B, kThreads, 0, stream>>>(partial.const_data_ptr<float>(), nchunk, wp, C, M,
                                                        has_emb ? demb.mutable_data_ptr<scalar_t>() : nullptr,
                                                        sums.mutable_data_ptr<float>(), k.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gn_bwd_param<scalar_t><<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        sums.const_data_ptr<float>(), int(B), C, dw.mutable_data_ptr<scalar_t>(), db.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int vec = pick_vec<scalar_t>(xp, dxp, C, HW, nhwc) == V && reinterpret_cast<uintptr_t>(gp) % 16 == 0 ? V : 1;
    const dim3 grid(grid_blocks(M / vec, int(B)), B);
    auto launch = [&](auto vec_c, auto nhwc_c) {
      gn_bwd_dx<scalar_t, decltype(vec_c)::value, decltype(nhwc_c)::value><<<grid, kThreads, 0, stream>>>(
          gp, xp, wp, bp, mc.const_data_ptr<float>(), rc.const_data_ptr<float>(), k.const_data_ptr<float>(), C, HW, dxp);
    };
    using VV = std::integral_constant<int, V>;
    using V1 = std::integral_constant<int, 1>;
    if (nhwc) {
      if (vec == V) launch(VV{}, std::true_type{}); else launch(V1{}, std::true_type{});
    } else {
      if (vec == V) launch(VV{}, std::false_type{}); else launch(V1{}, std::false_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw, db, demb};
}

}  // namespace fast_unet
