// Counter-based random numbers for stochastic rounding (ALGORITHM.md §4).
//
// A uniform number is a pure function of (seed, step, flat element index): no generator
// state, so a step is reproducible, independent of how work is split across threads or
// CUDA blocks, and identical on CPU and GPU. The per-element part uses only 32-bit
// integer ops so that it vectorizes.
#pragma once

#include <cstdint>

#include "adagrad8/macros.h"

namespace adagrad8 {

// 64-bit finalizer (the splitmix64 output function).
ADAGRAD8_HD uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// 32-bit finalizer (multiply-xorshift with low-bias constants).
ADAGRAD8_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Key of one tensor at one step.
// The step count as the int64 of the stochastic-rounding key. Converting a float outside
// [-2^63, 2^63) (NaN, an infinity, a huge count: step values are not checked, reading them
// would sync) to int64 is undefined behaviour (UBSan's float-cast-overflow found it); this
// gives INT64_MIN there on every device, what reference.py's .long() gives on x86.
ADAGRAD8_HD int64_t step_index(float step) {
  return step >= -0x1p63f && step < 0x1p63f ? static_cast<int64_t>(step) : INT64_MIN;
}

ADAGRAD8_HD uint64_t stream_key(int64_t seed, int64_t step) {
  return mix64(static_cast<uint64_t>(seed) ^ mix64(static_cast<uint64_t>(step)));
}

// Key of the 2^32-element span that holds element `index` (constant over that span).
ADAGRAD8_HD uint32_t span_key(uint64_t stream, int64_t index) {
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32);
  return static_cast<uint32_t>(stream) ^ mix32(static_cast<uint32_t>(stream >> 32) + hi);
}

// Uniform float in [0, 1) with 24 random bits.
ADAGRAD8_HD float uniform_at(uint32_t span, int64_t index) {
  const uint32_t bits = mix32(span ^ static_cast<uint32_t>(index));
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

}  // namespace adagrad8
