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
#include <cmath>
#include <cstring>
#include <memory>
#include <limits>
#include <tuple>
#include <type_traits>

#include "adagrad8/quant.h"
#include "adagrad8/rng.h"

namespace adagrad8::cpu::CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;

// Work is cut into spans of at most kSpan elements of one tensor and parallel_for hands out
// whole spans, so no result depends on the number of threads.
constexpr int64_t kSpan = int64_t{1} << 15;
// 8-bit state is processed in tiles: dequantize, update in vectors, quantize.
constexpr int64_t kTile = 64;

template <typename T>
constexpr int kParts = static_cast<int>(sizeof(float) / sizeof(T));  // fVecs per Vectorized<T>
template <typename T>
constexpr int64_t kLane = kParts<T> * fVec::size();  // elements per vector iteration
static_assert(kTile % kLane<c10::BFloat16> == 0 && kTile % kLane<float> == 0);

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

// Per-tensor constants broadcast once.
struct Lanes {
  fVec zero{0.0f}, weight_decay, eps, clr, gnorm_scale;
  Lanes(const StepConfig& c, const Item& it)
      : weight_decay(c.weight_decay), eps(c.eps), clr(it.clr), gnorm_scale(it.gnorm_scale) {}
};

// update.h's effective_grad / accumulate / updated_param / skipped, on a vector.
inline void update_vec(fVec& p, const fVec& raw, fVec& s, const StepConfig& c, const Lanes& k) {
  fVec g = raw * k.gnorm_scale;
  if (c.maximize) g = g.neg();
  if (c.weight_decay != 0.0f) g = g + k.weight_decay * p;
  const fVec s_new = s + g * g;
  const fVec p_new = p - (k.clr * g) / (s_new.sqrt() + k.eps);
  if (c.skip_zeros) {
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

// ---- 8-bit state -------------------------------------------------------------------------

// New accumulator values (and, if p_out is given, new parameters in float) of the
// len <= kTile elements starting at i0, from the state stored under scale old_absmax.
template <typename T>
void tile_update(const Call& call, const Item& it, int64_t i0, int64_t len, float old_absmax,
                 float* s_out, float* p_out) {
  const T* param = static_cast<const T*>(it.param) + i0;
  const T* grad = static_cast<const T*>(it.grad) + i0;
  const uint8_t* codes = it.codes + i0;
  for (int64_t j = 0; j < len; ++j) s_out[j] = dequantize(codes[j], call.qmap, old_absmax);
  if (len == kTile) {
    const Lanes k(call.config, it);
    for (int64_t off = 0; off < kTile; off += kLane<T>) {
      fVec p[kParts<T>], g[kParts<T>];
      load_float(param + off, p);
      load_float(grad + off, g);
      for (int j = 0; j < kParts<T>; ++j) {
        const int64_t at = off + j * fVec::size();
        fVec s = fVec::loadu(s_out + at);
        update_vec(p[j], g[j], s, call.config, k);
        s.store(s_out + at);
        if (p_out != nullptr) p[j].store(p_out + at);
      }
    }
    return;
  }
  for (int64_t j = 0; j < len; ++j) {
    float p = static_cast<float>(param[j]);
    update_one(p, static_cast<float>(grad[j]), s_out[j], call.config, it);
    if (p_out != nullptr) p_out[j] = p;
  }
}

// Largest finite |new accumulator| over [begin, end).
template <typename T>
float range_max(const Call& call, const Item& it, int64_t begin, int64_t end, float old_absmax) {
  float s[kTile];
  float m = 0.0f;
  for (int64_t i = begin; i < end; i += kTile) {
    const int64_t len = std::min(kTile, end - i);
    tile_update<T>(call, it, i, len, old_absmax, s, nullptr);
    for (int64_t j = 0; j < len; ++j) m = std::max(m, scale_candidate(s[j]));
  }
  return m;
}

// ---- stochastic-rounding numbers on vectors (rng.h, lane by lane) -------------------------

using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == fVec::size());

// Logical shift right of uint32 lanes held in int32.
inline iVec shift_right(const iVec& v, int k) {
  return (v >> iVec(k)) & iVec(static_cast<int32_t>(0xffffffffu >> k));
}

inline iVec mix32_vec(iVec x) {
  x = x ^ shift_right(x, 16);
  x = x * iVec(0x7feb352d);
  x = x ^ shift_right(x, 15);
  x = x * iVec(static_cast<int32_t>(0x846ca68bu));
  return x ^ shift_right(x, 16);
}

// uniform_at for the lanes' indices; span: span_key, the same for every lane.
inline fVec uniform_vec(uint32_t span, int64_t first) {
  const iVec index = iVec::arange(static_cast<int32_t>(static_cast<uint32_t>(first)), 1);
  const iVec bits = mix32_vec(iVec(static_cast<int32_t>(span)) ^ index);
  return at::vec::convert_to_fp_of_same_size<float>(shift_right(bits, 8)) * fVec(1.0f / 16777216.0f);
}

// ---- quantization by table (quant.h's rules, without a binary search) --------------------

// Counts the values of a sorted table that lie below x, for x in [0, 1], with one read of a
// bucket table: x is bucketed on its float bits (exponent and top 8 mantissa bits, so a bucket
// is at most 0.4% wide, narrower than any gap between neighbouring values of the dynamic maps),
// and a bucket stores how many values lie below it. A bucket holding more than one value is
// marked -1, and the caller falls back to the binary search, as it does for x outside [0, 1].
// (Vector gathers were the first try: on this AMD CPU they are microcoded, 6.5 ns/element.)
class BelowCount {
 public:
  static constexpr int kShift = 15;
  static constexpr uint32_t kFirst = (97u << 23) >> kShift;  // 2^-30; smaller x share bucket 0
  static constexpr uint32_t kLast = (127u << 23) >> kShift;  // 1.0
  static constexpr int kBuckets = static_cast<int>(kLast - kFirst) + 1;

  // v: n sorted values.
  void build(const float* v, int n) {
    int below = 0;  // values < the current bucket's lower edge
    while (below < n && v[below] < 0.0f) ++below;
    for (int b = 0; b < kBuckets; ++b) {
      const float upper = b + 1 < kBuckets ? edge(b + 1) : std::nextafter(1.0f, 2.0f);
      int below_upper = below;
      while (below_upper < n && v[below_upper] < upper) ++below_upper;
      base_[b] = below_upper - below <= 1 ? static_cast<int16_t>(below) : int16_t{-1};
      below = below_upper;
    }
  }

  // Values below x's bucket, or -1 when x needs the binary search.
  int base(float x) const {
    if (!(x >= 0.0f && x <= 1.0f)) return -1;  // NaN too
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const uint32_t key = (bits & 0x7fffffffu) >> kShift;  // -0.0 is 0.0
    return base_[key < kFirst ? 0 : key - kFirst];
  }

 private:
  static float edge(int b) {  // lower edge of bucket b >= 1
    const uint32_t bits = (static_cast<uint32_t>(b) + kFirst) << kShift;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  int16_t base_[kBuckets];
};

// Maps and their tables for one call.
struct Codebook {
  float q[kMapSize + 1];  // the map, then +Inf
  float mid[kMapSize];    // the 255 midpoints, then NaN (never below x, never equal)
  BelowCount mid_below, q_below;

  explicit Codebook(const float* qmap) {
    for (int i = 0; i < kMapSize; ++i) q[i] = qmap[i];
    q[kMapSize] = std::numeric_limits<float>::infinity();
    for (int i = 0; i < kMapSize - 1; ++i) mid[i] = midpoint(qmap, i);
    mid[kMapSize - 1] = std::numeric_limits<float>::quiet_NaN();
    mid_below.build(mid, kMapSize - 1);
    q_below.build(q + 1, kMapSize - 1);
  }

  // quantize_nearest(x, mid). With b midpoints below x's bucket and at most one in it, the
  // count below x is b or b + 1, and only mid[b] can equal x (a tie: go to the even code).
  uint8_t nearest(float x) const {
    const int b = mid_below.base(x);
    if (b < 0) return quantize_nearest(x, mid);
    const float m = mid[b];
    return static_cast<uint8_t>(b + ((m < x || (m == x && (b & 1))) ? 1 : 0));
  }

  // quantize_stochastic(x, q, u): the code below x is the number of q[1..255] that are <= x.
  uint8_t stochastic(float x, float u) const {
    const int b = q_below.base(x);
    if (b < 0) return quantize_stochastic(x, q, u);
    int lo = b + (q[1 + b] < x ? 1 : 0);
    lo += q[1 + lo] == x ? 1 : 0;
    if (lo > 254) lo = 254;
    const float below = q[lo];
    const float frac = (x - below) / (q[lo + 1] - below);
    return static_cast<uint8_t>(u < frac ? lo + 1 : lo);
  }
};

// Codes of the len new accumulator values s of elements [i0, i0 + len) under new_absmax.
inline void encode(const Call& call, const Item& it, int64_t i0, int64_t len, float new_absmax,
                   const Codebook& book, const float* s) {
  constexpr int64_t V = fVec::size();
  alignas(64) float x[kTile];
  alignas(64) float u[kTile];
  int64_t j = 0;
  for (; j + V <= len; j += V) {
    fVec v = fVec::loadu(s + j);
    if (new_absmax > 0.0f) v = v / fVec(new_absmax);
    v.store(x + j);
    const int64_t first = i0 + j;
    if (call.stochastic) {
      if ((first >> 32) == ((first + V - 1) >> 32)) {
        uniform_vec(span_key(it.stream, first), first).store(u + j);
      } else {  // the lanes straddle two 2^32-element spans
        for (int64_t k = 0; k < V; ++k) u[j + k] = uniform_at(span_key(it.stream, first + k), first + k);
      }
    }
  }
  for (; j < len; ++j) {
    x[j] = normalize(s[j], new_absmax);
    if (call.stochastic) u[j] = uniform_at(span_key(it.stream, i0 + j), i0 + j);
  }
  uint8_t* codes = it.codes + i0;
  if (call.stochastic) {
    for (j = 0; j < len; ++j) codes[j] = book.stochastic(x[j], u[j]);
  } else {
    for (j = 0; j < len; ++j) codes[j] = book.nearest(x[j]);
  }
}

template <typename T>
void store_params(T* dst, const float* p, int64_t len) {
  int64_t j = 0;
  for (; j + kLane<T> <= len; j += kLane<T>) {
    fVec v[kParts<T>];
    for (int k = 0; k < kParts<T>; ++k) v[k] = fVec::loadu(p + j + k * fVec::size());
    store_float(dst + j, v);
  }
  for (; j < len; ++j) dst[j] = static_cast<T>(p[j]);
}

// Updates parameters over [begin, end) and stores the new accumulator under new_absmax.
template <typename T>
void range_write(const Call& call, const Item& it, int64_t begin, int64_t end, float old_absmax,
                 float new_absmax, const Codebook& book) {
  T* param = static_cast<T*>(it.param);
  alignas(64) float s[kTile];
  alignas(64) float p[kTile];
  for (int64_t i = begin; i < end; i += kTile) {
    const int64_t len = std::min(kTile, end - i);
    tile_update<T>(call, it, i, len, old_absmax, s, p);
    store_params<T>(param + i, p, len);
    encode(call, it, i, len, new_absmax, book, s);
  }
}

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

template <typename T>
void quantized_typed(const Call& call) {
  const auto book = std::make_unique<Codebook>(call.qmap);  // ~32 KB: on the heap

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
      for (int64_t k = lo; k < hi; ++k) {
        const Span& sp = spans[k];
        if (sp.slot < 0) continue;
        const Item& it = call.items[sp.item];
        partial[k] = range_max<T>(call, it, sp.begin, sp.end, it.absmax[sp.begin / it.block]);
      }
    });
    for (int64_t k = 0; k < n_spans; ++k) {
      if (spans[k].slot >= 0) big_absmax[spans[k].slot] = std::max(big_absmax[spans[k].slot], partial[k]);
    }
  }

  // Phase 2: update and re-encode. Small blocks take their scale here, block by block.
  at::parallel_for(0, n_spans, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Span& sp = spans[k];
      const Item& it = call.items[sp.item];
      if (sp.slot >= 0) {
        range_write<T>(call, it, sp.begin, sp.end, it.absmax[sp.begin / it.block], big_absmax[sp.slot], *book);
        continue;
      }
      for (int64_t b = sp.begin; b < sp.end; b += it.block) {
        const int64_t e = std::min(sp.end, b + it.block);
        float& scale = it.absmax[b / it.block];
        const float old_scale = scale;
        const float new_scale = range_max<T>(call, it, b, e, old_scale);
        range_write<T>(call, it, b, e, old_scale, new_scale, *book);
        scale = new_scale;
      }
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
