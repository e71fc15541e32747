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
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float raw = to_float(grad[i]);
      if (skipped(raw, s.config)) continue;
      const float p = to_float(param[i]);
      const float g = effective_grad(raw, p, gs, s.config);
      const float sum = accumulate(t.sum[i], g);
      t.sum[i] = sum;
      param[i] = from_float<T>(updated_param(p, g, sum, clr, s.config.eps));
    }
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

// New accumulator value of element i, from its code stored under old_scale.
template <typename T>
__device__ __forceinline__ float new_sum(const QuantTensor& t, int64_t i, const float* q, float old_scale,
                                         float gs, const StepConfig& c) {
  const float raw = to_float(static_cast<const T*>(t.grad)[i]);
  const float sum = dequantize(t.codes[i], q, old_scale);
  if (skipped(raw, c)) return sum;
  const float p = to_float(static_cast<const T*>(t.param)[i]);
  return accumulate(sum, effective_grad(raw, p, gs, c));
}

// Recomputes element i exactly as new_sum does, writes its parameter and its code under new_scale.
template <typename T>
__device__ __forceinline__ void write_element(const QuantTensor& t, int64_t i, const float* q, const float* mid,
                                              float old_scale, float new_scale, float gs, float clr,
                                              const StepConfig& c, bool stochastic, uint64_t stream) {
  const float raw = to_float(static_cast<const T*>(t.grad)[i]);
  float sum = dequantize(t.codes[i], q, old_scale);
  if (!skipped(raw, c)) {
    T* param = static_cast<T*>(t.param);
    const float p = to_float(param[i]);
    const float g = effective_grad(raw, p, gs, c);
    sum = accumulate(sum, g);
    param[i] = from_float<T>(updated_param(p, g, sum, clr, c.eps));
  }
  const float x = normalize(sum, new_scale);
  t.codes[i] = stochastic ? quantize_stochastic(x, q, uniform_at(span_key(stream, i), i)) : quantize_nearest(x, mid);
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

// Threads per scale block in quant_small_kernel: the next power of two >= block, at most kThreads.
__host__ __device__ __forceinline__ int group_size(int64_t block) {
  int g = 1;
  while (g < block && g < kThreads) g <<= 1;
  return g;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- 8-bit state, blocks <= kMaxSmallBlock -------------------------------------------------
// A unit is kThreads / group consecutive scale blocks, each done by its own group of threads:
// pass 1 recomputes the new sums and reduces their max, pass 2 recomputes them identically and
// writes params and codes, then the group's first thread stores the new scale. Every thread of
// a group reads the old scale before group_max's __syncthreads, and it is written after it.

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
    const int64_t len = begin < t.numel ? min(t.block, t.numel - begin) : 0;
    const float old_scale = len > 0 ? t.absmax[qb] : 0.0f;
    const float gs = gnorm_of(t.gnorm_scale);

    float m = 0.0f;
    for (int64_t j = lane; j < len; j += group) {
      m = fmaxf(m, scale_candidate(new_sum<T>(t, begin + j, q, old_scale, gs, s.config)));
    }
    const float new_scale = group_max(m, group, red);

    const float clr = clr_shared;
    const uint64_t stream = stream_shared;
    for (int64_t j = lane; j < len; j += group) {
      write_element<T>(t, begin + j, q, mid, old_scale, new_scale, gs, clr, s.config, stochastic, stream);
    }
    if (lane == 0 && len > 0) t.absmax[qb] = new_scale;
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
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += kThreads) {
      m = fmaxf(m, scale_candidate(new_sum<T>(t, i, q, old_scale, gs, s.config)));
    }
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
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += kThreads) {
      write_element<T>(t, i, q, mid, old_scale, new_scale, gs, clr, s.config, stochastic, stream);
    }
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
