// CPU kernels for adagrad8::step and adagrad8::step.quantized.
//
// Compiled once per instruction set with CPU_CAPABILITY set (see CMakeLists.txt). The math
// is the shared per-element code of csrc/include/adagrad8, applied with Vectorized<float>
// where a whole vector is available and element by element elsewhere; both give the same
// bits because every step is one correctly rounded IEEE operation (no FMA contraction).
#include "cpu/kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr, _mm_setcsr
#endif

#include "adagrad8/quant.h"
#include "adagrad8/rng.h"

namespace adagrad8::cpu::CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;

// A float's bit pattern and back.
inline uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}
inline float bits_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Work is cut into spans of at most kSpan elements of one tensor and parallel_for hands out
// whole spans, so no result depends on the number of threads.
constexpr int64_t kSpan = int64_t{1} << 15;

// The loops over params, grads, sums and codes read them this many elements ahead of time (2 KB of
// fp32). Without it a step waited on memory (Intel Xeon, 2 threads, 16M elements: the 8-bit step took
// 0.60-0.63 ns per element, with it 0.50-0.52).
constexpr int64_t kPrefetch = 512;

// Asks for the memory of elements [at, at + count) of the array at p, one request per 64 bytes
// from the first element's address (into L1, for reading). Callers step through an array in
// order, so every line is asked for by one call or the next. The elements may lie past the array's
// end: a prefetch never faults, and the address is formed as an integer, since pointer arithmetic
// past the end is undefined.
template <typename T>
inline void prefetch(const T* p, int64_t at, int64_t count) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(at) * sizeof(T);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(first + b), 0, 3);
  }
}

template <typename T>
constexpr int kParts = static_cast<int>(sizeof(float) / sizeof(T));  // fVecs per Vectorized<T>
template <typename T>
constexpr int64_t kLane = kParts<T> * fVec::size();  // elements per vector iteration

template <typename T>
void load_float(const T* src, fVec* out) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = fVec::loadu(src);
  } else {
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src));
  }
}

template <typename T>
void store_float(T* dst, const fVec* in) {
  if constexpr (std::is_same_v<T, float>) {
    in[0].store(dst);
  } else {
    at::vec::convert_from_float<T>(in[0], in[1]).store(dst);
  }
}

// Per-tensor constants broadcast once, and whether weight decay applies (a flag: the loops re-tested
// c.weight_decay != 0 with a float compare before every vector).
struct Lanes {
  fVec zero{0.0f}, weight_decay, eps, clr, gnorm_scale;
  bool decayed;
  Lanes(const StepConfig& c, const Item& it)
      : weight_decay(c.weight_decay), eps(c.eps), clr(it.clr), gnorm_scale(it.gnorm_scale), decayed(c.weight_decay != 0.0f) {}
};

// Plain: the caller has checked that the step has none of maximize, weight decay and skip_zeros (the
// defaults), so that a loop over these carries no tests of them (update_tile).
//
// update.h's effective_grad on a vector (p is read only with weight decay). The multiply by a scale
// of 1 stays: with flush-to-zero but not denormals-are-zero set, it turns a subnormal gradient into
// 0 (a review's counterexample: skipped, the vector lanes and update_one's disagreed).
template <bool Plain = false>
inline fVec grad_vec(const fVec& p, const fVec& raw, const StepConfig& c, const Lanes& k) {
  fVec g = raw * k.gnorm_scale;
  if (!Plain && c.maximize) g = g.neg();
  if (!Plain && k.decayed) g = g + k.weight_decay * p;
  return g;
}

// update.h's accumulate and skipped: the new accumulator only.
template <bool Plain = false>
inline void accumulate_vec(const fVec& p, const fVec& raw, fVec& s, const StepConfig& c, const Lanes& k) {
  const fVec g = grad_vec<Plain>(p, raw, c, k);
  const fVec s_new = s + g * g;
  s = !Plain && c.skip_zeros ? fVec::blendv(s_new, s, raw == k.zero) : s_new;
}

// update.h's effective_grad / accumulate / updated_param / skipped: accumulator and parameter.
template <bool Plain = false>
inline void update_vec(fVec& p, const fVec& raw, fVec& s, const StepConfig& c, const Lanes& k) {
  const fVec g = grad_vec<Plain>(p, raw, c, k);
  const fVec s_new = s + g * g;
  const fVec p_new = p - (k.clr * g) / (s_new.sqrt() + k.eps);
  if (!Plain && c.skip_zeros) {
    const fVec keep = raw == k.zero;
    p = fVec::blendv(p_new, p, keep);
    s = fVec::blendv(s_new, s, keep);
  } else {
    p = p_new;
    s = s_new;
  }
}

// The same on one element; p and s are updated in place.
inline void update_one(float& p, float raw, float& s, const StepConfig& c, const Item& it) {
  if (skipped(raw, c)) return;
  const float g = effective_grad(raw, p, it.gnorm_scale, c);
  s = accumulate(s, g);
  p = updated_param(p, g, s, it.clr, c.eps);
}

// ---- fp32 state --------------------------------------------------------------------------

template <typename T>
void fp32_range(const Item& it, const StepConfig& c, int64_t begin, int64_t end) {
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  float* sum = it.sum;
  const Lanes k(c, it);
  int64_t i = begin;
  for (; i + kLane<T> <= end; i += kLane<T>) {
    prefetch(param, i + kPrefetch, kLane<T>);
    prefetch(grad, i + kPrefetch, kLane<T>);
    prefetch(sum, i + kPrefetch, kLane<T>);
    fVec p[kParts<T>], g[kParts<T>];
    load_float(param + i, p);
    load_float(grad + i, g);
    for (int j = 0; j < kParts<T>; ++j) {
      float* s_at = sum + i + j * fVec::size();
      fVec s = fVec::loadu(s_at);
      update_vec(p[j], g[j], s, c, k);
      s.store(s_at);
    }
    store_float(param + i, p);
  }
  for (; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    update_one(p, static_cast<float>(grad[i]), sum[i], c, it);
    param[i] = static_cast<T>(p);
  }
}

// ---- 8-bit state: vector helpers ---------------------------------------------------------
//
// The 8-bit loops decode codes with a MapDecoder (the map in registers on AVX-512, plain loads on
// AVX2) and find new codes through a gather from a bucket table (Buckets below: AVX2, and AVX-512
// where Call::gather_codes says gathers are fast) or with a CodeCounter (AVX-512: register permutes,
// for CPUs with slow gathers; the lanes it cannot count take the bucket table). at::vec lacks
// byte<->int32 lane conversions, integer gathers and these lookups, so they are written per
// instruction set here.

using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == fVec::size());

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline int max_byte(__m128i q) {  // the largest of 16 unsigned bytes
  q = _mm_max_epu8(q, _mm_srli_si128(q, 8));
  q = _mm_max_epu8(q, _mm_srli_si128(q, 4));
  q = _mm_max_epu8(q, _mm_srli_si128(q, 2));
  q = _mm_max_epu8(q, _mm_srli_si128(q, 1));
  return _mm_cvtsi128_si32(q) & 0xff;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline void store_codes(uint8_t* dst, const iVec& codes) {  // lanes hold 0..255
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
}
inline iVec bits_of(const fVec& v) { return _mm512_castps_si512(v); }
inline iVec shift_right_logical(const iVec& v, int k) { return _mm512_srli_epi32(v, k); }
using LaneMask = __mmask16;  // lanes that need the per-element path
inline bool any_lane(LaneMask m) { return m != 0; }
// max(m, |s|) where |s| is finite, m where it is not (scale_candidate on lanes).
inline fVec max_finite_abs(const fVec& m, const fVec& s) {
  const __m512 a = _mm512_abs_ps(s);
  return _mm512_mask_max_ps(m, _mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MAX), _CMP_LE_OQ), m, a);
}
// The largest of the n codes at p (n a multiple of 64).
inline int max_code(const uint8_t* p, int64_t n) {
  __m512i m = _mm512_setzero_si512();
  for (int64_t i = 0; i < n; i += 64) m = _mm512_max_epu8(m, _mm512_loadu_si512(p + i));
  const __m256i h = _mm256_max_epu8(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64(m, 1));
  return max_byte(_mm_max_epu8(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// Word i of a 256-word table held in 8 registers t, for the 32 word indices i (b6, b7: their bits
// 6 and 7): 4 two-register permutes on bits 0-5, then a blend on each of bits 6 and 7.
inline __m512i plane(const __m512i* t, __m512i i, __mmask32 b6, __mmask32 b7) {
  const __m512i r0 = _mm512_permutex2var_epi16(t[0], i, t[1]);
  const __m512i r1 = _mm512_permutex2var_epi16(t[2], i, t[3]);
  const __m512i r2 = _mm512_permutex2var_epi16(t[4], i, t[5]);
  const __m512i r3 = _mm512_permutex2var_epi16(t[6], i, t[7]);
  return _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, r0, r1), _mm512_mask_blend_epi16(b6, r2, r3));
}

// Decoding: 32 codes at a time from the map split into two 16-bit planes (low and high halves of
// each float), 64 words per register pair: 4 word permutes per plane, a 2-level blend on the
// code's bits 6 and 7, and an unpack that joins the halves (2.05 ns per 16 codes on Zen 4,
// against 3.1 with 32-bit permutes). Codes are reordered first so that the in-lane unpack yields
// elements in order.
class MapDecoder {
 public:
  static constexpr int64_t kWidth = 32;  // lookup()
#if defined(ADAGRAD8_VBMI)
  static constexpr int64_t kDecodeWidth = 64;  // decode()
#else
  static constexpr int64_t kDecodeWidth = 32;
#endif
  explicit MapDecoder(const float* qmap) {
    alignas(64) uint16_t lo[kMapSize], hi[kMapSize];
    for (int i = 0; i < kMapSize; ++i) {
      const uint32_t bits = float_bits(qmap[i]);
      lo[i] = static_cast<uint16_t>(bits & 0xffffu);
      hi[i] = static_cast<uint16_t>(bits >> 16);
    }
    for (int i = 0; i < 8; ++i) {
      lo_[i] = _mm512_load_si512(lo + 32 * i);
      hi_[i] = _mm512_load_si512(hi + 32 * i);
    }
#if defined(ADAGRAD8_VBMI)
    alignas(64) uint8_t planes[4][kMapSize];
    for (int i = 0; i < kMapSize; ++i) {
      for (int b = 0; b < 4; ++b) planes[b][i] = static_cast<uint8_t>(float_bits(qmap[i]) >> (8 * b));
    }
    for (int b = 0; b < 4; ++b) {
      for (int i = 0; i < 4; ++i) bytes_[4 * b + i] = _mm512_load_si512(planes[b] + 64 * i);
    }
    // The unpacks below leave in 128-bit lane L of out[m] the bytes at 16L + 4m + d (d < 4); that
    // position must hold element 16m + 4L + d.
    alignas(64) uint8_t byte_order[kDecodeWidth];
    for (int L = 0; L < 4; ++L) {
      for (int m = 0; m < 4; ++m) {
        for (int d = 0; d < 4; ++d) byte_order[16 * L + 4 * m + d] = static_cast<uint8_t>(16 * m + 4 * L + d);
      }
    }
    byte_order_ = _mm512_load_si512(byte_order);
#endif
    // unpacklo/hi_epi16 take words 0-3 / 4-7 of each 128-bit lane j: word 8j + k must hold element
    // 4j + k, and word 8j + 4 + k element 16 + 4j + k (k < 4).
    alignas(64) uint16_t order[kWidth];
    for (int j = 0; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        order[8 * j + k] = static_cast<uint16_t>(4 * j + k);
        order[8 * j + 4 + k] = static_cast<uint16_t>(16 + 4 * j + k);
      }
    }
    order_ = _mm512_load_si512(order);
  }
#if defined(ADAGRAD8_VBMI)
  // The map's values of codes[0..64), into out[0..4): byte permutes on four byte planes of the map.
  void decode(const uint8_t* codes, fVec* out) const { lookup_bytes(byte_index(_mm512_loadu_si512(codes)), out); }
  // 64 codes for lookup_bytes: reordered (see byte_order_) and their bit 7. One ByteIndex serves any
  // number of MapDecoders.
  struct ByteIndex {
    __m512i c;
    __mmask64 b7;
  };
  ByteIndex byte_index(__m512i codes) const {
    const __m512i c = _mm512_permutexvar_epi8(byte_order_, codes);
    return {c, _mm512_movepi8_mask(c)};
  }
  void lookup_bytes(const ByteIndex& index, fVec* out) const {
    const __m512i c = index.c;
    const __mmask64 b7 = index.b7;
    __m512i p[4];
    for (int b = 0; b < 4; ++b) {
      p[b] = _mm512_mask_blend_epi8(b7, _mm512_permutex2var_epi8(bytes_[4 * b], c, bytes_[4 * b + 1]),
                                    _mm512_permutex2var_epi8(bytes_[4 * b + 2], c, bytes_[4 * b + 3]));
    }
    const __m512i w01lo = _mm512_unpacklo_epi8(p[0], p[1]), w01hi = _mm512_unpackhi_epi8(p[0], p[1]);
    const __m512i w23lo = _mm512_unpacklo_epi8(p[2], p[3]), w23hi = _mm512_unpackhi_epi8(p[2], p[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01lo, w23lo));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01lo, w23lo));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01hi, w23hi));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01hi, w23hi));
  }
#else
  // The map's values of codes[0..32), into out[0] and out[1].
  void decode(const uint8_t* codes, fVec* out) const {
    lookup_words(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes))), out);
  }
