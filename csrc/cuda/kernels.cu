// CUDA kernels for adagrad8::step and adagrad8::step.quantized.
//
// The per-element math is the shared code of csrc/include/adagrad8, in the same order as the
// CPU kernels (csrc/cpu/kernels.cpp); built with --fmad=false and IEEE div/sqrt, every result
// is bit-identical to theirs.
//
// Multi-tensor: up to kMaxTensors tensors go into one launch as a Batch passed by value. The
// work of a batch is cut into units (a chunk of elements, or a few whole scale blocks); each
// CUDA block takes units in a grid-stride loop and finds the unit's tensor in Batch::start.
// All indices are int64.
//
// Memory access: each thread owns chunks of kVec consecutive elements, lane-major, and moves a
// chunk with one vector access per tensor (16 bytes of fp32, 8 of fp16/bf16, 4 codes in one
// 32-bit word) when the chunk is whole and its addresses are aligned; otherwise element by
// element. Which path runs changes no result: the math per element is the same.
#include "cuda/kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "adagrad8/quant.h"
#include "adagrad8/rng.h"

namespace adagrad8::cuda {
namespace {

constexpr int kThreads = 256;  // threads per CUDA block, in every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTensors = 32;
constexpr int64_t kMaxGrid = 65536;
constexpr int64_t kFp32Chunk = 8 * kThreads;  // elements per unit of fp32_kernel
constexpr int64_t kBigChunk = 16 * kThreads;  // elements per unit of the large-block kernels
constexpr int kVec = 4;                       // consecutive elements per thread per access
static_assert(kFp32Chunk % kVec == 0 && kBigChunk % kVec == 0, "units must start on a chunk");

// Up to kMaxTensors tensors; tensor k owns units [start[k], start[k + 1]).
template <typename Tensor>
struct Batch {
  Tensor t[kMaxTensors];
  float* scratch[kMaxTensors];  // large-block path: tensor k's new scales in the workspace
  int64_t start[kMaxTensors + 1];
  int n;

  __device__ int find(int64_t unit) const {
    int k = 0;
    while (unit >= start[k + 1]) ++k;
    return k;
  }
};
static_assert(sizeof(Batch<QuantTensor>) <= 3072, "kernel parameters must stay under 4 KiB");

// ---- element access ------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kVec elements of T, aligned so that one load or store moves them all.
template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

// Whether p, and p + i for every i that is a multiple of kVec, can be accessed as Vec<T>.
template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T>) == 0;
}

// Elements [i, i + n) of p (n <= kVec): one vector load when `whole` (n == kVec, aligned),
// else one load per element. Lanes from n on are zero and never stored.
template <typename T>
__device__ __forceinline__ Vec<T> load(const T* p, int64_t i, int n, bool whole) {
  if (whole) return *reinterpret_cast<const Vec<T>*>(p + i);
  Vec<T> r{};
  for (int k = 0; k < kVec; ++k) {
    if (k < n) r.v[k] = p[i + k];
  }
  return r;
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, int n, bool whole, const Vec<T>& x) {
  if (whole) {
    *reinterpret_cast<Vec<T>*>(p + i) = x;
    return;
  }
  for (int k = 0; k < kVec; ++k) {
    if (k < n) p[i + k] = x.v[k];
  }
}

// Calls f(i, n, whole) for the elements of [begin, end) that thread `lane` of `width` threads
// owns, n <= kVec consecutive ones at a time; consecutive lanes touch consecutive memory
// (coalesced). aligned (every tensor accessed is vec_aligned, and begin % kVec == 0): the lane
// owns the chunks of kVec elements at begin + (lane + k * width) * kVec, each whole (one vector
// access per tensor) but a shorter last one. Otherwise it owns the single elements
// begin + lane + k * width.
template <typename F>
__device__ __forceinline__ void for_chunks(int64_t begin, int64_t end, int lane, int width, bool aligned, F&& f) {
  if (!aligned) {
    for (int64_t i = begin + lane; i < end; i += width) f(i, 1, false);
    return;
  }
  for (int64_t i = begin + int64_t{lane} * kVec; i < end; i += int64_t{width} * kVec) {
    const int n = static_cast<int>(min(int64_t{kVec}, end - i));
    f(i, n, n == kVec);
  }
}

