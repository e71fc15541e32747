// C entry points into the emulated kernels for tests/test_cuda_emulated.py (ctypes). Every
// argument is what csrc/cuda/ops_cuda.cpp would pass: pointers to each tensor's data (nullptr
// for an absent optional) and the scalars of the call. They return the launchers' cudaError_t
// (always 0: the emulated CUDA calls cannot fail). The library is built with hidden
// visibility: only these are exported, so two builds loaded at once share no emulation state.
#include <cstdint>
#include <vector>

#include "cuda/kernels.cuh"

using namespace adagrad8::cuda;

namespace {
Step make_step(const float* lr, double lr_decay, float weight_decay, float eps, int maximize, int skip_zeros) {
  return Step{lr, lr_decay, adagrad8::StepConfig{weight_decay, eps, maximize != 0, skip_zeros != 0}};
}
}  // namespace

#define EMU_EXPORT __attribute__((visibility("default")))

extern "C" {

// 0: vector accesses so far; 1: those of them that were misaligned.
EMU_EXPORT long emu_counts(int which) {
  return which == 0 ? emu_vector_accesses.load() : emu_misaligned_accesses.load();
}

EMU_EXPORT int emu_step(int dtype, int n, void** param, void** grad, void** sum, void** step, void** gnorm,
                        const int64_t* numel, const float* lr, double lr_decay, float weight_decay, float eps,
                        int maximize, int skip_zeros) {
  std::vector<Fp32Tensor> tensors;
  for (int i = 0; i < n; ++i) {
    tensors.push_back({param[i], grad[i], static_cast<float*>(sum[i]), static_cast<const float*>(step[i]),
                       static_cast<const float*>(gnorm[i]), numel[i]});
  }
  return step_fp32(static_cast<Dtype>(dtype), tensors.data(), n,
                   make_step(lr, lr_decay, weight_decay, eps, maximize, skip_zeros), nullptr);
}

EMU_EXPORT int emu_step_quantized(int dtype, int n, void** param, void** grad, void** codes, void** absmax,
                                  void** step, void** gnorm, void** seed, const int64_t* numel, int64_t block_size,
                                  const float* qmap, const float* lr, double lr_decay, float weight_decay, float eps,
                                  int maximize, int skip_zeros) {
  std::vector<QuantTensor> tensors;
  for (int i = 0; i < n; ++i) {
    tensors.push_back({param[i], grad[i], static_cast<uint8_t*>(codes[i]), static_cast<float*>(absmax[i]),
                       static_cast<const float*>(step[i]), static_cast<const float*>(gnorm[i]),
                       static_cast<const int64_t*>(seed[i]), numel[i], block_size > 0 ? block_size : numel[i]});
  }
  // Filled with garbage: step_quantized must zero what it uses.
  std::vector<float> workspace(quantized_workspace_size(tensors.data(), n) + 1, 123.0f);
  return step_quantized(static_cast<Dtype>(dtype), tensors.data(), n,
                        make_step(lr, lr_decay, weight_decay, eps, maximize, skip_zeros), qmap, seed[0] != nullptr,
                        workspace.data(), nullptr);
}

}  // extern "C"
