// adagrad8::percentile_clip (ALGORITHM.md §5), for every device at once: a composite of ATen ops
// that stay on the gradients' device, so nothing is read on the host.
//
// Why an op and not the same lines in Python: inside torch.compile those lines would be fused and
// their norm reduction reordered, so a compiled step would clip with other bits than an eager one.
// Behind an op the compiled graph calls exactly what eager calls.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "validate.h"

namespace adagrad8 {
namespace {

// n2 is norm(g)^2, not a sum of squares: ATen's norm needs no gradient-sized float32 temporary
// (a bf16 gradient's squares would), at the cost of up to two roundings more (docs/decisions.md).
at::Tensor clip_one(const at::Tensor& grad, const at::Tensor& gnorm_vec, const at::Tensor& step,
                    int64_t percentile) {
  const at::Tensor n2 = at::linalg_vector_norm(grad, 2, std::nullopt, false, at::kFloat).square();
  const at::Tensor t = step.reshape({});
  // A NaN or infinite step (values are not checked: reading them would sync) writes slot 0
  // rather than converting NaN to an index (undefined; out of range on a GPU).
  const at::Tensor slot = at::remainder(t, kHistory).nan_to_num(0.0).clamp(0, kHistory - 1).to(at::kLong).reshape({1});
  const at::Tensor fresh = at::logical_or(t.eq(1), gnorm_vec.select(0, 0).eq(kNoHistory));
  const at::Tensor recorded = gnorm_vec.index_put({slot}, n2.reshape({1}));
  gnorm_vec.copy_(at::where(fresh, n2.expand({kHistory}), recorded));
  const at::Tensor clip = std::get<0>(at::sort(gnorm_vec)).select(0, percentile).sqrt();
  const at::Tensor current = n2.sqrt();
  return at::where(current.gt(clip), clip / current, at::ones_like(current));
}

at::Tensor percentile_clip(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                           int64_t percentile) {
  check_percentile_clip(grads, gnorm_vecs, steps, percentile);
  if (grads.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  std::vector<at::Tensor> scales;
  scales.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) scales.push_back(clip_one(grads[i], gnorm_vecs[i], steps[i], percentile));
  return at::stack(scales);
}

}  // namespace
}  // namespace adagrad8

TORCH_LIBRARY_IMPL(adagrad8, CompositeExplicitAutograd, m) {
  m.impl("percentile_clip", &adagrad8::percentile_clip);
}