// Whether the step changes any of a chunk's n elements' parameters: not when skip_zeros skips
// them all (zero gradients), and then the parameters (and fp32 sums) are not read or written.
template <typename T>
__device__ __forceinline__ bool any_updated(const Vec<T>& raw, int n, const StepConfig& c) {
  if (!c.skip_zeros) return true;  // without waiting for the gradients: loads issue together
  bool any = false;
  for (int e = 0; e < kVec; ++e) any = any || (e < n && !skipped(to_float(raw.v[e]), c));
  return any;
}

__device__ __forceinline__ float gnorm_of(const float* gnorm_scale) {
  return gnorm_scale != nullptr ? *gnorm_scale : 1.0f;
}

// ---- fp32 state ----------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) fp32_kernel(Batch<Fp32Tensor> b, Step s) {
  __shared__ float clr_shared;
  for (int64_t u = blockIdx.x; u < b.start[b.n]; u += gridDim.x) {
    const int k = b.find(u);
    const Fp32Tensor t = b.t[k];
    // decayed_lr divides in double (slow on most GPUs): once per unit, by thread 0.
    if (threadIdx.x == 0) clr_shared = decayed_lr(*s.lr, *t.step, s.lr_decay);
    __syncthreads();
    const float clr = clr_shared;
    const float gs = gnorm_of(t.gnorm_scale);
    T* param = static_cast<T*>(t.param);
    const T* grad = static_cast<const T*>(t.grad);
    const int64_t begin = (u - b.start[k]) * kFp32Chunk;
    const int64_t end = min(t.numel, begin + kFp32Chunk);
    const bool aligned = vec_aligned(param) && vec_aligned(grad) && vec_aligned(t.sum);
    for_chunks(begin, end, threadIdx.x, kThreads, aligned, [&](int64_t i, int n, bool whole) {
      const Vec<T> raw = load(grad, i, n, whole);
      if (!any_updated(raw, n, s.config)) return;
      Vec<T> p = load(static_cast<const T*>(param), i, n, whole);
      Vec<float> sum = load(static_cast<const float*>(t.sum), i, n, whole);
      for (int e = 0; e < kVec; ++e) {
        if (e >= n) continue;
        const float r = to_float(raw.v[e]);
        if (skipped(r, s.config)) continue;  // stored back unchanged, bit for bit
        const float pe = to_float(p.v[e]);
        const float g = effective_grad(r, pe, gs, s.config);
        sum.v[e] = accumulate(sum.v[e], g);
        p.v[e] = from_float<T>(updated_param(pe, g, sum.v[e], clr, s.config.eps));
      }
      store(t.sum, i, n, whole, sum);
      store(param, i, n, whole, p);
    });
    __syncthreads();  // clr_shared is rewritten by the next unit
  }
}

// ---- 8-bit state: shared pieces ------------------------------------------------------------

// The map and its 255 midpoints, into shared memory.
__device__ void load_map(const float* qmap, float* q, float* mid) {
  for (int i = threadIdx.x; i < kMapSize; i += kThreads) {
    q[i] = qmap[i];
    mid[i] = i + 1 < kMapSize ? midpoint(qmap, i) : 0.0f;  // mid[255] is never read
  }
  __syncthreads();
}

// An element's new accumulator value (from its code under old_scale) and effective gradient.
// The max pass and the write pass both call this, so they agree bit for bit.
struct Accumulated {
  float sum, g;
  bool skipped;  // skip_zeros and a zero gradient: sum is the old value, g is 0 and unused
};

