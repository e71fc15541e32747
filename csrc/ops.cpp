// Every adagrad8 schema, in one place. Backends register kernels in cpu/ and cuda/;
// fake (meta) kernels live in torch_adagrad8/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(adagrad8, m) {
  // One Adagrad step with a float32 accumulator (ALGORITHM.md §2), over lists of tensors.
  m.def(
      "step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, Tensor[] steps, Tensor lr, "
      "float lr_decay, float weight_decay, float eps, bool maximize, Tensor[]? gnorm_scales=None, "
      "bool skip_zeros=False) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The same step with 8-bit state: codes into qmap, one float32 scale per block of block_size
  // elements (0: one block per tensor). seeds, if given, turns on stochastic rounding (§4).
  m.def(
      "step.quantized(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, Tensor(c!)[] absmax, "
      "Tensor qmap, Tensor[] steps, Tensor lr, float lr_decay, float weight_decay, float eps, bool maximize, "
      "Tensor[]? gnorm_scales=None, bool skip_zeros=False, int block_size=256, Tensor[]? seeds=None) -> ()",
      {at::Tag::pt2_compliant_tag});
  // Percentile clipping (§5): records each gradient's squared norm in its gnorm_vec (steps are
  // the already incremented counts) and returns the gnorm_scales that step takes, as one float32
  // tensor of len(grads) values (a list return would not functionalize with a mutation). One kernel for
  // every device, built from ATen ops (clip.cpp), opaque to the compiler so that a compiled step
  // clips with eager's bits.
  m.def(
      "percentile_clip(Tensor[] grads, Tensor(a!)[] gnorm_vecs, Tensor[] steps, int percentile) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
