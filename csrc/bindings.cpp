// fast_unet._C: Python bindings of the kernels (wrapped as torch.library custom ops in fast_unet/ext_ops.py).
#include "vec_config.h"

#include <torch/extension.h>

#include "ops.h"

#define FAST_UNET_STR_(...) #__VA_ARGS__
#define FAST_UNET_STR(...) FAST_UNET_STR_(__VA_ARGS__)

namespace fast_unet {

void check_gn_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& emb) {
  TORCH_CHECK(x.dim() == 4, "group_norm_relu: x must be 4-D (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm_relu: x must be NCHW-contiguous or channels_last, got strides ", x.strides());
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "group_norm_relu: weight must have shape (", C,
              ",) to match x's channels, got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "group_norm_relu: bias must have shape (", C,
              ",) to match x's channels, got ", bias.sizes());
  TORCH_CHECK(weight.device() == x.device(), "group_norm_relu: weight is on ", weight.device(), " but x is on ", x.device());
  TORCH_CHECK(bias.device() == x.device(), "group_norm_relu: bias is on ", bias.device(), " but x is on ", x.device());
  // The CPU kernels read the parameters and emb in float32 (x's dtype is widened too); the CUDA kernels in x's dtype.
  const auto ok_dtype = [&](const at::Tensor& t) {
    return t.scalar_type() == x.scalar_type() || (x.is_cpu() && t.scalar_type() == at::kFloat);
  };
  const char* allowed = x.is_cpu() ? " or float32" : "";
  TORCH_CHECK(ok_dtype(weight), "group_norm_relu: weight must have x's dtype ", x.scalar_type(), allowed, ", got ",
              weight.scalar_type());
  TORCH_CHECK(ok_dtype(bias), "group_norm_relu: bias must have x's dtype ", x.scalar_type(), allowed, ", got ",
              bias.scalar_type());
  if (emb.has_value() && emb->defined()) {
    TORCH_CHECK(emb->dim() == 2 && emb->size(0) == x.size(0) && emb->size(1) == C, "group_norm_relu: emb must have shape (",
                x.size(0), ", ", C, "), got ", emb->sizes());
    TORCH_CHECK(emb->device() == x.device(), "group_norm_relu: emb is on ", emb->device(), " but x is on ", x.device());
    TORCH_CHECK(ok_dtype(*emb), "group_norm_relu: emb must have x's dtype ", x.scalar_type(), allowed, ", got ",
                emb->scalar_type());
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_relu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                           const at::Tensor& bias, const std::optional<at::Tensor>& emb,
                                                           double eps) {
  if (x.is_cuda()) {
#ifdef FAST_UNET_WITH_CUDA
    return gn_relu_fwd_cuda(x, weight, bias, emb, eps);
#else
    TORCH_CHECK(false, "group_norm_relu: x is on ", x.device(), " but fast_unet._C was built without CUDA");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "group_norm_relu: x must be a CPU or CUDA tensor, got ", x.device());
  return gn_relu_fwd_cpu(x, weight, bias, emb, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_relu_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_emb) {
  if (x.is_cuda()) {
#ifdef FAST_UNET_WITH_CUDA
    return gn_relu_bwd_cuda(dy, x, weight, bias, mean, rstd, has_emb);
#else
    TORCH_CHECK(false, "group_norm_relu backward: x is on ", x.device(), " but fast_unet._C was built without CUDA");
#endif
  }
  TORCH_CHECK(x.is_cpu(), "group_norm_relu backward: x must be a CPU or CUDA tensor, got ", x.device());
  return gn_relu_bwd_cpu(dy, x, weight, bias, mean, rstd, has_emb);
}

py::dict build_info() {
  py::dict d;
#ifdef FAST_UNET_WITH_CUDA
  d["cuda"] = true;
  std::string archs = FAST_UNET_STR(FAST_UNET_CUDA_ARCHS);  // "80_90" -> "sm_80,sm_90"
  std::string pretty;
  size_t start = 0;
  while (start <= archs.size()) {
    const size_t end = std::min(archs.find('_', start), archs.size());
    pretty += (pretty.empty() ? "sm_" : ",sm_") + archs.substr(start, end - start);
    start = end + 1;
  }
  d["cuda_archs"] = pretty;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
#endif
  d["cpu_isa"] = std::string(FAST_UNET_VEC_ISA);
#ifdef FAST_UNET_CPU_ARCH
  d["cpu_march"] = std::string(FAST_UNET_STR(FAST_UNET_CPU_ARCH));
#endif
  d["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
               std::to_string(TORCH_VERSION_PATCH);
  d["attention_head_dims"] = py::make_tuple(16, 32, 64);
  // bf16 attention on the CPU's tile unit (AMX): built in, and usable here (CPU + OS permission)
  d["cpu_bf16_attention"] = std::string(attention_amx_available() ? "amx" : "float32 kernel on an upcast copy");
  return d;
}

}  // namespace
}  // namespace fast_unet

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fast_unet's C++/CUDA kernels (use them through fast_unet.ops; see docs/ext.md)";
  m.def("build_info", &fast_unet::build_info, "how this extension was built: CUDA archs, CPU ISA, torch");
  m.def("gn_relu_fwd", &fast_unet::gn_relu_fwd, "fused GroupNorm(1,C)+ReLU+emb forward -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"), py::arg("eps"));
  m.def("gn_relu_bwd", &fast_unet::gn_relu_bwd, "its backward -> (dx, dweight, dbias, demb or None)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("has_emb"));
  m.def("attention_fwd_cpu", &fast_unet::attention_fwd_cpu, "CPU flash attention forward -> (out, lse2)",
        py::arg("qkv"));
  m.def("attention_bwd_cpu", &fast_unet::attention_bwd_cpu, "CPU flash attention backward -> dqkv",
        py::arg("dout"), py::arg("qkv"), py::arg("out"), py::arg("lse2"));
}