__device__ __forceinline__ Accumulated accumulated(float raw, float p, uint8_t code, const float* q, float old_scale,
                                                   float gs, const StepConfig& c) {
  const float sum = dequantize(code, q, old_scale);
  if (skipped(raw, c)) return {sum, 0.0f, true};
  const float g = effective_grad(raw, p, gs, c);
  return {accumulate(sum, g), g, false};
}

// The largest scale candidate among the new sums of the chunk at i (the max pass: parameters
// are read only with weight decay, the only case effective_grad uses them, and only for a chunk
// with an element that is not skipped).
template <typename T>
__device__ __forceinline__ float chunk_max(const QuantTensor& t, int64_t i, int n, bool whole, const float* q,
                                           float old_scale, float gs, const StepConfig& c) {
  const Vec<T> raw = load(static_cast<const T*>(t.grad), i, n, whole);
  const Vec<uint8_t> code = load(static_cast<const uint8_t*>(t.codes), i, n, whole);
  Vec<T> p{};
  if (c.weight_decay != 0.0f && any_updated(raw, n, c)) p = load(static_cast<const T*>(t.param), i, n, whole);
  float m = 0.0f;
  for (int e = 0; e < kVec; ++e) {
    if (e >= n) continue;
    const Accumulated a = accumulated(to_float(raw.v[e]), to_float(p.v[e]), code.v[e], q, old_scale, gs, c);
    m = fmaxf(m, scale_candidate(a.sum));
  }
  return m;
}

// Steps the chunk at i: writes its parameters (unless all are skipped) and its codes under
// new_scale (always: the scale changed).
template <typename T>
__device__ __forceinline__ void write_chunk(const QuantTensor& t, int64_t i, int n, bool whole, const float* q,
                                            const float* mid, float old_scale, float new_scale, float gs, float clr,
                                            const StepConfig& c, bool stochastic, uint64_t stream) {
  T* param = static_cast<T*>(t.param);
  const Vec<T> raw = load(static_cast<const T*>(t.grad), i, n, whole);
  const bool update = any_updated(raw, n, c);
  Vec<T> p{};
  if (update) p = load(static_cast<const T*>(param), i, n, whole);
  Vec<uint8_t> code = load(static_cast<const uint8_t*>(t.codes), i, n, whole);
  for (int e = 0; e < kVec; ++e) {
    if (e >= n) continue;
    const float pe = to_float(p.v[e]);
    const Accumulated a = accumulated(to_float(raw.v[e]), pe, code.v[e], q, old_scale, gs, c);
    if (!a.skipped) p.v[e] = from_float<T>(updated_param(pe, a.g, a.sum, clr, c.eps));
    const float x = normalize(a.sum, new_scale);
    const int64_t index = i + e;
    code.v[e] = stochastic ? quantize_stochastic(x, q, uniform_at(span_key(stream, index), index))
                           : quantize_nearest(x, mid);
  }
  if (update) store(param, i, n, whole, p);
  store(t.codes, i, n, whole, code);
}

// Whether a chunk loop from begin over t may use vector accesses.
template <typename T>
__device__ __forceinline__ bool vec_aligned(const QuantTensor& t, int64_t begin) {
  return begin % kVec == 0 && vec_aligned(static_cast<const T*>(t.param)) &&
         vec_aligned(static_cast<const T*>(t.grad)) && vec_aligned(static_cast<const uint8_t*>(t.codes));
}

// The decayed lr and the stochastic-rounding key of t's step. decayed_lr divides in double
// (slow on most GPUs), so thread 0 calls this once per unit into shared memory.
__device__ __forceinline__ void set_tensor_scalars(const QuantTensor& t, const Step& s, bool stochastic, float* clr,
                                                   uint64_t* stream) {
  const float step = *t.step;
  *clr = decayed_lr(*s.lr, step, s.lr_decay);
  *stream = stochastic ? stream_key(*t.seed, step_index(step)) : 0;
}

