// Interface between the torch glue (ops_cuda.cpp) and the CUDA kernels (kernels.cu).
//
// No torch header here or in kernels.cu: plain pointers, sizes and a cudaStream_t. Every
// per-step scalar (lr, step, gnorm scale, seed) is a device pointer that the kernels read,
// so a step never synchronises with the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "adagrad8/update.h"

namespace adagrad8::cuda {

enum class Dtype { kFloat, kHalf, kBFloat16 };

// What every tensor of a call shares.
struct Step {
  const float* lr;  // device, one float
  double lr_decay;
  StepConfig config;
};

// One tensor of step (fp32 state). numel > 0.
struct Fp32Tensor {
  void* param;
  const void* grad;
  float* sum;
  const float* step;         // device, one float
  const float* gnorm_scale;  // device, one float, or nullptr for 1
  int64_t numel;
};

// One tensor of step.quantized. numel > 0.
struct QuantTensor {
  void* param;
  const void* grad;
  uint8_t* codes;
  float* absmax;             // ceil(numel / block) scales
  const float* step;         // device, one float
  const float* gnorm_scale;  // device, one float, or nullptr for 1
  const int64_t* seed;       // device, one int64 (stochastic rounding), or nullptr
  int64_t numel;
  int64_t block;             // elements per scale, >= 1 (tensor-wise: numel)
};

// Blocks up to this size are done by one kernel that reduces each block inside a CUDA
// thread block; larger ones (and large tensor-wise state) take three phases and a workspace.
constexpr int64_t kMaxSmallBlock = 4096;

// Floats of workspace that step_quantized needs for these tensors (0 if none is large).
int64_t quantized_workspace_size(const QuantTensor* tensors, int64_t n);

cudaError_t step_fp32(Dtype dtype, const Fp32Tensor* tensors, int64_t n, const Step& step,
                      cudaStream_t stream);

// qmap: device, 256 floats. stochastic: every tensor has a seed. workspace: device, at least
// quantized_workspace_size floats (contents ignored; zeroed on the stream here).
cudaError_t step_quantized(Dtype dtype, const QuantTensor* tensors, int64_t n, const Step& step,
                           const float* qmap, bool stochastic, float* workspace, cudaStream_t stream);

}  // namespace adagrad8::cuda
