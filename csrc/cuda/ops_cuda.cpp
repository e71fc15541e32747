// CUDA glue: validate, collect device pointers (no scalar is read on the host), launch on the
// current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/kernels.cuh"
#include "validate.h"

namespace adagrad8::cuda {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat;
  }
}

Step make_step(const at::Tensor& lr, double lr_decay, double weight_decay, double eps, bool maximize,
               bool skip_zeros) {
  return Step{lr.const_data_ptr<float>(), lr_decay,
              StepConfig{static_cast<float>(weight_decay), static_cast<float>(eps), maximize, skip_zeros}};
}

const float* gnorm_ptr(const std::optional<at::TensorList>& gnorm_scales, size_t i) {
  return gnorm_scales.has_value() ? (*gnorm_scales)[i].const_data_ptr<float>() : nullptr;
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "adagrad8 CUDA kernel failed: ", cudaGetErrorString(err)); }

void step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
               const at::Tensor& lr, double lr_decay, double weight_decay, double eps, bool maximize,
               std::optional<at::TensorList> gnorm_scales, bool skip_zeros) {
  check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<Fp32Tensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    tensors.push_back(Fp32Tensor{params[i].data_ptr(), grads[i].const_data_ptr(), state_sums[i].data_ptr<float>(),
                                 steps[i].const_data_ptr<float>(), gnorm_ptr(gnorm_scales, i), params[i].numel()});
  }
  check(step_fp32(dtype_of(params[0]), tensors.data(), static_cast<int64_t>(tensors.size()),
                  make_step(lr, lr_decay, weight_decay, eps, maximize, skip_zeros),
                  c10::cuda::getCurrentCUDAStream().stream()));
}

void step_quantized_cuda(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                         const at::Tensor& qmap, at::TensorList steps, const at::Tensor& lr, double lr_decay,
                         double weight_decay, double eps, bool maximize, std::optional<at::TensorList> gnorm_scales,
                         bool skip_zeros, int64_t block_size, std::optional<at::TensorList> seeds) {
  check_step_quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps, gnorm_scales,
                       block_size, seeds);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<QuantTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    tensors.push_back(QuantTensor{params[i].data_ptr(), grads[i].const_data_ptr(), codes[i].data_ptr<uint8_t>(),
                                  absmax[i].data_ptr<float>(), steps[i].const_data_ptr<float>(),
                                  gnorm_ptr(gnorm_scales, i),
                                  seeds.has_value() ? (*seeds)[i].const_data_ptr<int64_t>() : nullptr, numel,
                                  block_size > 0 ? block_size : numel});
  }
  const int64_t n = static_cast<int64_t>(tensors.size());
  // Large blocks need a float per scale; from the caching allocator, used on the current stream.
  const at::Tensor workspace =
      at::empty({quantized_workspace_size(tensors.data(), n)}, params[0].options().dtype(at::kFloat));
  check(step_quantized(dtype_of(params[0]), tensors.data(), n,
                       make_step(lr, lr_decay, weight_decay, eps, maximize, skip_zeros), qmap.const_data_ptr<float>(),
                       seeds.has_value(), workspace.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace adagrad8::cuda

// CUDA kernels for both overloads.
TORCH_LIBRARY_IMPL(adagrad8, CUDA, m) {
  m.impl("step", &adagrad8::cuda::step_cuda);
  m.impl("step.quantized", &adagrad8::cuda::step_quantized_cuda);
}

// Sparse CUDA tensors reach the same entry points, whose checks name the sparse argument.
TORCH_LIBRARY_IMPL(adagrad8, SparseCUDA, m) {
  m.impl("step", &adagrad8::cuda::step_cuda);
  m.impl("step.quantized", &adagrad8::cuda::step_quantized_cuda);
}
