// Input checks shared by every backend of adagrad8::step / step.quantized.
//
// torch_adagrad8/_ops.py repeats each check with the same message for the fake kernel;
// tests/test_bad_input.py holds the two together.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>

namespace adagrad8 {

// Checks that both overloads share. `state_name`/`state` is state_sums or codes.
void check_common(at::TensorList params, at::TensorList grads, const char* state_name,
                  at::TensorList state, at::TensorList steps, const at::Tensor& lr,
                  double lr_decay, double weight_decay, double eps,
                  const std::optional<at::TensorList>& gnorm_scales);

void check_step(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                at::TensorList steps, const at::Tensor& lr, double lr_decay,
                double weight_decay, double eps,
                const std::optional<at::TensorList>& gnorm_scales);

void check_step_quantized(at::TensorList params, at::TensorList grads, at::TensorList codes,
                          at::TensorList absmax, const at::Tensor& qmap, at::TensorList steps,
                          const at::Tensor& lr, double lr_decay, double weight_decay,
                          double eps, const std::optional<at::TensorList>& gnorm_scales,
                          int64_t block_size, const std::optional<at::TensorList>& seeds);

// Percentile clipping's history (gnorm_vec): its length, and the first value while it is empty
// (the next call fills every slot). torch_adagrad8/_checks.py's HISTORY and NO_HISTORY.
constexpr int64_t kHistory = 100;
constexpr double kNoHistory = -1.0;

void check_percentile_clip(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                           int64_t percentile);

// The overlap rule over any tensors: none in `written` may share memory with another tensor.
// names (one per tensor, written then read, or none) name them in the message; functional.plan
// runs it over a whole step, which spans several op calls and writes the step counts and
// clipping histories too.
void check_overlaps(at::TensorList written, at::TensorList read, const c10::List<std::string>& names);

// adagrad8::increment's arguments: float32 tensors of one element, all on counts[0]'s device.
void check_counts(at::TensorList counts);

// Number of scales params of `numel` elements has with `block_size` (0: one per tensor).
int64_t scale_count(int64_t numel, int64_t block_size);

}  // namespace adagrad8