// Max of v over each aligned group of `group` threads (a power of two <= kThreads), returned to
// every thread of the group. All threads of the CUDA block must call it; it ends after a
// __syncthreads, so it also orders everything the block did before it against what follows.
// red (kWarps floats) must not be reused before another __syncthreads.
__device__ float group_max(float v, int group, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    if (o < group) v = fmaxf(v, other);
  }
  const int tid = threadIdx.x;
  if ((tid & 31) == 0) red[tid >> 5] = v;
  __syncthreads();
  if (group > 32) {
    const int first = (tid / group) * (group / 32);
    v = red[first];
    for (int w = 1; w < group / 32; ++w) v = fmaxf(v, red[first + w]);
  }
  return v;
}

// Threads per scale block in quant_small_kernel: the smallest power of two that gives each
// thread at most one chunk of kVec elements, capped at kThreads (larger blocks loop).
__host__ __device__ __forceinline__ int group_size(int64_t block) {
  int g = 1;
  while (int64_t{g} * kVec < block && g < kThreads) g <<= 1;
  return g;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- 8-bit state, blocks <= kMaxSmallBlock -------------------------------------------------
// A unit is kThreads / group consecutive scale blocks, each done by its own group of threads:
// pass 1 computes the new sums and reduces their max; the group's first thread stores the new
// scale (every thread of the group read the old one before group_max's __syncthreads); pass 2
// computes the new sums again, identically, and writes params and codes. A scale block is at
// most 16 KB of fp32 grads, so pass 2's reads hit L1/L2, not DRAM.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quant_small_kernel(Batch<QuantTensor> b, Step s, const float* qmap, bool stochastic) {
  __shared__ float q[kMapSize], mid[kMapSize], red[kWarps];
  __shared__ float clr_shared;
  __shared__ uint64_t stream_shared;
  load_map(qmap, q, mid);
  const int tid = threadIdx.x;
  for (int64_t u = blockIdx.x; u < b.start[b.n]; u += gridDim.x) {
    const int k = b.find(u);
    const QuantTensor t = b.t[k];
    if (tid == 0) set_tensor_scalars(t, s, stochastic, &clr_shared, &stream_shared);  // published by group_max
    const int group = group_size(t.block);
    const int lane = tid & (group - 1);
    const int64_t qb = (u - b.start[k]) * (kThreads / group) + tid / group;  // this group's scale block
    const int64_t begin = qb * t.block;
    const int64_t end = begin < t.numel ? min(begin + t.block, t.numel) : begin;  // empty past the last block
    const float old_scale = end > begin ? t.absmax[qb] : 0.0f;
    const float gs = gnorm_of(t.gnorm_scale);
    const bool aligned = vec_aligned<T>(t, begin);

    float m = 0.0f;
    for_chunks(begin, end, lane, group, aligned, [&](int64_t i, int n, bool whole) {
      m = fmaxf(m, chunk_max<T>(t, i, n, whole, q, old_scale, gs, s.config));
    });
    const float new_scale = group_max(m, group, red);
    if (lane == 0 && end > begin) t.absmax[qb] = new_scale;

    const float clr = clr_shared;
    const uint64_t stream = stream_shared;
    for_chunks(begin, end, lane, group, aligned, [&](int64_t i, int n, bool whole) {
      write_chunk<T>(t, i, n, whole, q, mid, old_scale, new_scale, gs, clr, s.config, stochastic, stream);
    });
    __syncthreads();  // red, clr_shared and stream_shared are rewritten by the next unit
  }
}

// ---- 8-bit state, blocks > kMaxSmallBlock (and large tensor-wise state) ---------------------
// A unit is up to kBigChunk elements of one scale block. Phase 1 (quant_max_kernel) merges each
// unit's max into the block's new scale in the zeroed workspace; phase 2 (quant_write_kernel)
// writes params and codes with the old scale from absmax and the new one from the workspace;
// phase 3 copies the workspace into absmax.

