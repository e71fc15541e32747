// 8-bit state: dequantize, block scale, and the two rounding modes (ALGORITHM.md §3-§4, §6).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "adagrad8/macros.h"

namespace adagrad8 {

constexpr int kMapSize = 256;

ADAGRAD8_HD float dequantize(uint8_t code, const float* qmap, float absmax) {
  return qmap[code] * absmax;
}

// Midpoint between codes i and i + 1 (i < 255).
ADAGRAD8_HD float midpoint(const float* qmap, int i) { return (qmap[i] + qmap[i + 1]) * 0.5f; }

// What a value contributes to its block's scale: |s|, or 0 for NaN/Inf so that one bad
// element cannot wipe its block-mates' history (§6).
ADAGRAD8_HD float scale_candidate(float s) {
  const float a = fabsf(s);
  return a <= FLT_MAX ? a : 0.0f;
}

// Value to encode: s relative to the block's new scale. An all-zero block (scale 0) encodes
// its zeros as the code of 0.0; a non-finite value passes through and saturates below.
ADAGRAD8_HD float normalize(float s, float absmax) { return absmax > 0.0f ? s / absmax : s; }

// normalize()'s quotient without a division, for a scale S in [kReciprocalMinScale,
// kReciprocalMaxScale] known in advance (the CPU encoders beside an update, whose square root and
// division keep the divider busy): with inverse = RN(1 / S) and neg_scale = -S,
//   q = RN(s * inverse), x = RN(q + RN(s - q * S) * inverse), and once more from x,
// each a * b + c one fused multiply-add. RN(s / S) bit for bit for s in [reciprocal_exact_from(S), S]
// (Markstein's theorem; docs/decisions.md); below that the remainder s - x * S may be subnormal and
// rounded, and x may be off (it stays below 2^-40). tools/check_quotient.cpp tries both claims.
// V: float, or a vector type whose fmadd(a, b, c) argument-dependent lookup finds.
constexpr float kReciprocalMinScale = 0x1p-60f, kReciprocalMaxScale = 0x1p60f;

ADAGRAD8_HD float reciprocal_exact_from(float scale) { return fmaxf(scale * 0x1p-60f, 0x1p-101f); }

ADAGRAD8_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }

template <typename V>
ADAGRAD8_HD V quotient_by_reciprocal(const V& s, const V& neg_scale, const V& inverse) {
  const V q = s * inverse;
  const V x = fmadd(fmadd(q, neg_scale, s), inverse, q);
  return fmadd(fmadd(x, neg_scale, s), inverse, x);
}

// Round to nearest. mid holds the 255 midpoints; the code is the number of midpoints below
// x, and an x exactly on a midpoint goes to the even code. NaN and +Inf give 255.
ADAGRAD8_HD uint8_t quantize_nearest(float x, const float* mid) {
  if (x != x) return 255;
  int i = 0;  // branch-free: which way each comparison goes is unpredictable
  for (int step = 128; step > 0; step >>= 1) i += (mid[i + step - 1] < x) ? step : 0;
  if (i < 255 && x == mid[i] && (i & 1)) ++i;
  return static_cast<uint8_t>(i);
}

// The number of qmap[1..255] that are <= x (a sorted map; x not NaN).
ADAGRAD8_HD int values_at_most(float x, const float* qmap) {
  int n = 0;
  for (int step = 128; step > 0; step >>= 1) n += (qmap[n + step] <= x) ? step : 0;
  return n;
}

// Stochastic rounding between the two codes around x: up with probability
// (x - below) / (above - below), decided by the uniform number u in [0, 1).
ADAGRAD8_HD uint8_t quantize_stochastic(float x, const float* qmap, float u) {
  if (x != x) return 255;
  int lo = values_at_most(x, qmap);
  if (lo > 254) lo = 254;
  const float below = qmap[lo];
  const float frac = (x - below) / (qmap[lo + 1] - below);
  return static_cast<uint8_t>(u < frac ? lo + 1 : lo);
}

}  // namespace adagrad8
