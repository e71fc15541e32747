// Interface between the torch glue (ops_cpu.cpp) and the CPU kernels (kernels.cpp).
//
// kernels.cpp is compiled once per instruction set (DEFAULT, AVX2, AVX512, and AVX512_VBMI: AVX512
// with byte permutes); each copy lives in its own namespace and the glue picks one at run time from
// at::get_cpu_capability() and the CPU's features.
#pragma once

#include <cstdint>
#include <vector>

#include "adagrad8/update.h"

namespace adagrad8::cpu {

enum class Dtype { kFloat, kHalf, kBFloat16 };

// One tensor of a multi-tensor call, with its per-tensor scalars already read.
struct Item {
  void* param;
  const void* grad;
  float* sum;        // fp32 state (step) or nullptr
  uint8_t* codes;    // 8-bit state (step.quantized) or nullptr
  float* absmax;     // one scale per block (step.quantized) or nullptr
  int64_t numel;
  int64_t block;     // elements per scale block, >= 1 (tensor-wise: numel)
  float clr;         // decayed learning rate
  float gnorm_scale;
  uint64_t stream;   // stochastic-rounding key for this tensor and step
};

struct Call {
  Dtype dtype;
  StepConfig config;
  std::vector<Item> items;
  const float* qmap = nullptr;  // 256 entries (step.quantized)
  bool stochastic = false;
  // AVX-512: count a value's code with one gather from the bucket table instead of the counter's
  // register permutes (which is faster depends on the CPU: ops_cpu.cpp's gather_codes()).
  bool gather_codes = false;
};

#define ADAGRAD8_DECLARE_CPU_KERNELS(ns) \
  namespace ns {                         \
  void step_fp32(const Call& call);      \
  void step_quantized(const Call& call); \
  }

ADAGRAD8_DECLARE_CPU_KERNELS(DEFAULT)
ADAGRAD8_DECLARE_CPU_KERNELS(AVX2)
ADAGRAD8_DECLARE_CPU_KERNELS(AVX512)
ADAGRAD8_DECLARE_CPU_KERNELS(AVX512_VBMI)

}  // namespace adagrad8::cpu