#endif
  // The map's values at index[0] and index[1] (16 lanes of 0..255 each).
  void lookup(const iVec* index, fVec* out) const {
    const __m256i first = _mm512_cvtepi32_epi16(index[0]);
    lookup_words(_mm512_inserti64x4(_mm512_castsi256_si512(first), _mm512_cvtepi32_epi16(index[1]), 1), out);
  }
  // The same for 32 indices, one per 16-bit lane.
  void lookup_words(__m512i c, fVec* out) const {
    c = _mm512_permutexvar_epi16(order_, c);
    const __mmask32 b6 = _mm512_test_epi16_mask(c, _mm512_set1_epi16(64));
    const __mmask32 b7 = _mm512_test_epi16_mask(c, _mm512_set1_epi16(128));
    const __m512i lo = plane(lo_, c, b6, b7);
    const __m512i hi = plane(hi_, c, b6, b7);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo, hi));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo, hi));
  }

 private:
  __m512i lo_[8], hi_[8];
  __m512i order_;
#if defined(ADAGRAD8_VBMI)
  __m512i bytes_[16];  // byte b of value 64i + k: byte k of bytes_[4b + i]
  __m512i byte_order_;
#endif
};
#elif defined(CPU_CAPABILITY_AVX2)
inline iVec load_codes(const uint8_t* src) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
}
inline void store_codes(uint8_t* dst, const iVec& codes) {  // lanes hold 0..255
  const __m256i v = codes;
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(words, words));
}
inline fVec gather(const float* table, const iVec& index) { return _mm256_i32gather_ps(table, index, 4); }
inline iVec gather(const int32_t* table, const iVec& index) { return _mm256_i32gather_epi32(table, index, 4); }
inline iVec bits_of(const fVec& v) { return _mm256_castps_si256(v); }
inline iVec shift_right_logical(const iVec& v, int k) { return _mm256_srli_epi32(v, k); }
inline iVec shift_right_arith(const iVec& v, int k) { return _mm256_srai_epi32(v, k); }
using LaneMask = iVec;  // all ones in lanes that need the per-element path
inline bool any_lane(const iVec& v) { return !_mm256_testz_si256(v, v); }
inline bool all_lanes(const fVec& m) { return _mm256_movemask_ps(m) == 0xff; }  // m: a compare's result
inline fVec max_finite_abs(const fVec& m, const fVec& s) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s);
  return _mm256_max_ps(m, _mm256_and_ps(a, _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ)));
}
// The largest of the n codes at p (n a multiple of 32).
inline int max_code(const uint8_t* p, int64_t n) {
  __m256i m = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 32) m = _mm256_max_epu8(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  return max_byte(_mm_max_epu8(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1)));
}

// Decoding 16 codes at a time (2 vectors, as on AVX-512) by plain loads: per lane a byte load and a
// load into a lane (vinsertps from memory). On AMD Zen 3 a vgatherdps of 8 lanes costs 9-12 cycles
// (tools/instruction_cost.cpp), more than the 16 loads and their inserts: block-wise steps 1.54 ->
// 1.34 ns per element (one thread, 1M elements, in one process). lookup() (codes already in lanes,
// the rare paths) gathers.
class MapDecoder {
 public:
  static constexpr int64_t kWidth = 16;
  static constexpr int64_t kDecodeWidth = kWidth;
  // A code's value and (Codebook::ranges) the x in [lo, hi] that round to it (nearest rounding), or
  // its neighbours' values (stochastic rounding).
  struct Range {
    float value, lo, hi, pad;
  };
  explicit MapDecoder(const float* qmap) : qmap_(qmap) {}
  void set_ranges(const Range* ranges) { ranges_ = ranges; }
  void decode(const uint8_t* codes, fVec* out) const {
    out[0] = values(codes);
    out[1] = values(codes + 8);
  }
  // decode, and the codes' ranges into lo[0..2) and hi[0..2): one 16-byte load a lane and a transpose
  // (11 shuffles for 8 lanes, against the 8 inserts of the values alone).
  void decode(const uint8_t* codes, fVec* out, fVec* lo, fVec* hi) const {
    for (int n = 0; n < 2; ++n) {
      const uint8_t* c = codes + 8 * n;
      const auto row = [this](uint8_t k) { return _mm_load_ps(&ranges_[k].value); };
      const auto rows = [&row](uint8_t a, uint8_t b) {
        return _mm256_insertf128_ps(_mm256_castps128_ps256(row(a)), row(b), 1);
      };
      const __m256 r04 = rows(c[0], c[4]), r15 = rows(c[1], c[5]), r26 = rows(c[2], c[6]), r37 = rows(c[3], c[7]);
      const __m256 low01 = _mm256_unpacklo_ps(r04, r15);   // value 0 1, lo 0 1 | value 4 5, lo 4 5
      const __m256 low23 = _mm256_unpacklo_ps(r26, r37);   // value 2 3, lo 2 3 | value 6 7, lo 6 7
      const __m256 high01 = _mm256_unpackhi_ps(r04, r15);  // hi 0 1, unused | hi 4 5, unused
      const __m256 high23 = _mm256_unpackhi_ps(r26, r37);  // hi 2 3, unused | hi 6 7, unused
      out[n] = _mm256_shuffle_ps(low01, low23, _MM_SHUFFLE(1, 0, 1, 0));
      lo[n] = _mm256_shuffle_ps(low01, low23, _MM_SHUFFLE(3, 2, 3, 2));
      hi[n] = _mm256_shuffle_ps(high01, high23, _MM_SHUFFLE(1, 0, 1, 0));
    }
  }
  void lookup(const iVec* index, fVec* out) const {
    out[0] = gather(qmap_, index[0]);
    out[1] = gather(qmap_, index[1]);
  }

 private:
  fVec values(const uint8_t* c) const {  // the map's values of codes c[0..8)
    const float* q = qmap_;
    return _mm256_setr_ps(q[c[0]], q[c[1]], q[c[2]], q[c[3]], q[c[4]], q[c[5]], q[c[6]], q[c[7]]);
  }
  const float* qmap_;
  const Range* ranges_ = nullptr;
};
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define ADAGRAD8_VECTOR_CODES 1  // the DEFAULT build runs the 8-bit code element by element
#endif

// ---- stochastic-rounding numbers on vectors (rng.h, lane by lane) -------------------------
#ifdef ADAGRAD8_VECTOR_CODES

inline iVec mix32_vec(iVec x) {
  x = x ^ shift_right_logical(x, 16);
  x = x * iVec(0x7feb352d);
  x = x ^ shift_right_logical(x, 15);
  x = x * iVec(static_cast<int32_t>(0x846ca68bu));
  return x ^ shift_right_logical(x, 16);
}

// uniform_at's number times 2^24 (its 24 random bits as an integer, exact in a float) on lanes.
inline fVec uniform_ticks_vec(const iVec& span, const iVec& index) {
  return at::vec::convert_to_fp_of_same_size<float>(shift_right_logical(mix32_vec(span ^ index), 8));
}

// uniform_at on lanes: span, span_key broadcast (the same for every lane); index, the lanes' flat
// element indices (their low 32 bits).
inline fVec uniform_vec(const iVec& span, const iVec& index) {
  return uniform_ticks_vec(span, index) * fVec(1.0f / 16777216.0f);
}

// The same for the lanes' indices first + iota.
inline fVec uniform_vec(uint32_t span, int64_t first, const iVec& iota) {
  return uniform_vec(iVec(static_cast<int32_t>(span)), iVec(static_cast<int32_t>(static_cast<uint32_t>(first))) + iota);
}
#endif

// ---- 8-bit state: finding codes with one table read --------------------------------------

// Counts the values of a sorted table that lie below x (or at most x), for x in [0, 1], with
// one read of a bucket table. x is bucketed on its float bits: bucket 0 is [0, 2^-30), and
// each further bucket is one value of the top 17 bits (exponent and 8 mantissa bits, so at
// most 0.4% wide, narrower than any gap between neighbouring values of the named maps). An
// entry holds the count of values below the bucket in its high 16 bits and, below them,
// 0xffff - t, where t is the low 15 bits of the one value inside the bucket (x and the value
// share the high bits), less one where x equal to it counts it, or 0x7fff where there is none.
// Adding x's low 15 bits carries into bit 16 exactly when they exceed t, so the count is
// (entry + (x & 0x7fff)) >> 16: three integer instructions, where a compare into a mask register
// and a masked add took five. A bucket that holds more than one value (other maps) has a count of
// kSearch, and so has the entry after the last bucket, which lanes above 1.0's bucket (NaN and
// infinities too) and negative ones (-0.0 too) read: the caller falls back to the binary search
// for counts above 255. Lanes in 1.0's bucket above 1.0 (up to 1 + 2^-8) read 1.0's entry, which
// counts what the binary search would: the map is checked to lie in [-1, 1] (validate.cpp), so
// nothing lies between 1.0 and them. (Vector gathers were first tried for a branch-free binary
// search: 8 dependent gathers cost 6.5 ns per element on this AMD CPU. One independent gather is
// cheap.)
class Buckets {
 public:
  static constexpr int kShift = 15;
  static constexpr int32_t kFirst = (97 << 23) >> kShift;  // key of 2^-30
  static constexpr int32_t kLast = (127 << 23) >> kShift;  // key of 1.0
  static constexpr int32_t kCount = kLast - kFirst + 2;    // buckets; entry_[kCount] is the one after
  static constexpr int32_t kSearch = 0x7fff;               // the count of a bucket that needs the search
  static constexpr int32_t kNever = 0x7fff;                // a threshold no low part exceeds
  static constexpr uint32_t kOne = 0x3f800000u;            // 1.0f

  // v: n sorted values. inclusive: count values <= x, else values < x; odd_ties_up: an x equal
  // to a value whose count below is odd counts it (round-half-to-even between codes).
  void build(const float* v, int n, bool inclusive, bool odd_ties_up) {
    int below = 0;  // values below the current bucket
    while (below < n && v[below] < 0.0f) ++below;
    for (int32_t b = 0; b < kCount; ++b) {
      const float upper = b + 1 < kCount ? lower_edge(b + 1) : std::nextafter(1.0f, 2.0f);
      int in = below;
      while (in < n && v[in] < upper) ++in;
      int32_t threshold = kNever;
      bool search = in - below > 1;
      if (in - below == 1) {
        const bool ties_up = inclusive || (odd_ties_up && (below & 1));
        if (b > 0) {
          threshold = static_cast<int32_t>(low_bits(v[below])) - (ties_up ? 1 : 0);
        } else {  // bucket 0's values do not share high bits; only an exact 0 is simple
          search = !(v[below] == 0.0f && ties_up);
          threshold = -1;
        }
      }
      entry_[b] = search ? entry(kSearch, kNever) : entry(below, threshold);
      below = in;
    }
    entry_[kCount] = entry(kSearch, kNever);
  }

  // The count for x, or -1 when x needs the binary search.
  int count(float x) const {
    const uint32_t bits = float_bits(x);
    if (bits > kOne) return -1;  // negative (-0.0 too), above 1, NaN
    const int32_t key = static_cast<int32_t>(bits >> kShift);
    const int n = count_from(entry_[std::max(key - (kFirst - 1), 0)], bits);
    return n > 255 ? -1 : n;
  }

#if defined(CPU_CAPABILITY_AVX512)
  // The same for lanes: counts above 255 (kSearch) mark lanes that need the search.
  iVec count(const fVec& x) const {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i key = _mm512_srli_epi32(bits, kShift);  // negative lanes: above 0xffff
    const __m512i index = _mm512_min_epi32(
        _mm512_max_epi32(_mm512_sub_epi32(key, _mm512_set1_epi32(kFirst - 1)), _mm512_setzero_si512()),
        _mm512_set1_epi32(kCount));
    const __m512i e = _mm512_i32gather_epi32(index, entry_, 4);
    return _mm512_srli_epi32(_mm512_add_epi32(e, _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff))), 16);
  }
  // The same; lanes that need the search are set in `search`.
  iVec count(const fVec& x, LaneMask& search) const {
    const iVec n = count(x);
    search = _mm512_cmpgt_epi32_mask(n, _mm512_set1_epi32(255));
    return n;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // The same for lanes; lanes that need the search are set in `search` (their count is kSearch).
  iVec count(const fVec& x, LaneMask& search) const {
    const iVec bits = bits_of(x);
    const iVec key = shift_right_logical(bits, kShift);  // negative lanes: above 0xffff
    const iVec index = at::vec::minimum(iVec(kCount), at::vec::maximum(key - iVec(kFirst - 1), iVec(0)));
    const iVec n = shift_right_logical(gather(entry_, index) + (bits & iVec(0x7fff)), 16);
    search = n > iVec(255);
    return n;
  }
#endif

 private:
  static float lower_edge(int32_t b) {  // b >= 1
    return bits_float(static_cast<uint32_t>(b + kFirst - 1) << kShift);
  }
  static uint32_t low_bits(float v) { return float_bits(v) & 0x7fff; }
  // below in the high half, 0xffff - threshold (0x8000 ... 0x10000) added: threshold -1 makes it
  // below + 1 with nothing under it, so every x counts the bucket's value.
  static int32_t entry(int32_t below, int32_t threshold) { return (below << 16) + (0xffff - threshold); }
  static int count_from(int32_t e, uint32_t bits) {
    return static_cast<int>((static_cast<uint32_t>(e) + (bits & 0x7fff)) >> 16);
  }
  int32_t entry_[kCount + 1];
};

