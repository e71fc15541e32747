// CPU glue: validate, read the per-tensor scalars, pick the kernels for this CPU, run.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdlib>

#include "adagrad8/rng.h"
#include "cpu/kernels.h"
#include "validate.h"

namespace adagrad8::cpu {
namespace {

struct Kernels {
  void (*fp32)(const Call&);
  void (*quantized)(const Call&);
};

// The widest instruction set that this build has, at::get_cpu_capability() allows (which honours
// the ATEN_CPU_CAPABILITY environment variable) and this CPU has (ADAGRAD8_CPU_HAS_*, from the
// variants' compiler flags in CMakeLists.txt): torch takes the variable at its word, and
// ATEN_CPU_CAPABILITY=avx512 on an AMD Zen 3 (AVX2 only) made the AVX-512 kernels die of SIGILL.
// Under AVX512, the byte-permute variant where the CPU has AVX512-VBMI and ADAGRAD8_NO_VBMI is unset
// (the tests run both).
const Kernels& kernels() {
  static const Kernels chosen = [] {
    const std::string cap = at::get_cpu_capability();
#ifdef ADAGRAD8_HAVE_AVX512_VBMI
    if (cap == "AVX512" && ADAGRAD8_CPU_HAS_AVX512_VBMI && std::getenv("ADAGRAD8_NO_VBMI") == nullptr) {
      return Kernels{AVX512_VBMI::step_fp32, AVX512_VBMI::step_quantized};
    }
#endif
#ifdef ADAGRAD8_HAVE_AVX512
    if (cap == "AVX512" && ADAGRAD8_CPU_HAS_AVX512) return Kernels{AVX512::step_fp32, AVX512::step_quantized};
#endif
#ifdef ADAGRAD8_HAVE_AVX2
    if ((cap == "AVX512" || cap == "AVX2") && ADAGRAD8_CPU_HAS_AVX2) return Kernels{AVX2::step_fp32, AVX2::step_quantized};
#endif
    return Kernels{DEFAULT::step_fp32, DEFAULT::step_quantized};
  }();
  return chosen;
}

// How the AVX-512 kernels find new codes: one gather from a bucket table per 16 values, or the
// counter's two-register permutes (kernels.cpp). Both give the same codes (tests/test_numerics.py
// compares them). AMD Zen 4 microcodes gathers, and the counter was made to avoid them there (later
// AMD CPUs are not measured and keep it); on Intel Xeon a gather takes about 10 cycles while the
// counter's permutes queue on one port, and the gather is the faster (docs/performance.md).
// ADAGRAD8_CODE_SEARCH=gather or =permute overrides (any other non-empty value warns).
bool gather_codes() {
  static const bool chosen = [] {
    const char* forced = std::getenv("ADAGRAD8_CODE_SEARCH");
    const std::string value = forced != nullptr ? forced : "";
    if (value == "gather" || value == "permute") return value == "gather";
    // (a warning, not an error: by the time a step reads this, the optimizer has counted the step)
    if (!value.empty()) TORCH_WARN("ADAGRAD8_CODE_SEARCH='", value, "' is neither 'gather' nor 'permute': ignored");
#if defined(__x86_64__) || defined(__i386__)
    return !__builtin_cpu_is("amd");
#else
    return false;  // no AVX-512 kernels here
#endif
  }();
  return chosen;
}

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat;
  }
}

float read_float(const at::Tensor& t) { return *t.const_data_ptr<float>(); }

// The call without its state pointers: per-tensor scalars are read here, once.
Call make_call(at::TensorList params, at::TensorList grads, at::TensorList steps, const at::Tensor& lr,
               double lr_decay, double weight_decay, double eps, bool maximize,
               const std::optional<at::TensorList>& gnorm_scales, bool skip_zeros,
               const std::optional<at::TensorList>& seeds) {
  Call call;
  call.dtype = params.empty() ? Dtype::kFloat : dtype_of(params[0]);
  call.config = StepConfig{static_cast<float>(weight_decay), static_cast<float>(eps), maximize, skip_zeros};
  call.stochastic = seeds.has_value();
  const float lr_value = read_float(lr);
  for (size_t i = 0; i < params.size(); ++i) {
    const float step = read_float(steps[i]);
    Item it{};
    it.param = params[i].data_ptr();
    it.grad = grads[i].const_data_ptr();
    it.numel = params[i].numel();
    it.block = it.numel > 0 ? it.numel : 1;
    it.clr = decayed_lr(lr_value, step, lr_decay);
    it.gnorm_scale = gnorm_scales.has_value() ? read_float((*gnorm_scales)[i]) : 1.0f;
    it.stream = seeds.has_value() ? stream_key(*(*seeds)[i].const_data_ptr<int64_t>(), step_index(step)) : 0;
    call.items.push_back(it);
  }
  return call;
}

void step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums, at::TensorList steps,
              const at::Tensor& lr, double lr_decay, double weight_decay, double eps, bool maximize,
              std::optional<at::TensorList> gnorm_scales, bool skip_zeros) {
  check_step(params, grads, state_sums, steps, lr, lr_decay, weight_decay, eps, gnorm_scales);
  Call call = make_call(params, grads, steps, lr, lr_decay, weight_decay, eps, maximize, gnorm_scales, skip_zeros,
                        std::nullopt);
  for (size_t i = 0; i < params.size(); ++i) call.items[i].sum = state_sums[i].data_ptr<float>();
  kernels().fp32(call);
}

void step_quantized_cpu(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                        const at::Tensor& qmap, at::TensorList steps, const at::Tensor& lr, double lr_decay,
                        double weight_decay, double eps, bool maximize, std::optional<at::TensorList> gnorm_scales,
                        bool skip_zeros, int64_t block_size, std::optional<at::TensorList> seeds) {
  check_step_quantized(params, grads, codes, absmax, qmap, steps, lr, lr_decay, weight_decay, eps, gnorm_scales,
                       block_size, seeds);
  Call call = make_call(params, grads, steps, lr, lr_decay, weight_decay, eps, maximize, gnorm_scales, skip_zeros,
                        seeds);
  call.qmap = qmap.const_data_ptr<float>();
  call.gather_codes = gather_codes();
  for (size_t i = 0; i < params.size(); ++i) {
    Item& it = call.items[i];
    it.codes = codes[i].data_ptr<uint8_t>();
    it.absmax = absmax[i].data_ptr<float>();
    if (block_size > 0) it.block = block_size;
  }
  kernels().quantized(call);
}

// Every count is checked before the first is written.
void increment_cpu(at::TensorList counts) {
  check_counts(counts);
  for (const at::Tensor& t : counts) {
    float* count = t.data_ptr<float>();
    *count = *count + 1.0f;  // what add_(1) computes
  }
}

}  // namespace
}  // namespace adagrad8::cpu

// CPU kernels for both overloads, and the step counts' increment.
TORCH_LIBRARY_IMPL(adagrad8, CPU, m) {
  m.impl("step", &adagrad8::cpu::step_cpu);
  m.impl("step.quantized", &adagrad8::cpu::step_quantized_cpu);
  m.impl("increment", &adagrad8::cpu::increment_cpu);
}

// Sparse CPU tensors reach the same entry points, whose checks name the sparse argument.
TORCH_LIBRARY_IMPL(adagrad8, SparseCPU, m) {
  m.impl("step", &adagrad8::cpu::step_cpu);
  m.impl("step.quantized", &adagrad8::cpu::step_quantized_cpu);
}