struct BigUnit {
  int64_t block_index, begin, end;  // end <= begin for an empty unit
};

__device__ __forceinline__ BigUnit big_unit(const QuantTensor& t, int64_t local_unit) {
  const int64_t per_block = ceil_div(t.block, kBigChunk);
  const int64_t qb = local_unit / per_block;
  const int64_t begin = qb * t.block + (local_unit % per_block) * kBigChunk;
  const int64_t end = min(min(begin + kBigChunk, (qb + 1) * t.block), t.numel);
  return {qb, begin, end};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quant_max_kernel(Batch<QuantTensor> b, Step s, const float* qmap) {
  __shared__ float q[kMapSize], mid[kMapSize], red[kWarps];
  load_map(qmap, q, mid);
  for (int64_t u = blockIdx.x; u < b.start[b.n]; u += gridDim.x) {
    const int k = b.find(u);
    const QuantTensor t = b.t[k];
    const BigUnit w = big_unit(t, u - b.start[k]);
    const float old_scale = t.absmax[w.block_index];
    const float gs = gnorm_of(t.gnorm_scale);
    float m = 0.0f;
    for_chunks(w.begin, w.end, threadIdx.x, kThreads, vec_aligned<T>(t, w.begin), [&](int64_t i, int n, bool whole) {
      m = fmaxf(m, chunk_max<T>(t, i, n, whole, q, old_scale, gs, s.config));
    });
    m = group_max(m, kThreads, red);
    // m is finite and >= 0, where float order is int order of the bits.
    if (threadIdx.x == 0 && m > 0.0f) atomicMax(reinterpret_cast<int*>(b.scratch[k] + w.block_index), __float_as_int(m));
    __syncthreads();  // red is rewritten by the next unit
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quant_write_kernel(Batch<QuantTensor> b, Step s, const float* qmap, bool stochastic) {
  __shared__ float q[kMapSize], mid[kMapSize];
  __shared__ float clr_shared;
  __shared__ uint64_t stream_shared;
  load_map(qmap, q, mid);
  for (int64_t u = blockIdx.x; u < b.start[b.n]; u += gridDim.x) {
    const int k = b.find(u);
    const QuantTensor t = b.t[k];
    if (threadIdx.x == 0) set_tensor_scalars(t, s, stochastic, &clr_shared, &stream_shared);
    __syncthreads();
    const float clr = clr_shared;
    const uint64_t stream = stream_shared;
    const BigUnit w = big_unit(t, u - b.start[k]);
    const float old_scale = t.absmax[w.block_index];
    const float new_scale = b.scratch[k][w.block_index];
    const float gs = gnorm_of(t.gnorm_scale);
    for_chunks(w.begin, w.end, threadIdx.x, kThreads, vec_aligned<T>(t, w.begin), [&](int64_t i, int n, bool whole) {
      write_chunk<T>(t, i, n, whole, q, mid, old_scale, new_scale, gs, clr, s.config, stochastic, stream);
    });
    __syncthreads();  // clr_shared and stream_shared are rewritten by the next unit
  }
}

// ---- launchers -----------------------------------------------------------------------------

int grid_for(int64_t units) { return static_cast<int>(std::min(units, kMaxGrid)); }

// Calls launch(batch) for consecutive groups of up to kMaxTensors of the tensors with
// units(tensor) > 0. scratch, if given, holds each tensor's workspace slice.
template <typename Tensor, typename Units, typename Launch>
cudaError_t in_batches(const std::vector<Tensor>& tensors, const std::vector<float*>* scratch, Units units,
                       Launch launch) {
  Batch<Tensor> b{};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n_units = units(tensors[i]);
    if (n_units == 0) continue;
    b.t[b.n] = tensors[i];
    b.scratch[b.n] = scratch != nullptr ? (*scratch)[i] : nullptr;
    b.start[b.n + 1] = b.start[b.n] + n_units;
    if (++b.n == kMaxTensors) {
      const cudaError_t err = launch(b);
      if (err != cudaSuccess) return err;
      b.n = 0;
    }
  }
  return b.n > 0 ? launch(b) : cudaSuccess;
}

// fn(T{}) with T the CUDA type of dtype.
template <typename Fn>
cudaError_t by_dtype(Dtype dtype, Fn fn) {
  switch (dtype) {
    case Dtype::kHalf: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
    default: return fn(float{});
  }
}

// The tensors with elements, each with its block clamped to numel (same blocks, same scales).
std::vector<QuantTensor> normalized(const QuantTensor* tensors, int64_t n) {
  std::vector<QuantTensor> out;
  for (int64_t i = 0; i < n; ++i) {
    if (tensors[i].numel <= 0) continue;
    QuantTensor t = tensors[i];
    t.block = std::min(t.block, t.numel);
    out.push_back(t);
  }
  return out;
}

bool is_small(const QuantTensor& t) { return t.block <= kMaxSmallBlock; }

}  // namespace

int64_t quantized_workspace_size(const QuantTensor* tensors, int64_t n) {
  int64_t size = 0;
  for (const QuantTensor& t : normalized(tensors, n)) {
    if (!is_small(t)) size += ceil_div(t.numel, t.block);
  }
  return size;
}

cudaError_t step_fp32(Dtype dtype, const Fp32Tensor* tensors, int64_t n, const Step& step, cudaStream_t stream) {
  const std::vector<Fp32Tensor> list(tensors, tensors + n);
  const auto units = [](const Fp32Tensor& t) { return t.numel > 0 ? ceil_div(t.numel, kFp32Chunk) : 0; };
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return in_batches(list, nullptr, units, [&](const Batch<Fp32Tensor>& b) {
      fp32_kernel<T><<<grid_for(b.start[b.n]), kThreads, 0, stream>>>(b, step);
      return cudaGetLastError();
    });
  });
}