#if defined(CPU_CAPABILITY_AVX512)
// The same counts (nearest: midpoints below x; stochastic: q[1..255] <= x) for 32 lanes of x in
// [0, 1] without a gather, in 16-bit lanes. A line per quarter binade of x estimates the count to
// within one below, and one comparison with the change point above the estimate, both tables held
// in registers, settles it. (The bucket table's gather, microcoded on Zen 4, took 0.31 of the 1.0 ns
// per element of a block-wise step: measured by putting a register permute in its place. On Intel
// Xeon the gather is the faster of the two: Call::gather_codes.)
//
// The line is not trusted: build() checks that the estimate e of every float x in [0, 1] has
// count(x) - 1 <= e <= count(x). Within a bucket both are nondecreasing in x, so checking the ends
// of each piece between consecutive change points covers every x. A bucket that fails the check
// (a kink or crowded values inside it; bucket 0 whenever it holds two change points) is marked,
// and lanes that fall into it take the Buckets path.
class CodeCounter {
 public:
  static constexpr int kBuckets = 128;
  static constexpr int kShift = 21;  // a bucket: the exponent and the top 2 mantissa bits of x
  static constexpr uint32_t kOne = Buckets::kOne;
  // Bucket of x = (bits >> kShift) - kBase, saturating at 0: bucket 127 holds 1.0, bucket 0 everything
  // below 1.5 * 2^-32 (its line is flat: most of those lanes' t is not their position in it).
  static constexpr int kBase = static_cast<int>(kOne >> kShift) - (kBuckets - 1);
  static constexpr uint16_t kMarked = 0xffff;  // at_ of a bucket whose lanes take the Buckets path

  // count(x): a nondecreasing count in [0, 255] of x in [0, 1]; near[k - 1]: a value at or just
  // below which the count reaches k (a guess, tried before a search: k = 1..255).
  template <typename Count>
  void build(const Count& count, const float* near) {
    uint32_t change[kMapSize + 1];  // change[k]: the first x (bits) with count >= k; kOne + 1: none
    change[0] = 0;
    for (int k = 1; k < kMapSize; ++k) change[k] = first_reaching(count, k, change[k - 1], near[k - 1]);
    change[kMapSize] = kOne + 1;
    for (int e = 0; e < kMapSize; ++e) {  // e + 1 when x >= change[e + 1]: x's bits above thr
      const int32_t thr = change[e + 1] > kOne ? INT32_MAX : static_cast<int32_t>(change[e + 1]) - 1;
      thr_hi_[e] = static_cast<uint16_t>(static_cast<uint32_t>(thr) >> 16);
      thr_lo_[e] = static_cast<uint16_t>(thr & 0xffff);
    }
    for (int b = 0, k = 0; b < kBuckets; ++b) k = fit(b, change, k);
    for (int i = 0; i < 8; ++i) {
      thr_.hi[i] = _mm512_loadu_si512(thr_hi_ + 32 * i);
      thr_.lo[i] = _mm512_loadu_si512(thr_lo_ + 32 * i);
    }
    for (int i = 0; i < 4; ++i) {
      line_.at[i] = _mm512_loadu_si512(at_ + 32 * i);
      line_.slope[i] = _mm512_loadu_si512(slope_ + 32 * i);
    }
    const __m512i words = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14,
                                           13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    line_.low_words = _mm512_add_epi16(words, words);  // word 2i of the pair of vectors: lane i's low half
    line_.high_words = _mm512_add_epi16(line_.low_words, _mm512_set1_epi16(1));
  }

  // The tables of count()'s two stages, as registers: a loop that copies them into locals keeps them
  // in registers (read from the Codebook, they were loaded again after every code store, which may
  // alias them). Both stages together need more registers than there are.
  struct LineRegs {
    __m512i at[4], slope[4], low_words, high_words;
  };
  struct ThresholdRegs {
    __m512i hi[8], lo[8];
  };
  const LineRegs& line_regs() const { return line_; }
  const ThresholdRegs& threshold_regs() const { return thr_; }

  // Stage 1 of count(): x[0] (lanes 0-15) and x[1] (16-31) split into 16-bit halves, one word per
  // lane in order, and the estimate e (the count or one less). `other` marks lanes outside [0, 1]
  // (NaN, negative, -0.0 too) or in a marked bucket: their words are not counts.
  static __m512i estimate(const LineRegs& r, const fVec* x, __m512i& hi, __m512i& lo, __mmask32& other) {
    const __m512i b0 = _mm512_castps_si512(x[0]), b1 = _mm512_castps_si512(x[1]);
    hi = _mm512_permutex2var_epi16(b0, r.high_words, b1);
    lo = _mm512_permutex2var_epi16(b0, r.low_words, b1);
    const __m512i one_hi = _mm512_set1_epi16(static_cast<int16_t>(kOne >> 16));
    const __mmask32 outside = _mm512_cmpgt_epu16_mask(hi, one_hi) |
                              _mm512_mask_test_epi16_mask(_mm512_cmpeq_epi16_mask(hi, one_hi), lo, lo);
    const __m512i bucket = _mm512_subs_epu16(_mm512_srli_epi16(hi, kShift - 16), _mm512_set1_epi16(kBase));
    const __m512i t = _mm512_or_si512(_mm512_slli_epi16(hi, 32 - kShift), _mm512_srli_epi16(lo, kShift - 16));
    const __mmask32 b6 = _mm512_test_epi16_mask(bucket, _mm512_set1_epi16(64));
    const __m512i at = _mm512_mask_blend_epi16(b6, _mm512_permutex2var_epi16(r.at[0], bucket, r.at[1]),
                                               _mm512_permutex2var_epi16(r.at[2], bucket, r.at[3]));
    const __m512i slope = _mm512_mask_blend_epi16(b6, _mm512_permutex2var_epi16(r.slope[0], bucket, r.slope[1]),
                                                  _mm512_permutex2var_epi16(r.slope[2], bucket, r.slope[3]));
    other = outside | _mm512_cmpeq_epi16_mask(at, _mm512_set1_epi16(static_cast<int16_t>(kMarked)));
    return _mm512_srli_epi16(_mm512_add_epi16(at, _mm512_mulhi_epu16(t, slope)), 8);
  }
  // Stage 2: the count, e or e + 1, from x's halves hi and lo against the change point e + 1.
  static __m512i settle(const ThresholdRegs& r, __m512i e, __m512i hi, __m512i lo) {
    const __mmask32 e6 = _mm512_test_epi16_mask(e, _mm512_set1_epi16(64));
    const __mmask32 e7 = _mm512_test_epi16_mask(e, _mm512_set1_epi16(128));
    const __m512i thr_hi = plane(r.hi, e, e6, e7), thr_lo = plane(r.lo, e, e6, e7);
    const __mmask32 up = _mm512_cmpgt_epi16_mask(hi, thr_hi) |
                         _mm512_mask_cmpgt_epu16_mask(_mm512_cmpeq_epi16_mask(hi, thr_hi), lo, thr_lo);
    return _mm512_mask_add_epi16(e, up, e, _mm512_set1_epi16(1));
  }
  // Both stages: the counts of x[0] and x[1], one per word in order (`other` as in estimate()).
  __m512i count(const fVec* x, __mmask32& other) const {
    __m512i hi, lo;
    const __m512i e = estimate(line_, x, hi, lo, other);
    return settle(thr_, e, hi, lo);
  }

 private:
  static int bucket_of(uint32_t bits) { return std::max(static_cast<int>(bits >> kShift) - kBase, 0); }

  // The first x (bits) in [0, 1] with count >= k, kOne + 1 if none; from: a known lower bound,
  // near: the guess (its float and the next are tried: 2 counts instead of a 31-step search).
  template <typename Count>
  static uint32_t first_reaching(const Count& count, int k, uint32_t from, float near) {
    if (count(bits_float(from)) >= k) return from;
    const uint32_t guess = float_bits(near);
    for (uint32_t c = guess; near >= 0.0f && c <= guess + 1; ++c) {  // from > 0 below: from reaches k - 1
      if (c > from && c <= kOne && count(bits_float(c)) >= k && count(bits_float(c - 1)) < k) return c;
    }
    uint32_t lo = from, hi = kOne + 1;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (count(bits_float(mid)) >= k) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    return lo;
  }

  static uint32_t t_bits(uint32_t bits) { return (bits >> (kShift - 16)) & 0xffff; }  // x's 16 bits below the bucket's
  // count()'s estimate of x, in the same 16-bit arithmetic on one lane.
  int estimate(uint32_t bits) const {
    const int b = bucket_of(bits);
    return static_cast<uint16_t>(at_[b] + ((t_bits(bits) * slope_[b]) >> 16)) >> 8;
  }

  // The line of bucket b, checked on its whole domain; marked if it fails. k0: the count at the
  // bucket's first x or below; returns the count at its last.
  int fit(int b, const uint32_t* change, int k0) {
    const uint32_t first = b == 0 ? 0 : static_cast<uint32_t>(b + kBase) << kShift;
    const uint32_t last = std::min((static_cast<uint32_t>(b + kBase + 1) << kShift) - 1, kOne);
    const auto t_of = [](uint32_t bits) { return static_cast<double>(t_bits(bits)); };
    while (k0 < kMapSize && change[k0 + 1] <= first) ++k0;
    int k1 = k0;
    while (k1 < kMapSize && change[k1 + 1] <= last) ++k1;
    // the stretch of count k (k0..k1) inside the bucket, between its change points; empty (to <
    // from) where the count jumps past k (equal values in the map)
    const auto stretch = [&](int k) {
      return std::pair<uint32_t, uint32_t>(k == k0 ? first : change[k], k == k1 ? last : change[k + 1] - 1);
    };
    // slope: least squares through (t(change[k]), k - 0.5) for the change points inside
    double slope = 0.0;
    if (b > 0 && k1 - k0 >= 2) {
      double st = 0, sk = 0, stt = 0, stk = 0;
      for (int k = k0 + 1; k <= k1; ++k) {
        const double t = t_of(change[k]), y = k - 0.5;
        st += t, sk += y, stt += t * t, stk += t * y;
      }
      const double n = k1 - k0, var = stt - st * st / n;
      slope = var > 0 ? (stk - st * sk / n) / var : 0.0;
    }
    // the line a + slope * t must stay in [k - 1, k + 1) on each piece of count k
    double low = -1e300, high = 1e300;
    for (int k = k0; k <= k1; ++k) {
      const auto [from, to] = stretch(k);
      if (to < from) continue;
      low = std::max(low, k - 1 - slope * t_of(from));
      high = std::min(high, k + 1 - slope * t_of(to));
    }
    // (an empty range, low >= high, is left to the exact check below, the one judge of a line)
    const double a = std::round((low + high) / 2 * 256), s = std::round(slope * 65536 * 256);
    bool ok = a >= 0 && a < kMarked && s >= 0 && s <= 0xffff;
    at_[b] = ok ? static_cast<uint16_t>(a) : kMarked;
    slope_[b] = ok ? static_cast<uint16_t>(s) : 0;
    // at + mulhi(t, slope) must not pass 0xffff anywhere in the bucket (largest at its last x): the
    // 16-bit sum would wrap, the estimate would fall inside a stretch, and checking a stretch's two
    // ends would no longer cover its inside.
    ok = ok && at_[b] + ((t_bits(last) * slope_[b]) >> 16) <= 0xffff;
    for (int k = k0; ok && k <= k1; ++k) {  // the exact check, in count()'s own arithmetic
      const auto [from, to] = stretch(k);
      ok = to < from || (estimate(from) >= k - 1 && estimate(to) <= k);
    }
    if (!ok) at_[b] = kMarked, slope_[b] = 0;
    return k1;
  }

  alignas(64) uint16_t at_[kBuckets];     // the line: estimate = (at + (t * slope >> 16)) >> 8, t the
  alignas(64) uint16_t slope_[kBuckets];  // 16 bits of x below the bucket's, at and slope in 1/256
  alignas(64) uint16_t thr_hi_[kMapSize], thr_lo_[kMapSize];  // bits just below change point e + 1
  LineRegs line_;
  ThresholdRegs thr_;
};
#endif

#ifdef ADAGRAD8_VECTOR_CODES
// quantize_stochastic's last step on lanes: lo + 1 where u < (x - below) / (above - below), else lo.
inline iVec round_up_where(const iVec& lo, const fVec& x, const fVec& below, const fVec& above, const fVec& u) {
  return lo - bits_of(u < (x - below) / (above - below));  // the compare is all ones (-1) where true
}
#endif

// Map, midpoints and the count tables for one map and rounding mode (kept across calls: codebook_for).
struct Codebook {
  float q[kMapSize + 1];  // the map, then +Inf
  float mid[kMapSize];    // the 255 midpoints, then NaN (never below x, never equal)
  Buckets buckets;        // over mid (nearest) or over q[1..255] (stochastic)
  bool sorted;            // q[0] <= q[1] <= ... <= q[255]
  bool sorted_nonneg;     // and 0 <= q[0] (max_range's bound holds)
#if defined(CPU_CAPABILITY_AVX2)
  // q[i] and q[i + 1] side by side (q[256] is +Inf): stochastic rounding's two neighbours of a count
  // by one 8-byte load (round_staged).
  alignas(64) float pairs[2 * kMapSize];
  // Nearest rounding: each code's value and the x in [lo, hi] that round to it (none: lo > hi; every
  // code's where build_ranges keeps none). Read with the code's value when the code is decoded, they
  // let an encoder keep a code without the bucket table or a division: Adagrad's nearest codes seldom
  // move once the sums have grown (docs/performance.md).
  // Stochastic rounding: each code's value and its neighbours', lo = q[c - 1] (q[0] for code 0) and
  // hi = q[c + 1] (+Inf for code 255). A new x in [lo, hi) rounds between c - 1 and c or between c
  // and c + 1, and which is known without the bucket table (round_tile); a stochastic code seldom
  // lies further than one from the new x once the sums have grown.
  alignas(64) MapDecoder::Range ranges[kMapSize];
#endif
  bool has_ranges = false;  // ranges[] holds them (AVX2)
  // With ranges: the codes whose value has the map's largest magnitude (0 and 255 for a map from -1
  // to 1, else the one twice); the largest element of a block, x = 1 or -1, has one (predicted_scale).
  uint8_t top_codes[2] = {255, 255};
#ifdef ADAGRAD8_VECTOR_CODES
  MapDecoder decoder;     // decoding and stochastic rounding's neighbours (AVX-512: the map in registers)
#endif
#if defined(CPU_CAPABILITY_AVX512)
  CodeCounter counter;    // the same counts as buckets, 32 lanes at a time without a gather
  // Stochastic rounding's second table (round_staged with byte permutes), read at the same index lo
  // as q[lo]: with scaled_gaps RN(q[lo + 1] - q[lo]) * 2^-24, else q[lo + 1]. The gaps are scaled
  // where that is exact and what the kernel's own subtraction would give under any MXCSR mode: no
  // map value is subnormal and every gap is 0 or at least 2^-102 (every named map). Twice: as byte
  // planes for the permutes, and as floats for a gather (Call::gather_codes: round_staged).
  bool scaled_gaps;
  alignas(64) std::array<float, kMapSize> next_floats;
  MapDecoder next;
#endif

