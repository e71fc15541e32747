// Every adagrad8 schema, in one place. Backends register kernels in cpu/ and cuda/;
// fake (meta) kernels live in torch_adagrad8/_ops.py.
#include <ATen/ops/_foreach_add.h>
#include <torch/library.h>

#include <string>

#include "validate.h"

namespace {

// Arguments of the two step overloads, written once: validate / validate.quantized take the same
// ones without the mutation annotations.
constexpr const char* kStepArgs =
    "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor[] steps, Tensor lr, "
    "float lr_decay, float weight_decay, float eps, bool maximize, Tensor[]? gnorm_scales=None, "
    "bool skip_zeros=False";
constexpr const char* kQuantizedArgs =
    "Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, Tensor(c!)[] absmax, "
    "Tensor qmap, Tensor[] steps, Tensor lr, float lr_decay, float weight_decay, float eps, bool maximize, "
    "Tensor[]? gnorm_scales=None, bool skip_zeros=False, int block_size=256, Tensor[]? seeds=None";

std::string step_schema(const std::string& name, std::string args, bool writes) {
  if (!writes) {
    for (const char* alias : {"(a!)", "(b!)", "(c!)"}) {
      for (auto at = args.find(alias); at != std::string::npos; at = args.find(alias)) args.erase(at, 4);
    }
  }
  return name + "(" + args + ") -> ()";
}

}  // namespace

TORCH_LIBRARY(adagrad8, m) {
  // One Adagrad step with a float32 accumulator (ALGORITHM.md §2), over lists of tensors.
  m.def(step_schema("step", kStepArgs, true).c_str(), {at::Tag::pt2_compliant_tag});
  // The same step with 8-bit state: codes into qmap, one float32 scale per block of block_size
  // elements (0: one block per tensor). seeds, if given, turns on stochastic rounding (§4).
  m.def(step_schema("step.quantized", kQuantizedArgs, true).c_str(), {at::Tag::pt2_compliant_tag});
  // Percentile clipping (§5): records each gradient's squared norm in its gnorm_vec (steps are
  // the already incremented counts) and returns the gnorm_scales that step takes, as one float32
  // tensor of len(grads) values (a list return would not functionalize with a mutation). One kernel for
  // every device, built from ATen ops (clip.cpp), opaque to the compiler so that a compiled step
  // clips with eager's bits.
  m.def(
      "percentile_clip(Tensor[] grads, Tensor(a!)[] gnorm_vecs, Tensor[] steps, int percentile) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The checks of step / step.quantized alone (same arguments, nothing written): one call checks a
  // whole list in C++, which is what an eager optimizer step runs before its first write instead of
  // the per-tensor Python checks (csrc/validate.cpp; torch_adagrad8/functional.py).
  m.def(step_schema("validate", kStepArgs, false).c_str(), {at::Tag::pt2_compliant_tag});
  m.def(step_schema("validate.quantized", kQuantizedArgs, false).c_str(), {at::Tag::pt2_compliant_tag});
  // The overlap rule alone, over tensors from any number of calls: none in `written` may share
  // memory with another tensor. names (written, then read) name them in the message. An
  // optimizer step runs it over all its calls, counting the step counts and clipping histories
  // it increments as written.
  m.def("validate.overlaps(Tensor[] written, Tensor[] read, str[] names) -> ()", {at::Tag::pt2_compliant_tag});
  // counts[i] += 1 in place, for float32 tensors of one element on one device: what an eager step
  // does to its step counts before the step ops read them. On the CPU a loop in C++ (torch's
  // _foreach_add_ dispatches one add_ per tensor there, about 1.1 us each); elsewhere _foreach_add_.
  m.def("increment(Tensor(a!)[] counts) -> ()", {at::Tag::pt2_compliant_tag});
}

namespace {

// The checks read only metadata, so one kernel serves every device.
void validate_step(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
                   const at::Tensor& lr, double lr_decay, double weight_decay, double eps, bool /*maximize*/,
                   std::optional<at::TensorList> gnorm_scales, bool /*skip_zeros*/) {
  adagrad8::check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales);
}

void validate_step_quantized(at::TensorList params, at::TensorList grads, at::TensorList codes,
                             at::TensorList absmax, const at::Tensor& qmap, at::TensorList steps,
                             const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                             bool /*maximize*/, std::optional<at::TensorList> gnorm_scales, bool /*skip_zeros*/,
                             int64_t block_size, std::optional<at::TensorList> seeds) {
  adagrad8::check_step_quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps,
                                 gnorm_scales, block_size, seeds);
}

// Devices without a kernel of their own (CUDA: one multi-tensor launch).
void increment_any(at::TensorList counts) {
  adagrad8::check_counts(counts);
  if (!counts.empty()) at::_foreach_add_(counts, 1);  // (which refuses an empty list)
}

}  // namespace

TORCH_LIBRARY_IMPL(adagrad8, CompositeExplicitAutograd, m) {
  m.impl("validate", &validate_step);
  m.impl("validate.quantized", &validate_step_quantized);
  m.impl("validate.overlaps", &adagrad8::check_overlaps);
  m.impl("increment", &increment_any);
}
