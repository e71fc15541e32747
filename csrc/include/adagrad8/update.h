// One Adagrad step for one element (ALGORITHM.md §2), in float32.
//
// Every operation is a separately rounded IEEE float op, written in the order reference.py
// uses, so the CPU kernel, the CUDA kernel and the PyTorch reference agree bit for bit.
// Builds must not contract a*b+c into an FMA (-ffp-contract=off, nvcc --fmad=false).
#pragma once

#include <cmath>
#include <cstdint>

#include "adagrad8/macros.h"

namespace adagrad8 {

// Per-call constants of a step.
struct StepConfig {
  float weight_decay;
  float eps;
  bool maximize;
  bool skip_zeros;
};

// Learning rate after lr_decay at (already incremented) step t: computed in double and
// rounded once, as torch.optim.Adagrad does with Python floats.
ADAGRAD8_HD float decayed_lr(float lr, float step, double lr_decay) {
  return static_cast<float>(static_cast<double>(lr) /
                            (1.0 + (static_cast<double>(step) - 1.0) * lr_decay));
}

// The gradient that feeds both the accumulator and the update: clipped, signed, decayed.
ADAGRAD8_HD float effective_grad(float grad, float param, float gnorm_scale, const StepConfig& c) {
  float g = grad * gnorm_scale;
  if (c.maximize) g = -g;
  if (c.weight_decay != 0.0f) g = g + c.weight_decay * param;
  return g;
}

ADAGRAD8_HD float accumulate(float sum, float g) { return sum + g * g; }

ADAGRAD8_HD float updated_param(float param, float g, float sum, float clr, float eps) {
  return param - (clr * g) / (sqrtf(sum) + eps);
}

// skip_zeros leaves an element whose incoming (raw) gradient is exactly zero untouched.
ADAGRAD8_HD bool skipped(float raw_grad, const StepConfig& c) {
  return c.skip_zeros && raw_grad == 0.0f;
}

}  // namespace adagrad8