  // Everything is built from the Codebook's own copy of the map: it outlives the call (codebook_for),
  // and the AVX2 decoder keeps a pointer to the values it gathers from.
  Codebook(const float* qmap, bool stochastic)
#ifdef ADAGRAD8_VECTOR_CODES
      : decoder(copy_map(q, qmap))
#endif
#if defined(CPU_CAPABILITY_AVX512)
      , scaled_gaps(gaps_scale_exactly(qmap)), next_floats(next_values(qmap, scaled_gaps)), next(next_floats.data())
#endif
  {
    copy_map(q, qmap);  // again: the DEFAULT build has no decoder
    q[kMapSize] = std::numeric_limits<float>::infinity();
    for (int i = 0; i < kMapSize - 1; ++i) mid[i] = midpoint(qmap, i);
    mid[kMapSize - 1] = std::numeric_limits<float>::quiet_NaN();
#if defined(CPU_CAPABILITY_AVX2)
    for (int i = 0; i < kMapSize; ++i) pairs[2 * i] = q[i], pairs[2 * i + 1] = q[i + 1];
#endif
    sorted = true;
    for (int i = 0; i + 1 < kMapSize; ++i) sorted = sorted && q[i] <= q[i + 1];
    sorted_nonneg = sorted && q[0] >= 0.0f;
    if (stochastic) {
      buckets.build(q + 1, kMapSize - 1, /*inclusive=*/true, false);
    } else {
      buckets.build(mid, kMapSize - 1, /*inclusive=*/false, /*odd_ties_up=*/true);
    }
#if defined(CPU_CAPABILITY_AVX2)
    build_ranges(stochastic);
#endif
#if defined(CPU_CAPABILITY_AVX512)
    if (stochastic) {
      counter.build([this](float x) { return values_at_most(x, q); }, q + 1);
    } else {
      counter.build([this](float x) { return static_cast<int>(quantize_nearest(x, mid)); }, mid);
    }
#endif
  }

  Codebook(const Codebook&) = delete;  // the AVX2 decoder points into q
  Codebook& operator=(const Codebook&) = delete;

#if defined(CPU_CAPABILITY_AVX2)
  // ranges[] from nearest(), which is nondecreasing in x for a sorted map: code c's x run from the
  // first whose code is c or more to just before the first whose code is c + 1 or more, each found by a
  // binary search over all floats but NaN in order (about 8000 calls of nearest(), 40 us). The lowest
  // code's range starts at -Inf and the highest's ends at +Inf. A map with an end among the subnormals
  // keeps none: under denormals-are-zero the encoder's check (KeepCodes) reads such an end as 0.
  // Stochastic rounding's neighbours need only a sorted map without subnormal values.
  void build_ranges(bool stochastic) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    for (int c = 0; c < kMapSize; ++c) ranges[c] = {q[c], kInf, -kInf, 0.0f};  // none
    decoder.set_ranges(ranges);
    if (!sorted) return;
    const auto subnormal = [](float x) { return x != 0.0f && std::fabs(x) < FLT_MIN; };
    if (stochastic) {  // (the neighbours are compared with x, which denormals-are-zero would read as 0)
      for (int c = 0; c < kMapSize; ++c) {
        if (subnormal(q[c])) return;
      }
      for (int c = 0; c < kMapSize; ++c) ranges[c] = {q[c], q[c > 0 ? c - 1 : 0], q[c + 1], 0.0f};  // q[256]: +Inf
      set_top_codes();
      return;
    }
    // Floats as unsigned keys in the floats' order: -Inf lowest, then ..., -0, +0, ..., +Inf.
    const auto key = [](float x) {
      const uint32_t b = float_bits(x);
      return (b & 0x80000000u) != 0 ? ~b : b | 0x80000000u;
    };
    const auto from_key = [](uint32_t k) { return bits_float((k & 0x80000000u) != 0 ? k & 0x7fffffffu : ~k); };
    const uint32_t last = key(kInf);
    uint32_t first[kMapSize + 1];  // first[c]: the key of the smallest x with nearest(x) >= c; last + 1: none
    first[0] = key(-kInf);
    first[kMapSize] = last + 1;
    for (int c = 1; c < kMapSize; ++c) {
      uint32_t lo = first[c - 1], hi = last + 1;  // the answer lies in [lo, hi]
      while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (nearest(from_key(mid)) >= c) hi = mid; else lo = mid + 1;
      }
      first[c] = lo;
    }
    for (int c = 0; c < kMapSize; ++c) {
      if (first[c] < first[c + 1] && (subnormal(from_key(first[c])) || subnormal(from_key(first[c + 1] - 1)))) return;
    }
    for (int c = 0; c < kMapSize; ++c) {
      if (first[c] < first[c + 1]) {
        ranges[c].lo = from_key(first[c]);
        ranges[c].hi = from_key(first[c + 1] - 1);
      }
    }
    set_top_codes();
  }

  // top_codes of a sorted map, and has_ranges.
  void set_top_codes() {
    const float top = std::max(std::fabs(q[0]), std::fabs(q[kMapSize - 1]));
    top_codes[0] = std::fabs(q[kMapSize - 1]) == top ? kMapSize - 1 : 0;
    top_codes[1] = std::fabs(q[0]) == top ? 0 : top_codes[0];
    has_ranges = true;
  }
#endif

  static const float* copy_map(float* dst, const float* qmap) {
    std::memcpy(dst, qmap, kMapSize * sizeof(float));
    return dst;
  }
#if defined(CPU_CAPABILITY_AVX512)
  // (Built with flush-to-zero and denormals-are-zero off: codebook_for.)
  static bool gaps_scale_exactly(const float* qmap) {
    for (int i = 0; i < kMapSize; ++i) {
      if (qmap[i] != 0.0f && std::fabs(qmap[i]) < std::numeric_limits<float>::min()) return false;
    }
    for (int i = 0; i + 1 < kMapSize; ++i) {
      const float gap = qmap[i + 1] - qmap[i];
      if (gap != 0.0f && gap < 0x1p-102f) return false;
    }
    return true;
  }
  static std::array<float, kMapSize> next_values(const float* qmap, bool scaled_gaps) {
    std::array<float, kMapSize> v{};  // v[255]: never read (lo is at most 254)
    for (int i = 0; i + 1 < kMapSize; ++i) v[i] = scaled_gaps ? (qmap[i + 1] - qmap[i]) * 0x1p-24f : qmap[i + 1];
    return v;
  }
#endif

  // quant.h's quantize_nearest(x, mid): the number of midpoints below x (ties to even).
  uint8_t nearest(float x) const {
    const int n = buckets.count(x);
    return n < 0 ? quantize_nearest(x, mid) : static_cast<uint8_t>(n);
  }

  // stochastic() with element `index`'s random number of the stream (rng.h).
  uint8_t stochastic_at(float x, uint64_t stream, int64_t index) const {
    return stochastic(x, uniform_at(span_key(stream, index), index));
  }

  // quant.h's quantize_stochastic(x, q, u); lo is the number of q[1..255] that are <= x.
  uint8_t stochastic(float x, float u) const {
    const int n = buckets.count(x);
    if (n < 0) return quantize_stochastic(x, q, u);
    const int lo = std::min(n, 254);
    const float below = q[lo];
    const float frac = (x - below) / (q[lo + 1] - below);
    return static_cast<uint8_t>(u < frac ? lo + 1 : lo);
  }

#ifdef ADAGRAD8_VECTOR_CODES
  // The same on lanes; `search` marks lanes that need the per-element path.
  iVec nearest(const fVec& x, LaneMask& search) const { return buckets.count(x, search); }

  // The same on the two vectors of a MapDecoder width (q[lo] and q[lo + 1] come from registers).
  void stochastic(const fVec* x, const fVec* u, iVec* code, LaneMask* search) const {
    iVec lo[2], up[2];
    for (int n = 0; n < 2; ++n) {
      lo[n] = at::vec::minimum(buckets.count(x[n], search[n]), iVec(254));
      up[n] = lo[n] + iVec(1);
    }
    fVec below[2], above[2];
    decoder.lookup(lo, below);
    decoder.lookup(up, above);
    for (int n = 0; n < 2; ++n) code[n] = round_up_where(lo[n], x[n], below[n], above[n], u[n]);
  }
#endif
};

// Elements whose new accumulator values one buffer holds (16 KB: stays in L1). A block up to
// this size is updated and encoded in one pass over memory; larger blocks take two (the first
// only finds the scale).
constexpr int64_t kTile = 4096;
// Elements updated before they are encoded, when a block is larger than that (the write pass of a
// larger block, tensor-wise state among them, whose scale the max pass has found, where write_range
// does not go chunk by chunk) or smaller (a run of whole small blocks, step_run, and the blocks of
// step_run_pipelined). Small enough that the new values are still in L1 when they are
// encoded: in 4096-element tiles they had left it, with the params, grads and codes streamed in
// between (tensor-wise steps took 1.15-1.2x as long on one core, and runs of 4096 were slower at 16M
// with two threads). Large enough to spread each loop's set-up: on the Intel Xeon, tensor-wise write
// tiles of 1024 instead of 256 took 0.96 -> 0.91 ns per element on one thread (65536 and 1M
// elements) and about 4% less at 16M with two.
constexpr int64_t kRun = 1024;

#ifdef ADAGRAD8_VECTOR_CODES
// update_tile's work on the MapDecoder::kDecodeWidth elements at j: decodes their codes under the
// scale lanes, updates them, stores the new accumulator values to out[0...] (WriteParams) and folds
// them into vmax. Always inlined: GCC made it a call, and every call reloaded the step's constants
// and the decoder, kept vmax in memory and cleared the upper registers (vzeroupper). Plain:
// update_vec's. A sink (AVX2, WriteParams; KeepCodes, Neighbours::stash) is handed each stored vector of new
// values with the old codes' values and Codebook::ranges: sink(n, s, value, lo, hi) for the vector at
// out + n * fVec::size().
template <typename T, bool WriteParams, bool Plain = false, typename Sink = std::nullptr_t>
__attribute__((always_inline)) inline void update_chunk(T* param, const T* grad, const uint8_t* codes, float* out,
                                                        int64_t j, const MapDecoder& map, const fVec& scale,
                                                        const StepConfig& c, const Lanes& k, bool read_params,
                                                        fVec& vmax, Sink&& sink = nullptr) {
  constexpr int64_t kWidth = MapDecoder::kDecodeWidth;
  constexpr bool kRanges = !std::is_same_v<std::decay_t<Sink>, std::nullptr_t>;
  static_assert(kWidth % kLane<T> == 0);
  static_assert(WriteParams || !kRanges);
  prefetch(grad, j + kPrefetch, kWidth);
  if (read_params) prefetch(param, j + kPrefetch, kWidth);
  prefetch(codes, j + kPrefetch, kWidth);
  fVec sv[kWidth / fVec::size()];
#if defined(CPU_CAPABILITY_AVX2)
  fVec lo[kWidth / fVec::size()], hi[kWidth / fVec::size()];
  if constexpr (kRanges) {
    map.decode(codes + j, sv, lo, hi);
  } else {
    map.decode(codes + j, sv);
  }
#else
  static_assert(!kRanges);
  map.decode(codes + j, sv);
#endif
  // (Unrolled: with a sink, GCC kept the loop and the ranges on the stack.)
#pragma GCC unroll 2
  for (int64_t c0 = 0; c0 < kWidth; c0 += kLane<T>) {
    fVec p[kParts<T>], g[kParts<T>];
    if (read_params) load_float(param + j + c0, p);
    load_float(grad + j + c0, g);
#pragma GCC unroll 2
    for (int q = 0; q < kParts<T>; ++q) {
      fVec& sq = sv[c0 / fVec::size() + q];
      [[maybe_unused]] const fVec value = sq;
      sq = sq * scale;
      if constexpr (WriteParams) {
        update_vec<Plain>(p[q], g[q], sq, c, k);
        sq.store(out + c0 + q * fVec::size());
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (kRanges) {
          const int n = static_cast<int>(c0 / fVec::size()) + q;
          sink(n, sq, value, lo[n], hi[n]);
        }
#endif
      } else {  // the max pass keeps nothing but the max
        accumulate_vec<Plain>(p[q], g[q], sq, c, k);
      }
      vmax = max_finite_abs(vmax, sq);
    }
    if constexpr (WriteParams) store_float(param + j + c0, p);
  }
}

inline float lane_max(const fVec& v) {  // the largest lane (lanes are finite)
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, v);
}
#endif

