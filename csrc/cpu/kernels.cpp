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

// ---- quantization on vectors (quant.h and rng.h, lane by lane) ---------------------------

using iVec = at::vec::Vectorized<int32_t>;
static_assert(iVec::size() == fVec::size());

inline iVec bits_of(const fVec& mask) { return at::vec::cast<int32_t>(mask); }

inline fVec lookup(const float* table, const iVec& index) {
  return at::vec::gather<sizeof(float)>(table, index);
}

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

// quantize_nearest; mid[255] must be NaN (never equal, never below).
inline iVec nearest_vec(const fVec& x, const float* mid) {
  iVec i(0);
  for (int step = 128; step > 0; step >>= 1) {
    i = i + (bits_of(lookup(mid, i + iVec(step - 1)) < x) & iVec(step));
  }
  i = i + (bits_of(lookup(mid, i) == x) & i & iVec(1));
  return iVec::blendv(i, iVec(255), bits_of(x.isnan()));
}

inline iVec stochastic_vec(const fVec& x, const float* qmap, const fVec& u) {
  iVec lo(0);
  for (int step = 128; step > 0; step >>= 1) {
    lo = lo + (bits_of(lookup(qmap, lo + iVec(step)) <= x) & iVec(step));
  }
  lo = at::vec::minimum(lo, iVec(254));
  const fVec below = lookup(qmap, lo);
  const fVec frac = (x - below) / (lookup(qmap, lo + iVec(1)) - below);
  lo = lo + (bits_of(u < frac) & iVec(1));
  return iVec::blendv(lo, iVec(255), bits_of(x.isnan()));
}

// Codes of the len new accumulator values s of elements [i0, i0 + len) under new_absmax.
inline void encode(const Call& call, const Item& it, int64_t i0, int64_t len, float new_absmax, const float* mid,
                   const float* s) {
  constexpr int64_t V = fVec::size();
  alignas(64) int32_t lanes[V];
  int64_t j = 0;
  for (; j + V <= len; j += V) {
    const int64_t first = i0 + j;
    if (call.stochastic && (first >> 32) != ((first + V - 1) >> 32)) break;  // lanes straddle a 2^32 span
    fVec x = fVec::loadu(s + j);
    if (new_absmax > 0.0f) x = x / fVec(new_absmax);
    const iVec code = call.stochastic
        ? stochastic_vec(x, call.qmap, uniform_vec(span_key(it.stream, first), first))
        : nearest_vec(x, mid);
    code.store(lanes);
    for (int64_t k = 0; k < V; ++k) it.codes[first + k] = static_cast<uint8_t>(lanes[k]);
  }
  for (; j < len; ++j) {
    const int64_t index = i0 + j;
    const float x = normalize(s[j], new_absmax);
    it.codes[index] = call.stochastic
        ? quantize_stochastic(x, call.qmap, uniform_at(span_key(it.stream, index), index))
        : quantize_nearest(x, mid);
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
                 float new_absmax, const float* mid) {
  T* param = static_cast<T*>(it.param);
  alignas(64) float s[kTile];
  alignas(64) float p[kTile];
  for (int64_t i = begin; i < end; i += kTile) {
    const int64_t len = std::min(kTile, end - i);
    tile_update<T>(call, it, i, len, old_absmax, s, p);
    store_params<T>(param + i, p, len);
    encode(call, it, i, len, new_absmax, mid, s);
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
  float mid[kMapSize];
  for (int i = 0; i < kMapSize - 1; ++i) mid[i] = midpoint(call.qmap, i);
  mid[kMapSize - 1] = std::numeric_limits<float>::quiet_NaN();  // a 256th entry for vector lookups

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
        range_write<T>(call, it, sp.begin, sp.end, it.absmax[sp.begin / it.block], big_absmax[sp.slot], mid);
        continue;
      }
      for (int64_t b = sp.begin; b < sp.end; b += it.block) {
        const int64_t e = std::min(sp.end, b + it.block);
        float& scale = it.absmax[b / it.block];
        const float old_scale = scale;
        const float new_scale = range_max<T>(call, it, b, e, old_scale);
        range_write<T>(call, it, b, e, old_scale, new_scale, mid);
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