cudaError_t step_quantized(Dtype dtype, const QuantTensor* tensors, int64_t n, const Step& step,
                           const float* qmap, bool stochastic, float* workspace, cudaStream_t stream) {
  const std::vector<QuantTensor> list = normalized(tensors, n);

  // Blocks <= kMaxSmallBlock: one kernel.
  const auto small_units = [](const QuantTensor& t) {
    return is_small(t) ? ceil_div(ceil_div(t.numel, t.block), kThreads / group_size(t.block)) : 0;
  };
  cudaError_t err = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return in_batches(list, nullptr, small_units, [&](const Batch<QuantTensor>& b) {
      quant_small_kernel<T><<<grid_for(b.start[b.n]), kThreads, 0, stream>>>(b, step, qmap, stochastic);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;

  // Larger blocks: three phases through the workspace.
  std::vector<float*> scratch(list.size(), nullptr);
  int64_t size = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    if (is_small(list[i])) continue;
    scratch[i] = workspace + size;
    size += ceil_div(list[i].numel, list[i].block);
  }
  if (size == 0) return cudaSuccess;
  err = cudaMemsetAsync(workspace, 0, size * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const auto big_units = [](const QuantTensor& t) {
    return is_small(t) ? 0 : ceil_div(t.numel, t.block) * ceil_div(t.block, kBigChunk);
  };
  err = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return in_batches(list, &scratch, big_units, [&](const Batch<QuantTensor>& b) {
      quant_max_kernel<T><<<grid_for(b.start[b.n]), kThreads, 0, stream>>>(b, step, qmap);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      quant_write_kernel<T><<<grid_for(b.start[b.n]), kThreads, 0, stream>>>(b, step, qmap, stochastic);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  for (size_t i = 0; i < list.size(); ++i) {
    if (scratch[i] == nullptr) continue;
    err = cudaMemcpyAsync(list[i].absmax, scratch[i], ceil_div(list[i].numel, list[i].block) * sizeof(float),
                          cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace adagrad8::cuda