// Element e's new accumulator value, as update_tile computes it (without updating the parameter).
template <typename T>
float new_sum(const Call& call, const Item& it, int64_t e, float old_absmax) {
  const float raw = static_cast<float>(static_cast<const T*>(it.grad)[e]);
  const float s = dequantize(it.codes[e], call.qmap, old_absmax);
  if (skipped(raw, call.config)) return s;
  const float p = call.config.weight_decay != 0.0f ? static_cast<float>(static_cast<const T*>(it.param)[e]) : 0.0f;
  return accumulate(s, effective_grad(raw, p, it.gnorm_scale, call.config));
}

#ifdef ADAGRAD8_VECTOR_CODES
// The elements of a tile of len that update_tile takes in vectors (and hands to its sink): those up to
// the last whole decode width. The rest go element by element (and to encode_tile).
constexpr int64_t sunk_len(int64_t len) { return len / MapDecoder::kDecodeWidth * MapDecoder::kDecodeWidth; }
#endif

// The new accumulator values of the len elements at i0, from codes under old_absmax. With
// WriteParams they go into s and the parameters are updated; without, s is scratch (the max
// pass). Returns the largest finite new value (the block scale's candidate, ALGORITHM.md §6).
//
// With a sink (AVX2, Codebook::has_ranges; KeepCodes, Neighbours::stash), each vector of new values s + e of
// the elements up to the last whole MapDecoder::kDecodeWidth goes to sink(e, s, value, lo, hi) with
// the old codes' values and ranges, once stored.
template <typename T, bool WriteParams, typename Sink = std::nullptr_t>
float update_tile(const Call& call, const Item& it, int64_t i0, int64_t len, float old_absmax, const Codebook& book,
                  float* s, Sink&& sink = nullptr) {
  T* param = static_cast<T*>(it.param) + i0;
  const T* grad = static_cast<const T*>(it.grad) + i0;
  const uint8_t* codes = it.codes + i0;
  const float* qmap = call.qmap;
  const StepConfig c = call.config;  // a local copy: stores through s and param cannot change it
  const bool read_params = WriteParams || c.weight_decay != 0.0f;
  int64_t j = 0;
  float m = 0.0f;
#ifdef ADAGRAD8_VECTOR_CODES
  const Lanes k(c, it);
  const fVec scale(old_absmax);
  fVec vmax(0.0f);
#if defined(CPU_CAPABILITY_AVX2)
  // A local copy: the vector stores (which may alias anything) would otherwise make every chunk
  // reload the decoder's pointers. (AVX-512's decoder holds the map itself, 1-2 KB.)
  const MapDecoder map = book.decoder;
#else
  const MapDecoder& map = book.decoder;
#endif
  const auto chunks = [&](auto plain) {
    constexpr bool kPlain = decltype(plain)::value;
    constexpr int64_t kWidth = MapDecoder::kDecodeWidth;
    for (; j < sunk_len(len); j += kWidth) {
      if constexpr (std::is_same_v<std::decay_t<Sink>, std::nullptr_t>) {
        update_chunk<T, WriteParams, kPlain>(param, grad, codes, s + j, j, map, scale, c, k, read_params, vmax);
      } else {
        update_chunk<T, WriteParams, kPlain>(param, grad, codes, s + j, j, map, scale, c, k, read_params, vmax,
                                             [&sink, j](int n, const fVec& sq, const fVec& value, const fVec& lo,
                                                        const fVec& hi) { sink(j + n * fVec::size(), sq, value, lo, hi); });
      }
    }
  };
  if (!c.maximize && !k.decayed && !c.skip_zeros) {
    chunks(std::true_type{});
  } else {
    chunks(std::false_type{});
  }
  m = lane_max(vmax);
#else
  static_assert(std::is_same_v<std::decay_t<Sink>, std::nullptr_t>);
#endif
  for (; j < len; ++j) {
    if constexpr (WriteParams) {
      float p = static_cast<float>(param[j]);
      s[j] = dequantize(codes[j], qmap, old_absmax);
      update_one(p, static_cast<float>(grad[j]), s[j], c, it);
      param[j] = static_cast<T>(p);
    } else {
      s[j] = new_sum<T>(call, it, i0 + j, old_absmax);
    }
    m = std::max(m, scale_candidate(s[j]));
  }
  return m;
}

#ifdef ADAGRAD8_VECTOR_CODES
// s / absmax on lanes: normalize()'s quotient, without the divider where the caller allows it (fast)
// and the scale is in quant.h's range for quotient_by_reciprocal: the encoders beside an update
// (step_run_pipelined, write_range). Exact from reciprocal_exact_from(absmax) up; other s >= 0 give
// x below 2^-40 or outside [0, 1], and a caller must not depend on their bits: nearest rounding
// through the bucket table gives all of [0, 2^-30) one count or sends the lane to the exact search
// (which divides); stochastic rounding, whose fraction uses x itself, redoes the lanes that inexact()
// marks. Otherwise it divides.
class Quotient {
 public:
  Quotient(float absmax, bool fast)
      : absmax_(absmax),
        mode_(!(absmax > 0.0f)                                                          ? kCopy
              : fast && absmax >= kReciprocalMinScale && absmax <= kReciprocalMaxScale ? kMarkstein
                                                                                       : kDivide),
        scale_(absmax),
        neg_scale_(-absmax),
        inverse_(1.0f / absmax) {
#if defined(CPU_CAPABILITY_AVX512)
    tiny_bits_ = _mm512_set1_epi32(
        mode_ == kMarkstein ? static_cast<int32_t>(float_bits(reciprocal_exact_from(absmax)) - 1) : 0);
#endif
  }

  float absmax() const { return absmax_; }

#if defined(CPU_CAPABILITY_AVX512)
  // Lanes whose fast quotient may differ from the division: 0 < s < reciprocal_exact_from(absmax).
  // None unless fast. (As unsigned integers, bits(s) - 1 < bits(that bound) - 1 holds for exactly
  // those s.)
  LaneMask inexact(const fVec& s) const {
    return _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_castps_si512(s), _mm512_set1_epi32(1)), tiny_bits_);
  }
#endif

  fVec operator()(const fVec& s) const {
    if (mode_ == kMarkstein) return quotient_by_reciprocal(s, neg_scale_, inverse_);
    return mode_ == kDivide ? s / scale_ : s;
  }

 private:
  enum Mode { kCopy, kMarkstein, kDivide };  // kCopy: absmax 0 or below (normalize() leaves s)
  float absmax_;
  Mode mode_;
  fVec scale_, neg_scale_, inverse_;
#if defined(CPU_CAPABILITY_AVX512)
  __m512i tiny_bits_;
#endif
};

// Nearest rounding of the fVec::size() new values at s into codes, through the bucket table.
inline void encode_nearest_vec(const Codebook& book, uint8_t* codes, const float* s, const Quotient& div) {
  LaneMask search;
  store_codes(codes, book.nearest(div(fVec::loadu(s)), search));
  if (any_lane(search)) {  // rare: x outside [0, 1] (NaN, Inf) or a crowded bucket
    for (int64_t k = 0; k < fVec::size(); ++k) codes[k] = book.nearest(normalize(s[k], div.absmax()));
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// Whether every lane's s / scale lies in its [lo, hi] (a code's range), decided without the
// division: lo * scale < s < hi * scale in exact arithmetic, each side the sign of one fused
// multiply-add (its single rounding keeps the sign, and takes the difference to 0 at worst, which
// fails the strict compare). The quotient then rounds into [lo, hi] too. An exact tie with an end
// (or NaN, or a scale of 0) answers no.
inline bool all_in_ranges(const fVec& s, const fVec& lo, const fVec& hi, const fVec& scale) {
  const fVec zero(0.0f);
  const fVec above_lo = at::vec::fnmadd(lo, scale, s);  // s - lo * scale
  const fVec below_hi = at::vec::fmsub(hi, scale, s);   // hi * scale - s
  return all_lanes((above_lo > zero) & (below_hi > zero));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Stochastic rounding, staged: the counts lo of MapDecoder::kWidth values x through the bucket table,
// as 16-bit words capped at 254 (the code below x; the counter's stage 2 stores the same), into est.
// Returns whether a lane needs the search (x outside [0, 1], a crowded bucket).
inline bool stage_counts(const Buckets& buckets, const fVec* x, uint16_t* est) {
  // packus_epi32 interleaves the two vectors by 128-bit lane (word 8L + i holds count[0] lane 4L + i,
  // word 8L + 4 + i count[1] lane 4L + i, i < 4); a word permute puts them in order. (Two vpmovdw and
  // an insert took 5 cycles of port 5 on the Xeon, these 2.) Counts are at most 0x7fff: no saturation.
  static constexpr struct Order {
    alignas(64) uint16_t w[32];
    constexpr Order() : w() {
      for (int e = 0; e < 32; ++e) w[e] = static_cast<uint16_t>(8 * ((e % 16) / 4) + 4 * (e / 16) + e % 4);
    }
  } kOrder;
  const __m512i words = _mm512_permutexvar_epi16(_mm512_load_si512(kOrder.w),
                                                 _mm512_packus_epi32(buckets.count(x[0]), buckets.count(x[1])));
  _mm512_store_si512(est, _mm512_min_epu16(words, _mm512_set1_epi16(254)));
  return _mm512_cmpgt_epu16_mask(words, _mm512_set1_epi16(255)) != 0;
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same on AVX2 (16 values in two vectors, a gather each).
inline bool stage_counts(const Buckets& buckets, const fVec* x, uint16_t* est) {
  LaneMask search[2];
  const iVec count[2] = {buckets.count(x[0], search[0]), buckets.count(x[1], search[1])};
  // packus_epi32 interleaves by 128-bit lane (the quadwords hold count[0] lanes 0-3, count[1] lanes
  // 0-3, count[0] lanes 4-7, count[1] lanes 4-7); the quadword permute puts them in order. Counts are
  // at most 0x7fff: no saturation.
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(count[0], count[1]), _MM_SHUFFLE(3, 1, 2, 0));
  _mm256_store_si256(reinterpret_cast<__m256i*>(est), _mm256_min_epu16(words, _mm256_set1_epi16(254)));
  return any_lane(search[0] | search[1]);
}
#endif

#ifdef ADAGRAD8_VECTOR_CODES
// Stochastic rounding's random numbers (uniform_at), vector by vector for consecutive elements from
// `first` on. No vector may straddle two 2^32-element spans: `first` is a multiple of fVec::size()
// (step_run_pipelined), or all the elements lie in one span (encode_tile).
class Uniforms {
 public:
  Uniforms(uint64_t stream, int64_t first)
      : stream_(stream), at_(first), index_(iVec(static_cast<int32_t>(static_cast<uint32_t>(first))) + iVec::arange(0, 1)) {
    new_span();
  }
  fVec next() { return next_ticks() * fVec(1.0f / 16777216.0f); }
  fVec next_ticks() {  // u * 2^24 (uniform_ticks_vec)
    if ((at_ >> 32) != hi_) new_span();
    const fVec ticks = uniform_ticks_vec(span_, index_);
    index_ = index_ + iVec(fVec::size());
    at_ += fVec::size();
    return ticks;
  }

 private:
  void new_span() {
    hi_ = at_ >> 32;
    span_ = iVec(static_cast<int32_t>(span_key(stream_, at_)));
  }
  uint64_t stream_;
  int64_t at_, hi_ = 0;
  iVec index_, span_;
};
#endif

#if defined(CPU_CAPABILITY_AVX512)

// quant.h's quantize_stochastic on V lanes, the lanes whose code is one above the count lo: where
// u < (x - below) / (above - below), with below = q[lo] and `next` the second table's entry at lo
// (Codebook::next). With scaled gaps, next is RN(above - below) * 2^-24 and the test is
// u * 2^24 < (x - below) / next, the same for every x that reaches it (docs/decisions.md): both sides
// are the usual ones times 2^24, exactly, and where the fraction would be subnormal or zero the
// ticks' side is 0 or at least 1 and the fraction's below 2^-102, positive exactly when d is.
template <bool ScaledGaps>
inline __mmask16 rounds_up(const float* xs, Uniforms& uniforms, const fVec& below, const fVec& next) {
  const fVec d = fVec::loadu(xs) - below;
  if constexpr (ScaledGaps) return _mm512_cmp_ps_mask(uniforms.next_ticks(), d / next, _CMP_LT_OQ);
  return _mm512_cmp_ps_mask(uniforms.next(), d / (next - below), _CMP_LT_OQ);
}

// Stochastic rounding's last stage over n staged values of the elements first... (n a multiple of
// MapDecoder::kWidth): with lo from est and x from xs, the code lo + 1 where u < (x - q[lo]) /
// (q[lo + 1] - q[lo]), else lo (rounds_up): with byte permutes q[lo] and the second table's entry
// (Codebook::next), both at the one index lo, else q[lo] and q[lo + 1] from word planes. With Gather
// (where Call::gather_codes says gathers are fast) the second table's entries come by gathers from
// Codebook::next_floats instead: the byte permutes keep port 5 busy and the gathers mostly use the load
// ports (Intel Xeon, one thread, 262144 elements: 1.011-1.016 -> 0.940-0.963 ns per element; gathering
// q[lo] as well, 1.039-1.040). The random numbers u are made here, not staged with the counts: their
// hash is mostly shifts and multiplies, which take port 0, as do the square root and division of the
// update beside the staging. (Intel Xeon: the kernel alone on one thread no faster, steps through the
// optimizer at 16M on two threads 0.65-0.69 -> 0.63-0.67 ns per element, four rounds each in
// alternation; and no staged u to store and load.)
template <bool ScaledGaps, bool Gather>
void round_staged(const Codebook& book, uint8_t* codes, const uint16_t* est, const float* xs, int64_t n,
                  uint64_t stream, int64_t first) {
  constexpr int64_t W = MapDecoder::kWidth, V = fVec::size();
  Uniforms uniforms(stream, first);
  int64_t g = 0;
#if defined(ADAGRAD8_VBMI)
  // The byte planes stay in memory: each permute reads one of its two tables from there and the other
  // through a load into the register it overwrites. (A copy in registers took as many register moves,
  // and 42 loads and 14 spills per call to set up.)
  const MapDecoder& map = book.decoder;
  // Two groups at a time through the byte planes: their 64 codes lo as bytes (the low byte of each
  // word of the two groups), both tables' values for all 64 at once.
  alignas(64) uint8_t low_bytes[64];
  for (int k = 0; k < 64; ++k) low_bytes[k] = static_cast<uint8_t>(2 * k);  // bit 6: the second group
  const __m512i pack = _mm512_load_si512(low_bytes);
  for (; g + 2 * W <= n; g += 2 * W) {
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(est + g), pack, _mm512_load_si512(est + g + W));
    const MapDecoder::ByteIndex at = map.byte_index(lo);
    fVec below[4], next[4];
    map.lookup_bytes(at, below);
    if constexpr (Gather) {  // est's words are capped at 254 (stage_counts): inside next_floats
      for (int k = 0; k < 4; ++k) {
        const __m256i words = _mm256_load_si256(reinterpret_cast<const __m256i*>(est + g + k * V));
        next[k] = _mm512_i32gather_ps(_mm512_cvtepu16_epi32(words), book.next_floats.data(), 4);
      }
    } else {
      book.next.lookup_bytes(at, next);
    }
    __mmask64 up = 0;
    for (int k = 0; k < 4; ++k) {
      up |= static_cast<__mmask64>(rounds_up<ScaledGaps>(xs + g + k * V, uniforms, below[k], next[k])) << (16 * k);
    }
    _mm512_storeu_si512(codes + g, _mm512_mask_add_epi8(lo, up, lo, _mm512_set1_epi8(1)));
  }
#endif
  if (g == n) return;
  // Without VBMI: q[lo] and q[lo + 1] from the map's word planes, held in registers (the second table
  // as well would not fit, and read from memory it made this loop slower).
  const MapDecoder words = book.decoder;  // a local: kept in registers across the code stores
  for (; g < n; g += W) {
    const __m512i lo = _mm512_load_si512(est + g);
    fVec below[2], above[2];
    words.lookup_words(lo, below);
    words.lookup_words(_mm512_add_epi16(lo, _mm512_set1_epi16(1)), above);
    __mmask32 up = 0;
    for (int k = 0; k < 2; ++k) {
      up |= static_cast<__mmask32>(rounds_up<false>(xs + g + k * V, uniforms, below[k], above[k])) << (16 * k);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + g),
                        _mm512_cvtepi16_epi8(_mm512_mask_add_epi16(lo, up, lo, _mm512_set1_epi16(1))));
  }
}

inline void round_staged(const Codebook& book, uint8_t* codes, const uint16_t* est, const float* xs, int64_t n,
                         uint64_t stream, int64_t first, bool gather) {
  if (book.scaled_gaps) {
    (gather ? round_staged<true, true> : round_staged<true, false>)(book, codes, est, xs, n, stream, first);
  } else {
    (gather ? round_staged<false, true> : round_staged<false, false>)(book, codes, est, xs, n, stream, first);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// Stochastic rounding's last stage on AVX2 (the AVX-512 one above says what it does): per lane one
// 8-byte load of q[lo] and q[lo + 1] (Codebook::pairs), its address from the staged count lo (read
// into a general register). Staged, these loads wait on nothing but est. In one pass with the counts
// (encode_group) each waited on its gather through a store and a reload, and the steps held so many
// instructions in flight that too few groups overlapped (AMD Zen 3, one thread, 1M elements, in one
// process: 3.49 -> 2.31 ns per element). `gather` is unused: AVX2 has only the bucket table.
inline void round_staged(const Codebook& book, uint8_t* codes, const uint16_t* est, const float* xs, int64_t n,
                         uint64_t stream, int64_t first, bool /*gather*/) {
  constexpr int64_t V = fVec::size();
  const float* pairs = book.pairs;
  // q[a], q[a + 1], q[b], q[b + 1] (loadl_epi64 and loadh_pi read the floats through types that may
  // alias them; _mm_load_sd would read a double)
  const auto two_pairs = [pairs](uint16_t a, uint16_t b) {
    const __m128 low = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pairs + 2 * a)));
    return _mm_loadh_pi(low, reinterpret_cast<const __m64*>(pairs + 2 * b));
  };
  Uniforms uniforms(stream, first);
  for (int64_t g = 0; g < n; g += V) {
    const uint16_t* lo = est + g;
    // lanes 0, 1, 4, 5 and 2, 3, 6, 7 (128-bit lanes); the shuffles take the even and odd floats
    const __m256 a = _mm256_insertf128_ps(_mm256_castps128_ps256(two_pairs(lo[0], lo[1])), two_pairs(lo[4], lo[5]), 1);
    const __m256 b = _mm256_insertf128_ps(_mm256_castps128_ps256(two_pairs(lo[2], lo[3])), two_pairs(lo[6], lo[7]), 1);
    const fVec below = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    const fVec above = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
    const iVec count = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    store_codes(codes + g, round_up_where(count, fVec::loadu(xs + g), below, above, uniforms.next()));
  }
}
#endif

