// Tries quant.h's quotient_by_reciprocal against the division, on the float32 pairs where it is
// hardest: scales S whose reciprocal RN(1/S) is off by nearly half an ulp (the worst of many random
// significands, plus 1.0 and all ones), at exponents across [2^-60, 2^60]; for each, every s whose
// significand is a multiple of the stride, in each binade from S down to 2^-149.
//  - exact domain, s in [reciprocal_exact_from(S), S]: must equal RN(s / S) bit for bit (exit 1 if not);
//  - below it: counts the pairs that differ (the kernels redo those lanes or do not depend on them),
//    apart for s in [S * 2^-60, 2^-101), where only the subnormal remainder is to blame, and checks
//    that x stays below 2^-40 there (exit 1 if not).
//
//   g++ -O2 -mfma -ffp-contract=off -Icsrc/include tools/check_quotient.cpp -o /tmp/check_quotient
//   /tmp/check_quotient [scales per exponent, default 24] [significand stride, default 61]   # ~4 min
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "adagrad8/quant.h"

namespace {

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// Significands in [1, 2) whose float32 reciprocal has the largest rounding error, then 1 and 2 - ulp.
std::vector<float> hard_significands(int count) {
  std::mt19937 gen(7);
  std::vector<std::pair<double, float>> scored;
  for (int i = 0; i < 200 * count; ++i) {
    const float m = from_bits((127u << 23) | (gen() & 0x7fffffu));
    scored.push_back({-std::fabs(static_cast<double>(1.0f / m) - 1.0 / m), m});
  }
  std::sort(scored.begin(), scored.end());
  std::vector<float> out = {1.0f, from_bits(0x3fffffffu)};
  for (int i = 0; i + 2 < count; ++i) out.push_back(scored[i].second);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const int per_exponent = argc > 1 ? std::atoi(argv[1]) : 24;
  const uint32_t stride = argc > 2 ? static_cast<uint32_t>(std::atoi(argv[2])) : 61;
  const int exponents[] = {-60, -59, -58, -50, -44, -43, -30, -1, 0, 1, 30, 59};
  const std::vector<float> significands = hard_significands(per_exponent);
  long exact_pairs = 0, exact_wrong = 0, below_pairs = 0, below_differ = 0, floor_differ = 0, below_large = 0;
  int done = 0;
  const int total = static_cast<int>(std::size(exponents) * significands.size());
  for (int e : exponents) {
    for (float m : significands) {
      const float S = std::ldexp(m, e);
      const float neg = -S, inverse = 1.0f / S, exact_from = adagrad8::reciprocal_exact_from(S);
      for (uint32_t top = bits_of(S) & 0x7f800000u; top > 0; top -= 0x00800000u) {  // binades of s
        for (uint32_t mant = 0; mant < 0x800000u; mant += stride) {
          const float s = from_bits(top | mant);
          if (s > S) break;
          const float fast = adagrad8::quotient_by_reciprocal(s, neg, inverse), want = s / S;
          if (s >= exact_from) {
            ++exact_pairs;
            if (bits_of(fast) != bits_of(want)) {
              if (exact_wrong++ < 5) std::printf("WRONG: S=%a s=%a fast %a, division %a\n", S, s, fast, want);
            }
          } else {
            ++below_pairs;
            below_differ += bits_of(fast) != bits_of(want);
            floor_differ += bits_of(fast) != bits_of(want) && s >= S * 0x1p-60f;
            below_large += !(fast < 0x1p-40f);
          }
        }
      }
      if (++done % 16 == 0 || done == total) {
        std::fprintf(stderr, "\rcheck_quotient: %d/%d scales", done, total);
      }
    }
  }
  std::fprintf(stderr, "\n");
  std::printf("exact domain: %ld pairs, %ld differ from the division\n", exact_pairs, exact_wrong);
  std::printf("below it: %ld pairs, %ld differ from the division (%ld of them with s >= S * 2^-60), %ld at or "
              "above 2^-40\n", below_pairs, below_differ, floor_differ, below_large);
  return exact_wrong == 0 && below_large == 0 ? 0 : 1;
}
