// What one table lookup per element costs on this CPU: the floor under the 8-bit step.
//
//   g++ -O3 -mavx512f -mavx512dq -mavx512bw -mavx512vl tools/lookup_cost.cpp -o /tmp/lookup_cost
//   /tmp/lookup_cost
//
// One core, independent iterations (throughput, not latency), 16 lanes per step. Prints ns per 16
// lanes for: the gather instruction on a 32 KB table (how the 8-bit encoder reads its bucket
// table), the same with one scalar load per lane, a 256-entry lookup held in registers (8
// two-register permutes and a 3-level blend: how stochastic rounding finds a value's neighbours),
// the same table as two 16-bit planes, 32 codes at a time (how codes are decoded), vdivps, and
// the 8-bit step's costly instructions in one loop, independent of each other: per 16 elements a
// gather, half a 32-code decode, the encoder's division, and the update's square root and
// division. The last shows how much the core overlaps them: far less time than their sum.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kN = 1 << 16;  // indices per pass (256 KB: in L2)
constexpr int kPasses = 2000;

template <typename F>
double ns_per_16(F&& body) {
  body();  // warm up
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kPasses; ++r) body();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(kN) * kPasses / 16);
}

}  // namespace

int main() {
  alignas(64) static int32_t table[8192];  // 32 KB, the size of the encoder's bucket table
  for (int i = 0; i < 8192; ++i) table[i] = i * 7;
  std::vector<int32_t> idx(kN);
  for (int i = 0; i < kN; ++i) idx[i] = static_cast<int32_t>((i * 2654435761u) & 8191u);

  __m512i acc = _mm512_setzero_si512();
  // Each body sums into a local (a captured accumulator would chain the iterations through memory).
  const double gather = ns_per_16([&] {
    __m512i a = acc;
    for (int i = 0; i < kN; i += 16) a = _mm512_add_epi32(a, _mm512_i32gather_epi32(_mm512_loadu_si512(&idx[i]), table, 4));
    acc = a;
  });
  int64_t sacc = 0;
  const double scalar = ns_per_16([&] {
    int64_t a = 0;
    for (int i = 0; i < kN; ++i) a += table[idx[i]];
    sacc += a;
  });
  __m512 reg[16];
  for (int i = 0; i < 16; ++i) reg[i] = _mm512_loadu_ps(reinterpret_cast<const float*>(table) + 16 * i);
  __m512 facc = _mm512_setzero_ps();
  const double permute = ns_per_16([&] {
    __m512 t[16], a = facc;
    for (int k = 0; k < 16; ++k) t[k] = reg[k];
    for (int i = 0; i < kN; i += 16) {
      const __m512i c = _mm512_and_si512(_mm512_loadu_si512(&idx[i]), _mm512_set1_epi32(255));
      __m512 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(t[2 * k], c, t[2 * k + 1]);
      const __mmask16 b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
      const __mmask16 b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
      const __mmask16 b7 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(128));
      for (int k = 0; k < 4; ++k) r[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
      for (int k = 0; k < 2; ++k) r[k] = _mm512_mask_blend_ps(b6, r[2 * k], r[2 * k + 1]);
      a = _mm512_add_ps(a, _mm512_mask_blend_ps(b7, r[0], r[1]));
    }
    facc = a;
  });
  // The same 256 entries as two 16-bit planes (low and high halves), 32 codes per step: 4 word
  // permutes per plane, a 2-level blend, an unpack (the unpack's in-lane order is ignored here).
  __m512i lo[8], hi[8];
  for (int i = 0; i < 8; ++i) {
    lo[i] = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(table) + 32 * i);
    hi[i] = _mm512_loadu_si512(reinterpret_cast<const uint16_t*>(table) + 256 + 32 * i);
  }
  const auto plane = [](const __m512i* t, __m512i c, __mmask32 b6, __mmask32 b7) {
    const __m512i r0 = _mm512_permutex2var_epi16(t[0], c, t[1]), r1 = _mm512_permutex2var_epi16(t[2], c, t[3]);
    const __m512i r2 = _mm512_permutex2var_epi16(t[4], c, t[5]), r3 = _mm512_permutex2var_epi16(t[6], c, t[7]);
    return _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, r0, r1), _mm512_mask_blend_epi16(b6, r2, r3));
  };
  // The 32 values of idx[i..i+32) from the planes tl/th, summed pairwise (the unpack's in-lane
  // order is ignored here).
  const auto decode32 = [&](const __m512i* tl, const __m512i* th, int i) {
    const __m512i c = _mm512_and_si512(_mm512_packus_epi32(_mm512_loadu_si512(&idx[i]), _mm512_loadu_si512(&idx[i + 16])),
                                       _mm512_set1_epi16(255));
    const __mmask32 b6 = _mm512_test_epi16_mask(c, _mm512_set1_epi16(64));
    const __mmask32 b7 = _mm512_test_epi16_mask(c, _mm512_set1_epi16(128));
    const __m512i l = plane(tl, c, b6, b7), h = plane(th, c, b6, b7);
    return _mm512_add_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(l, h)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(l, h)));
  };
  const double words = ns_per_16([&] {
    __m512 a = facc;
    __m512i tl[8], th[8];
    for (int k = 0; k < 8; ++k) {
      tl[k] = lo[k];
      th[k] = hi[k];
    }
    for (int i = 0; i < kN; i += 32) {
      a = _mm512_add_ps(a, decode32(tl, th, i));
    }
    facc = a;
  });
  __m512 dacc = _mm512_setzero_ps();
  const double divide = ns_per_16([&] {
    __m512 a = dacc;
    for (int i = 0; i < kN; i += 16) {
      a = _mm512_add_ps(a, _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(&idx[i])), _mm512_set1_ps(1.5f)));
    }
    dacc = a;
  });
  std::vector<float> vals(kN);
  for (int i = 0; i < kN; ++i) vals[i] = 1.0f + static_cast<float>(i) * 1e-5f;
  const double together = ns_per_16([&] {
    __m512i g = acc;
    __m512 a = dacc, b = dacc, d = facc;
    __m512i tl[8], th[8];
    for (int k = 0; k < 8; ++k) {
      tl[k] = lo[k];
      th[k] = hi[k];
    }
    for (int i = 0; i < kN; i += 32) {
      for (int h = 0; h < 32; h += 16) {
        g = _mm512_add_epi32(g, _mm512_i32gather_epi32(_mm512_loadu_si512(&idx[i + h]), table, 4));
        const __m512 x = _mm512_loadu_ps(&vals[i + h]);
        a = _mm512_add_ps(a, _mm512_div_ps(x, _mm512_set1_ps(1.5f)));
        b = _mm512_add_ps(b, _mm512_div_ps(_mm512_set1_ps(0.3f), _mm512_add_ps(_mm512_sqrt_ps(x), _mm512_set1_ps(1e-3f))));
      }
      d = _mm512_add_ps(d, decode32(tl, th, i));
    }
    acc = g;
    dacc = _mm512_add_ps(a, b);
    facc = d;
  });
  std::printf("ns per 16 lanes, one core:\n");
  std::printf("  gather instruction (32 KB table)   %6.2f\n", gather);
  std::printf("  one scalar load per lane           %6.2f\n", scalar);
  std::printf("  256 entries in registers (permute) %6.2f\n", permute);
  std::printf("  256 entries as 16-bit planes       %6.2f\n", words);
  std::printf("  vdivps                             %6.2f\n", divide);
  std::printf("  gather + decode + 2 vdivps + vsqrtps, one loop %6.2f\n", together);
  // Keep the results alive.
  return (_mm512_reduce_add_epi32(acc) + sacc + static_cast<int64_t>(_mm512_reduce_add_ps(facc) + _mm512_reduce_add_ps(dacc))) == 42;
}