// Codes of the len new accumulator values s of the elements at i0 under new_absmax. Everything
// the loop reads is copied into locals first: code stores are uint8_t, which may alias anything,
// and would otherwise make the compiler reload it after every store.
template <bool Stochastic>
void encode_tile(const Item& it, int64_t i0, int64_t len, float new_absmax, const Codebook& book, const float* s,
                 bool gather) {
  uint8_t* const codes = it.codes + i0;
  const uint64_t stream = it.stream;
  const auto encode_one = [&book, codes, s, i0, new_absmax, stream](int64_t e) {
    const float x = normalize(s[e], new_absmax);
    if constexpr (Stochastic) {
      codes[e] = book.stochastic_at(x, stream, i0 + e);
    } else {
      codes[e] = book.nearest(x);
    }
  };
  int64_t j = 0;
#ifdef ADAGRAD8_VECTOR_CODES
  constexpr int64_t V = fVec::size();
  constexpr int64_t W = MapDecoder::kWidth;  // two vectors
  static_assert(W == 2 * V);
  // The divider: in a loop of its own the encoder waits on the gathers and the vector ports, and the
  // FMAs of Quotient's fast mode would cost more than the idle divider's division (step_run_pipelined).
  const Quotient div(new_absmax, /*fast=*/false);
  const iVec iota = iVec::arange(0, 1);
  const auto load = [s, &div](int64_t e) { return div(fVec::loadu(s + e)); };
  const auto uniform = [stream, i0, &iota](int64_t e) {  // the stochastic-rounding numbers of V lanes at e
    return uniform_vec(span_key(stream, i0 + e), i0 + e, iota);
  };
  const auto encode_vec = [&book, &div, codes, s](int64_t e) { encode_nearest_vec(book, codes + e, s + e, div); };
  // The codes of the W values at e through the bucket table: nearest rounding on AVX2 and, on AVX-512,
  // with gathers; and the groups that the staged loop below leaves (lanes outside [0, 1] or in a
  // bucket that needs the search, stretches that straddle two spans) and the tail.
  const auto encode_group = [&](int64_t e) {
    if constexpr (Stochastic) {
      if (((i0 + e) >> 32) != ((i0 + e + W - 1) >> 32)) {  // the lanes straddle two 2^32-element spans
        for (int64_t k = 0; k < W; ++k) encode_one(e + k);
        return;
      }
      const fVec x[2] = {load(e), load(e + V)}, u[2] = {uniform(e), uniform(e + V)};
      iVec code[2];
      LaneMask search[2];
      book.stochastic(x, u, code, search);
      for (int n = 0; n < 2; ++n) {
        store_codes(codes + e + n * V, code[n]);
        if (any_lane(search[n])) {  // rare: x outside [0, 1] (NaN, Inf) or a crowded bucket
          for (int64_t k = 0; k < V; ++k) encode_one(e + n * V + k);
        }
      }
    } else {
      encode_vec(e);
      encode_vec(e + V);
    }
  };
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // Over at most kStage values at a time: the counts, either from the bucket table (gather; AVX2 has
  // nothing else) or in the counter's two stages (AVX-512), each in a loop of its own with its tables
  // in registers (the loops copy them into locals), the estimate and then the count; with stochastic
  // rounding, then the neighbours' values and the rounding. Groups of W values with lanes that neither
  // can count are encoded again through encode_group at the end.
#if defined(CPU_CAPABILITY_AVX512)
  const bool by_gather = gather;
#else
  const bool by_gather = true;
  (void)gather;
#endif
  constexpr int64_t kStage = 256;
  alignas(64) uint16_t est[kStage];
#if defined(CPU_CAPABILITY_AVX512)
  alignas(64) uint16_t his[kStage], los[kStage];
#endif
  alignas(64) float xs[Stochastic ? kStage : 1];  // stochastic rounding's x
  // Stochastic rounding's x of the group at g, for the rounding after the counts (dividing again by the
  // scale costs more).
  const auto keep_for_rounding = [&xs](int64_t g, const fVec* x) {
    x[0].store(xs + g);
    x[1].store(xs + g + V);
  };
  while (j + W <= len) {
    const int64_t n = std::min(kStage, (len - j) / W * W);
    if (Stochastic && ((i0 + j) >> 32) != ((i0 + j + n - 1) >> 32)) {  // rare: straddles two spans
      for (int64_t g = 0; g < n; g += W) encode_group(j + g);
      j += n;
      continue;
    }
    uint64_t redo = 0;  // bit g: the group at j + W * g
    if (by_gather) {  // the counts from the bucket table
      if constexpr (Stochastic) {
        for (int64_t g = 0; g < n; g += W) {
          const fVec x[2] = {load(j + g), load(j + g + V)};
          redo |= static_cast<uint64_t>(stage_counts(book.buckets, x, est + g)) << (g / W);
          keep_for_rounding(g, x);
        }
      } else {  // the counts are the codes: encode_group's own path
        for (int64_t g = 0; g < n; g += W) encode_group(j + g);
      }
    } else {  // the counter
#if defined(CPU_CAPABILITY_AVX512)
      {
        const CodeCounter::LineRegs line = book.counter.line_regs();
        for (int64_t g = 0; g < n; g += W) {
          const fVec x[2] = {load(j + g), load(j + g + V)};
          __m512i hi, lo;
          __mmask32 other;
          _mm512_store_si512(est + g, CodeCounter::estimate(line, x, hi, lo, other));
          _mm512_store_si512(his + g, hi);
          _mm512_store_si512(los + g, lo);
          redo |= static_cast<uint64_t>(other != 0) << (g / W);
          if constexpr (Stochastic) keep_for_rounding(g, x);
        }
      }
      {
        const CodeCounter::ThresholdRegs thr = book.counter.threshold_regs();
        for (int64_t g = 0; g < n; g += W) {
          const __m512i count = CodeCounter::settle(thr, _mm512_load_si512(est + g), _mm512_load_si512(his + g),
                                                    _mm512_load_si512(los + g));
          if constexpr (Stochastic) {  // the code below x (lo) or above (lo + 1)
            _mm512_store_si512(est + g, _mm512_min_epu16(count, _mm512_set1_epi16(254)));
          } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + j + g), _mm512_cvtepi16_epi8(count));
          }
        }
      }
#endif
    }
    if constexpr (Stochastic) round_staged(book, codes + j, est, xs, n, stream, i0 + j, by_gather);
    for (; redo != 0; redo &= redo - 1) encode_group(j + W * __builtin_ctzll(redo));
    j += n;
  }
#endif
  for (; j + W <= len; j += W) encode_group(j);
  if constexpr (!Stochastic) {
    for (; j + V <= len; j += V) encode_vec(j);
  }
#endif
  for (; j < len; ++j) encode_one(j);
}

inline void encode_tile(const Call& call, const Item& it, int64_t i0, int64_t len, float new_absmax,
                        const Codebook& book, const float* s) {
  if (call.stochastic) {
    encode_tile<true>(it, i0, len, new_absmax, book, s, call.gather_codes);
  } else {
    encode_tile<false>(it, i0, len, new_absmax, book, s, call.gather_codes);
  }
}

// Whether a run of at most kRun elements reads the old codes' ranges (Codebook::ranges: KeepCodes,
// round_tile): every run while they serve most vectors. After a run where they served fewer than a
// quarter (early in training most codes move), only every 8th run does: where they served none,
// reading them in every run made nearest-rounded steps 10-30% slower than the bucket table alone, in
// every 8th 2-4% (docs/performance.md, "The old code's range", measured before the one-pass
// encoder).
class RunRanges {
 public:
  explicit RunRanges(bool available) : available_(available) {}
  bool start_run() {
    on_ = available_ && skip_ == 0;
    if (skip_ > 0) --skip_;
    return on_;
  }
  void end_run(int64_t kept, int64_t len) {  // kept: the vectors that kept their codes of the run's len elements
    if (on_ && 4 * kept * fVec::size() < len) skip_ = 7;
  }

 private:
  bool available_, on_ = false;
  int skip_ = 0;
};

