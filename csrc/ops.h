// fast_unet._C: the kernels' host entry points. Every entry checks its arguments (messages name them).
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace fast_unet {

// Fused GroupNorm(1, C) + ReLU (+ time embedding):  y = relu((x - mean) * rstd * w[c] + b[c]) + emb[b, c].
// x: (B, C, H, W) NCHW-contiguous or channels_last; weight, bias: (C,); emb: (B, C) or none.
// Returns (y in x's memory format, mean (B,) float32, rstd (B,) float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_relu_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& emb,
    double eps);
// Returns (dx, dweight, dbias, demb (B, C) or an undefined tensor when has_emb is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_relu_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb);

#ifdef FAST_UNET_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_relu_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const std::optional<at::Tensor>& emb,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_relu_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb);
#endif

// Flash attention on the CPU, float32 or bfloat16, head dim 16, 32 or 64.
// qkv: (B, N, 3, heads, d), any strides. Returns (out (B, N, heads * d) contiguous,
// lse2 (B, heads, N) float32: the log2 of each row's softmax normaliser over scores scaled by 1/sqrt(d)).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv);
// bfloat16 qkv: out in bf16 (float32 accumulation and softmax), lse2 float32.
// dout, out: (B, N, heads * d); returns dqkv (B, N, 3, heads, d) contiguous.
at::Tensor attention_bwd_cpu(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& out,
                             const at::Tensor& lse2);

// The bf16 forward on AMX tiles (attention_amx.cpp): false, writing nothing, where the CPU, the OS or the build
// has no tile unit. out (B, N, heads * d) bf16 and lse2 (B, heads, N) float32 are allocated by the caller.
bool attention_fwd_bf16_amx(const at::Tensor& qkv, at::Tensor& out, at::Tensor& lse2);
bool attention_amx_available();

// Shared argument checks for the GroupNorm entries (defined in bindings.cpp).
void check_gn_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& emb);

}  // namespace fast_unet