#if defined(CPU_CAPABILITY_AVX2)
// update_tile's sink where the new scale is known (or predicted: step_block_with_ranges): a vector of new values
// whose quotients all lie in their old codes' ranges keeps its codes, unwritten; any other is
// encoded at once, through the bucket table. Counts the vectors kept.
class KeepCodes {
 public:
  // codes and s: the tile's first code and new value (update_tile's i0 and s).
  KeepCodes(const Codebook& book, uint8_t* codes, const float* s, float new_absmax)
      : book_(book), codes_(codes), s_(s), div_(new_absmax, /*fast=*/false), scale_(new_absmax) {}
  void operator()(int64_t e, const fVec& s, const fVec& /*value*/, const fVec& lo, const fVec& hi) {
    if (all_in_ranges(s, lo, hi, scale_)) {
      ++kept_;
    } else {
      encode(e);
    }
  }
  int64_t kept() const { return kept_; }

 private:
  // Out of the update's loop: inlined, the bucket table's constants took the registers of the
  // update's, which went to the stack.
  [[gnu::noinline, gnu::cold]] void encode(int64_t e) { encode_nearest_vec(book_, codes_ + e, s_ + e, div_); }

  const Codebook& book_;
  uint8_t* codes_;
  const float* s_;
  Quotient div_;
  fVec scale_;
  int64_t kept_ = 0;
};


// round_tile's other vectors, element by element (index: the first's), out of its loop.
[[gnu::noinline, gnu::cold]] inline void round_each(const Codebook& book, uint8_t* codes, const float* s,
                                                    float new_absmax, uint64_t stream, int64_t index) {
  for (int64_t k = 0; k < fVec::size(); ++k) {
    codes[k] = book.stochastic_at(normalize(s[k], new_absmax), stream, index + k);
  }
}

// Stochastic rounding of the first sunk_len(len) new values s of the elements at i0 under new_absmax,
// with their old codes' values and neighbours (Codebook::ranges). A vector whose new x all lie in
// [lo, hi) of their old codes c rounds between c - 1 and c where x < q[c], else between c and c + 1,
// the neighbours' values at hand (quant.h's quantize_stochastic: the number of q[1..255] at most x is
// c - 1 or c, at most 254); any other goes through the bucket table, element by element. Returns the
// vectors of the first kind.
inline int64_t round_tile(const Codebook& book, const Item& it, int64_t i0, int64_t len, float new_absmax,
                          const float* s, const float* value, const float* lo, const float* hi) {
  uint8_t* const codes = it.codes + i0;
  const uint64_t stream = it.stream;
  const Quotient div(new_absmax, /*fast=*/false);
  const iVec iota = iVec::arange(0, 1), top(kMapSize - 1), one(1);
  const int64_t n = sunk_len(len);
  // The random numbers of one 2^32-element span (uniform_vec takes one; a tile across two goes element
  // by element).
  const bool one_span = (i0 >> 32) == ((i0 + n - 1) >> 32);
  const uint32_t key = span_key(stream, i0);
  int64_t kept = 0;
  for (int64_t e = 0; e < n; e += fVec::size()) {
    const int64_t i = i0 + e;
    const fVec x = div(fVec::loadu(s + e)), v = fVec::loadu(value + e), l = fVec::loadu(lo + e),
               h = fVec::loadu(hi + e);
    if (!all_lanes((x >= l) & (x < h)) || !one_span) {
      round_each(book, codes + e, s + e, new_absmax, stream, i);
      continue;
    }
    ++kept;
    const iVec c = load_codes(codes + e);
    // (code 255: c - 1 only, as the reference caps the count at 254; it differs where q[254] = q[255])
    const fVec up = (x >= v) & ~fVec(_mm256_castsi256_ps(c == top));
    const fVec below = fVec::blendv(l, v, up), above = fVec::blendv(v, h, up);
    const iVec count = c - one - bits_of(up);  // c where up (its lanes all ones: -1), else c - 1
    store_codes(codes + e, round_up_where(count, x, below, above, uniform_vec(key, i, iota)));
  }
  return kept;
}

// The old codes' values and neighbours (Codebook::ranges) of a tile of at most kRun elements, for
// stochastic rounding: stored by update_tile's sink (stash), read by round_tile once the scale is
// known. Two passes, not one: the rounding's two divisions wait on the update's square root and
// division, and in one loop too few elements were in flight to keep the divider busy (Zen 3, one
// thread, 32768 elements: 1.98 -> 1.87 ns per element).
struct Neighbours {
  alignas(64) float value[kRun], lo[kRun], hi[kRun];
  auto stash() {  // update_tile's sink
    return [this](int64_t e, const fVec&, const fVec& v, const fVec& l, const fVec& h) {
      v.store(value + e);
      l.store(lo + e);
      h.store(hi + e);
    };
  }
  int64_t round(const Codebook& book, const Item& it, int64_t i0, int64_t len, float new_absmax, const float* s) const {
    return round_tile(book, it, i0, len, new_absmax, s, value, lo, hi);
  }
};

// The len elements (at most kRun) at i, updated, and their codes through Codebook::ranges: nearest
// rounding under `scale` (known or predicted: KeepCodes in the update's loop), stochastic under
// `scale` or, where none is given, the actual new scale (Neighbours, round_tile); then the tail's
// through encode_tile. Returns the actual new scale (update_tile's); kept: the vectors the ranges
// served.
template <typename T>
float update_and_encode(const Call& call, const Item& it, int64_t i, int64_t len, float old_absmax,
                        std::optional<float> scale, const Codebook& book, float* buf, Neighbours& nb, int64_t& kept) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(len <= kRun && (call.stochastic || scale.has_value()));
  float actual;
  if (call.stochastic) {
    actual = update_tile<T, true>(call, it, i, len, old_absmax, book, buf, nb.stash());
    kept = nb.round(book, it, i, len, scale.value_or(actual), buf);
  } else {
    KeepCodes keep(book, it.codes + i, buf, scale.value());
    actual = update_tile<T, true>(call, it, i, len, old_absmax, book, buf, keep);
    kept = keep.kept();
  }
  const int64_t done = sunk_len(len);
  encode_tile(call, it, i + done, len - done, scale.value_or(actual), book, buf + done);
  return actual;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The codes of the MapDecoder::kDecodeWidth values at s under div's scale: nearest rounding through
// the bucket table. Always inlined into step_run_pipelined's loop, like update_chunk: GCC made it a
// call once round_staged became a template (block-wise steps 0.62 -> 0.64 ns per element, one thread).
__attribute__((always_inline)) inline void nearest_chunk(const Codebook& book, uint8_t* codes, const float* s,
                                                         const Quotient& div) {
  for (int64_t e = 0; e < MapDecoder::kDecodeWidth; e += fVec::size()) encode_nearest_vec(book, codes + e, s + e, div);
}

#endif

// Updates the elements [begin, end) of one block and stores their accumulator under
// new_absmax (already known: the block's max was taken first).
template <typename T>
void write_range(const Call& call, const Item& it, int64_t begin, int64_t end, float old_absmax,
                 float new_absmax, const Codebook& book, float* buf) {
#if defined(CPU_CAPABILITY_AVX512)
  // Nearest rounding through the bucket table: each chunk encoded right after its update, so that the
  // two overlap as in step_run_pipelined (the scale is known here). Tensor-wise steps, Xeon: 0.55-0.61
  // -> 0.50-0.56 ns per element at 16M with two threads, 0.82-0.84 -> 0.78 on one thread at 65536.
  if (!call.stochastic && call.gather_codes) {
    constexpr int64_t kWidth = MapDecoder::kDecodeWidth;
    T* param = static_cast<T*>(it.param);
    const T* grad = static_cast<const T*>(it.grad);
    const StepConfig c = call.config;
    const Lanes k(c, it);
    const fVec old(old_absmax);
    const Quotient div(new_absmax, /*fast=*/true);
    fVec unused_max(0.0f);
    int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      update_chunk<T, true>(param, grad, it.codes, buf, i, book.decoder, old, c, k, true, unused_max);
      nearest_chunk(book, it.codes + i, buf, div);
    }
    if (i < end) {
      update_tile<T, true>(call, it, i, end - i, old_absmax, book, buf);
      encode_tile(call, it, i, end - i, new_absmax, book, buf);
    }
    return;
  }
#endif
  RunRanges ranges(book.has_ranges);
#if defined(CPU_CAPABILITY_AVX2)
  Neighbours nb;
#endif
  for (int64_t i = begin; i < end; i += kRun) {
    const int64_t len = std::min(kRun, end - i);
    if (ranges.start_run()) {
#if defined(CPU_CAPABILITY_AVX2)
      int64_t kept;
      update_and_encode<T>(call, it, i, len, old_absmax, new_absmax, book, buf, nb, kept);
      ranges.end_run(kept, len);
      continue;
#endif
    }
    update_tile<T, true>(call, it, i, len, old_absmax, book, buf);
    encode_tile(call, it, i, len, new_absmax, book, buf);
  }
}

// Elements per group of the max pass's bound (a multiple of every vector width here).
constexpr int64_t kGroup = 256;

// Largest finite |new accumulator| over [begin, end) of one block, without writing anything.
//
// With a sorted nonnegative map (Codebook::sorted_nonneg) and a finite old scale S >= 0, every
// new value of a group, fl(fl(q[c] * S) + fl(g * g)), is at most fl(fl(q[cmax] * S) + max g * g)
// (rounding is monotone; a value that is NaN or infinite counts as 0 and drops out of both). A
// group whose bound does not exceed the maximum so far cannot raise it, and needs only its
// largest code and gradient square, not a decode: only the other groups take update_tile's exact
// pass. The result is the same either way.
template <typename T>
float max_range(const Call& call, const Item& it, int64_t begin, int64_t end, float old_absmax, const Codebook& book,
                float* buf) {
  float m = 0.0f;
  int64_t i = begin;
#ifdef ADAGRAD8_VECTOR_CODES
  if (book.sorted_nonneg && old_absmax >= 0.0f && old_absmax <= FLT_MAX) {
    const T* param = static_cast<const T*>(it.param);
    const T* grad = static_cast<const T*>(it.grad);
    const StepConfig c = call.config;
    const Lanes k(c, it);
    const bool read_params = c.weight_decay != 0.0f;  // only weight decay needs them here
    for (; i + kGroup <= end; i += kGroup) {
      fVec square(0.0f);  // per lane, the largest finite g * g
      for (int64_t j = i; j < i + kGroup; j += kLane<T>) {
        prefetch(grad, j + kPrefetch, kLane<T>);
        if (read_params) prefetch(param, j + kPrefetch, kLane<T>);
        fVec p[kParts<T>], g[kParts<T>];
        if (read_params) load_float(param + j, p);
        load_float(grad + j, g);
        for (int q = 0; q < kParts<T>; ++q) {
          const fVec e = grad_vec(p[q], g[q], c, k);
          square = max_finite_abs(square, e * e);
        }
      }
      const float largest = lane_max(square);
      prefetch(it.codes, i + kPrefetch, kGroup);
      const float bound = book.q[max_code(it.codes + i, kGroup)] * old_absmax + largest;
      if (!(bound <= m)) m = std::max(m, update_tile<T, false>(call, it, i, kGroup, old_absmax, book, buf));
    }
  }
#endif
  for (; i < end; i += kTile) {
    m = std::max(m, update_tile<T, false>(call, it, i, std::min(kTile, end - i), old_absmax, book, buf));
  }
  return m;
}

// One whole block [begin, end): one pass when it fits the buffer, else a max pass first.
template <typename T>
void step_block(const Call& call, const Item& it, int64_t begin, int64_t end, const Codebook& book, float* buf) {
  float& scale = it.absmax[begin / it.block];
  const float old_scale = scale;
  if (end - begin <= kTile) {
    scale = update_tile<T, true>(call, it, begin, end - begin, old_scale, book, buf);
    encode_tile(call, it, begin, end - begin, scale, book, buf);
  } else {
    scale = max_range<T>(call, it, begin, end, old_scale, book, buf);
    write_range<T>(call, it, begin, end, old_scale, scale, book, buf);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The new scale that the block of len elements at b will most likely have: the largest new value
// of the elements whose old code is one of Codebook::top_codes, as the block's largest element has
// (it was encoded as x = 1 or -1). Once the sums have grown, another element seldom overtakes it.
template <typename T>
float predicted_scale(const Call& call, const Item& it, int64_t b, int64_t len, const Codebook& book) {
  const uint8_t* codes = it.codes + b;
  const float old_absmax = it.absmax[b / it.block];
  const __m256i top0 = _mm256_set1_epi8(static_cast<char>(book.top_codes[0]));
  const __m256i top1 = _mm256_set1_epi8(static_cast<char>(book.top_codes[1]));
  float m = 0.0f;
  int64_t e = 0;
  for (; e + 32 <= len; e += 32) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + e));
    uint32_t hits = static_cast<uint32_t>(
        _mm256_movemask_epi8(_mm256_or_si256(_mm256_cmpeq_epi8(c, top0), _mm256_cmpeq_epi8(c, top1))));
    for (; hits != 0; hits &= hits - 1) {
      m = std::max(m, scale_candidate(new_sum<T>(call, it, b + e + __builtin_ctz(hits), old_absmax)));
    }
  }
  for (; e < len; ++e) {
    if (codes[e] == book.top_codes[0] || codes[e] == book.top_codes[1]) {
      m = std::max(m, scale_candidate(new_sum<T>(call, it, b + e, old_absmax)));
    }
  }
  return m;
}

// One block of len elements at b through update_and_encode: nearest rounding in one pass under the
// predicted scale, and where the prediction was wrong every code encoded again under the actual
// scale; stochastic rounding under the actual scale. Returns the vectors the ranges served (none where
// the prediction was wrong).
template <typename T>
int64_t step_block_with_ranges(const Call& call, const Item& it, int64_t b, int64_t len, const Codebook& book,
                               float* buf, Neighbours& nb) {
  float& scale = it.absmax[b / it.block];
  int64_t kept;
  if (call.stochastic) {
    scale = update_and_encode<T>(call, it, b, len, scale, std::nullopt, book, buf, nb, kept);
    return kept;
  }
  const float predicted = predicted_scale<T>(call, it, b, len, book);
  scale = update_and_encode<T>(call, it, b, len, scale, predicted, book, buf, nb, kept);
  if (float_bits(scale) != float_bits(predicted)) {
    encode_tile(call, it, b, len, scale, book, buf);
    return 0;
  }
  return kept;
}
#endif

// The blocks [begin, end), each at most kRun elements, a run at a time: every block of the run updated,
// then every block encoded. A block's new scale is its update's lane maximum, a chain of dependent
// steps that the block's encoding waits on, and each loop has its set-up; in a run the scales are
// ready before the first encoding starts, and the set-up is spread over longer stretches of work.
// (Intel Xeon, one thread, 65536 elements in L2: block-wise steps 0.88 -> 0.84 ns per element with
// blocks of 256, 1.22 -> 0.93 with 64. On Zen 4, 2-4 blocks per run had helped 64-element blocks only.)
// A run that reads the old codes' ranges (AVX2) goes block by block instead (step_block_with_ranges).
template <typename T>
void step_run(const Call& call, const Item& it, int64_t begin, int64_t end, const Codebook& book, float* buf) {
  const int64_t per = (kRun / it.block) * it.block;
  float scales[kRun];
  RunRanges ranges(book.has_ranges);
#if defined(CPU_CAPABILITY_AVX2)
  Neighbours nb;
#endif
  for (int64_t r = begin; r < end; r += per) {
    const int64_t r_end = std::min(end, r + per);
    if (ranges.start_run()) {
#if defined(CPU_CAPABILITY_AVX2)
      int64_t kept = 0;
      for (int64_t b = r; b < r_end; b += it.block) {
        kept += step_block_with_ranges<T>(call, it, b, std::min(r_end, b + it.block) - b, book, buf, nb);
      }
      ranges.end_run(kept, r_end - r);
      continue;
#endif
    }
    int n = 0;
    for (int64_t b = r; b < r_end; b += it.block) {
      scales[n++] = update_tile<T, true>(call, it, b, std::min(r_end, b + it.block) - b, it.absmax[b / it.block], book,
                                         buf + (b - r));
    }
    n = 0;
    for (int64_t b = r; b < r_end; b += it.block, ++n) {
      encode_tile(call, it, b, std::min(r_end, b + it.block) - b, scales[n], book, buf + (b - r));
      it.absmax[b / it.block] = scales[n];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// step_run for rounding through the bucket table (Call::gather_codes) and blocks that are a multiple of
// the decode width: each block's update goes chunk by chunk together with the encoding of the block
// before it, whose scale is known by then. The update waits on the divider (the square root and the
// division of ALGORITHM.md's step), the encoder on the gathers and the vector ports; apart, their
// times add up, interleaved they overlap (docs/performance.md). That needs the encoder's s / scale off
// the divider: Quotient. Nearest rounding encodes each chunk there and then; stochastic rounding
// stages the counts and the quotients beside the update and rounds the block after it (round_staged:
// its own division, of the fraction, cannot leave the divider, and its random numbers are made there).
// Results are those of step_run: the same values are computed, in another order.
template <typename T, bool Stochastic>
void step_run_pipelined(const Call& call, const Item& it, int64_t begin, int64_t end, const Codebook& book,
                        float* buf) {
  constexpr int64_t kWidth = MapDecoder::kDecodeWidth, W = MapDecoder::kWidth, V = fVec::size();
  static_assert(2 * kRun + 32 <= kTile, "two block buffers in the caller's kTile floats");
  static_assert(kRun / W <= 64, "a bit per group in redo");
  const int64_t B = it.block;
  T* param = static_cast<T*>(it.param);
  const T* grad = static_cast<const T*>(it.grad);
  const StepConfig c = call.config;
  const Lanes k(c, it);
  // Stochastic rounding's staged counts and quotients of one block.
  alignas(64) uint16_t est[Stochastic ? kRun : 1];
  alignas(64) float xs[Stochastic ? kRun : 1];
  // One block's new values each; 4 KB + 128 bytes apart, so that a store to one and a load from the
  // other never look alike to the store buffer (4K aliasing).
  float* const bufs[2] = {buf, buf + kRun + 32};
  int cur = 0;
  int64_t prev = -1, prev_len = 0;  // the block waiting for its encoding (values in bufs[cur ^ 1])
  float prev_scale = 0.0f;
  const auto finish_prev = [&] {  // encodes the waiting block alone
    encode_tile(call, it, prev, prev_len, prev_scale, book, bufs[cur ^ 1]);
    it.absmax[prev / B] = prev_scale;
  };
  for (int64_t b = begin; b < end; b += B) {
    const int64_t len = std::min(end, b + B) - b;
    float scale;
    if (prev >= 0 && len == B) {
      float* s = bufs[cur];
      const float* prev_s = bufs[cur ^ 1];
      uint8_t* prev_codes = it.codes + prev;
      const fVec old(it.absmax[b / B]);
      const Quotient div(prev_scale, /*fast=*/true);
      fVec vmax(0.0f);
      uint64_t redo = 0;  // stochastic: bit g for the group at W * g, which takes the per-element path
      for (int64_t j = 0; j < B; j += kWidth) {
        update_chunk<T, true>(param, grad, it.codes, s + j, b + j, book.decoder, old, c, k, true, vmax);
        if constexpr (Stochastic) {
          for (int64_t g = j; g < j + kWidth; g += W) {
            const fVec sv[2] = {fVec::loadu(prev_s + g), fVec::loadu(prev_s + g + V)};
            const fVec x[2] = {div(sv[0]), div(sv[1])};
            const bool search = stage_counts(book.buckets, x, est + g);
            redo |= static_cast<uint64_t>(search || any_lane(div.inexact(sv[0]) | div.inexact(sv[1]))) << (g / W);
            x[0].store(xs + g);
            x[1].store(xs + g + V);
          }
        } else {
          nearest_chunk(book, prev_codes + j, prev_s + j, div);
        }
      }
      if constexpr (Stochastic) {
        round_staged(book, prev_codes, est, xs, B, it.stream, prev, call.gather_codes);
        for (; redo != 0; redo &= redo - 1) {
          for (int64_t e = W * __builtin_ctzll(redo), g_end = e + W; e < g_end; ++e) {
            const float x = normalize(prev_s[e], prev_scale);
            prev_codes[e] = book.stochastic_at(x, it.stream, prev + e);
          }
        }
      }
      scale = lane_max(vmax);
      it.absmax[prev / B] = prev_scale;
    } else {  // the first block, or a last one shorter than the rest
      if (prev >= 0) finish_prev();
      scale = update_tile<T, true>(call, it, b, len, it.absmax[b / B], book, bufs[cur]);
    }
    prev = b;
    prev_len = len;
    prev_scale = scale;
    cur ^= 1;
  }
  if (prev >= 0) finish_prev();
}
#endif

struct Span {
  int32_t item;
  int64_t begin, end;
  int64_t slot;  // >= 0: this span is part of a block larger than a span (index into slots)
};

// A block larger than kSpan, whose scale needs a reduction across spans.
struct BigBlock {
  int32_t item;
  int64_t block;
};

// Clears MXCSR's flush-to-zero and denormals-are-zero for its lifetime (x86). A Codebook is kept for
// later calls, which may run in another mode than the one that builds it: built under
// denormals-are-zero, its tables read a subnormal map value as 0 (a review's case: every x below it
// got the code above it in later calls; tests/test_numerics.py, map first loaded under flush modes).
class DefaultFloatMode {
 public:
#if defined(__x86_64__) || defined(__i386__)
  DefaultFloatMode() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~(kFlushToZero | kDenormalsAreZero)); }
  ~DefaultFloatMode() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

// The Codebook of a map and rounding mode, kept for the last few asked for: a map rarely changes
// between steps, and building its tables takes longer (25-75 us; the AVX2 ranges of nearest rounding
// about 40 of that) than a small step.
std::shared_ptr<const Codebook> codebook_for(const float* qmap, bool stochastic) {
  struct Kept {
    bool stochastic;
    std::shared_ptr<const Codebook> book;  // its q: the map's bytes, the other half of the key
  };
  constexpr size_t kKept = 4;
  static std::mutex mutex;
  static std::deque<Kept> kept;  // the most recently used first
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = kept.begin(); it != kept.end(); ++it) {
    if (it->stochastic == stochastic && std::memcmp(it->book->q, qmap, kMapSize * sizeof(float)) == 0) {
      Kept hit = *it;
      kept.erase(it);
      kept.push_front(hit);
      return hit.book;
    }
  }
  [[maybe_unused]] const DefaultFloatMode mode;
  const Kept fresh{stochastic, std::make_shared<const Codebook>(qmap, stochastic)};  // ~40 KB: on the heap
  kept.push_front(fresh);
  if (kept.size() > kKept) kept.pop_back();
  return fresh.book;
}

template <typename T>
void quantized_typed(const Call& call) {
  const std::shared_ptr<const Codebook> book = codebook_for(call.qmap, call.stochastic);

  std::vector<Span> spans;
  std::vector<BigBlock> big;
  for (int32_t t = 0; t < static_cast<int32_t>(call.items.size()); ++t) {
    const Item& it = call.items[t];
    if (it.block <= kSpan) {  // spans of whole blocks
      const int64_t per = (kSpan / it.block) * it.block;
      for (int64_t b = 0; b < it.numel; b += per) spans.push_back({t, b, std::min(it.numel, b + per), -1});
    } else {  // blocks cut into spans
      for (int64_t b = 0; b < it.numel; b += it.block) {
        const int64_t block_end = std::min(it.numel, b + it.block);
        for (int64_t s = b; s < block_end; s += kSpan) {
          spans.push_back({t, s, std::min(block_end, s + kSpan), static_cast<int64_t>(big.size())});
        }
        big.push_back({t, b / it.block});
      }
    }
  }
  const int64_t n_spans = static_cast<int64_t>(spans.size());

  // Phase 1, big blocks only: new scales as the max over their spans (max is exact, so
  // the split does not matter).
  std::vector<float> big_absmax(big.size(), 0.0f);
  if (!big.empty()) {
    std::vector<float> partial(n_spans, 0.0f);
    at::parallel_for(0, n_spans, 1, [&](int64_t lo, int64_t hi) {
      alignas(64) float buf[kTile];
      for (int64_t k = lo; k < hi; ++k) {
        const Span& sp = spans[k];
        if (sp.slot < 0) continue;
        const Item& it = call.items[sp.item];
        partial[k] = max_range<T>(call, it, sp.begin, sp.end, it.absmax[sp.begin / it.block], *book, buf);
      }
    });
    for (int64_t k = 0; k < n_spans; ++k) {
      if (spans[k].slot >= 0) big_absmax[spans[k].slot] = std::max(big_absmax[spans[k].slot], partial[k]);
    }
  }

  // Phase 2: update and re-encode. Blocks within a span take their scale here.
  at::parallel_for(0, n_spans, 1, [&](int64_t lo, int64_t hi) {
    alignas(64) float buf[kTile];
    for (int64_t k = lo; k < hi; ++k) {
      const Span& sp = spans[k];
      const Item& it = call.items[sp.item];
      if (sp.slot >= 0) {
        write_range<T>(call, it, sp.begin, sp.end, it.absmax[sp.begin / it.block], big_absmax[sp.slot], *book, buf);
        continue;
      }
      if (it.block <= kRun) {
#if defined(CPU_CAPABILITY_AVX512)
        if (call.gather_codes && it.block % MapDecoder::kDecodeWidth == 0) {
          if (call.stochastic) {
            step_run_pipelined<T, true>(call, it, sp.begin, sp.end, *book, buf);
          } else {
            step_run_pipelined<T, false>(call, it, sp.begin, sp.end, *book, buf);
          }
          continue;
        }
#endif
        step_run<T>(call, it, sp.begin, sp.end, *book, buf);
        continue;
      }
      for (int64_t b = sp.begin; b < sp.end; b += it.block) step_block<T>(call, it, b, std::min(sp.end, b + it.block), *book, buf);
    }
  });
  for (size_t i = 0; i < big.size(); ++i) call.items[big[i].item].absmax[big[i].block] = big_absmax[i];
}

template <typename T>
void fp32_typed(const Call& call) {
  std::vector<Span> spans;
  for (int32_t t = 0; t < static_cast<int32_t>(call.items.size()); ++t) {
    for (int64_t b = 0; b < call.items[t].numel; b += kSpan) {
      spans.push_back({t, b, std::min(call.items[t].numel, b + kSpan), -1});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      fp32_range<T>(call.items[spans[k].item], call.config, spans[k].begin, spans[k].end);
    }
  });
}

template <template <typename> class Fn>
void by_dtype(const Call& call) {
  switch (call.dtype) {
    case Dtype::kFloat: return Fn<float>::run(call);
    case Dtype::kHalf: return Fn<c10::Half>::run(call);
    case Dtype::kBFloat16: return Fn<c10::BFloat16>::run(call);
  }
}

template <typename T>
struct Fp32 {
  static void run(const Call& call) { fp32_typed<T>(call); }
};
template <typename T>
struct Quantized {
  static void run(const Call& call) { quantized_typed<T>(call); }
};

}  // namespace

void step_fp32(const Call& call) { by_dtype<Fp32>(call); }
void step_quantized(const Call& call) { by_dtype<Quantized>(call); }

}  // namespace adagrad8::cpu::CPU_CAPABILITY
