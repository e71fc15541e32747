// Just enough CUDA to run csrc/cuda/kernels.cu on a CPU (tests/test_cuda_emulated.py): every
// CUDA thread of a block is a std::thread, blocks run one after another, __syncthreads is a
// barrier, __shared__ variables are statics (one block at a time uses them). Vector accesses go
// through emu_vector, which counts them and those not aligned to their size.
// Not emulated: warps' lockstep, the memory model, timing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(threads)

struct EmuDim {
  unsigned x = 0;
};
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim gridDim;

inline std::barrier<>* emu_barrier;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

// Every thread of the block calls it (as group_max does), so the exchange goes through memory
// between two barriers. Offsets below 32 stay inside the thread's warp.
inline float emu_exchange[1024];
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) {
  emu_exchange[threadIdx.x] = v;
  __syncthreads();
  const float other = emu_exchange[threadIdx.x ^ offset];
  __syncthreads();
  return other;
}

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline std::mutex emu_atomic;
inline int atomicMax(int* p, int v) {
  const std::lock_guard<std::mutex> lock(emu_atomic);
  const int old = *p;
  *p = std::max(old, v);
  return old;
}
using std::min;

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}

inline std::atomic<long> emu_vector_accesses{0}, emu_misaligned_accesses{0};
// A GPU faults on a misaligned vector access; here it is counted, a load reads a copy and a
// store is lost (so results differ too), and the test process does not crash.
template <typename V, typename P>
V* emu_vector(P* p) {
  ++emu_vector_accesses;
  if (reinterpret_cast<uintptr_t>(p) % alignof(V) == 0) return reinterpret_cast<V*>(p);
  ++emu_misaligned_accesses;
  thread_local std::remove_const_t<V> bounce;
  std::memcpy(&bounce, p, sizeof(V));
  return &bounce;
}

// kernel<<<grid, threads, 0, stream>>>(args...), rewritten by the test into this call.
template <typename Kernel, typename... Args>
void emu_launch(int grid, int threads, Kernel kernel, Args... args) {
  gridDim.x = static_cast<unsigned>(grid);
  for (int b = 0; b < grid; ++b) {
    std::barrier<> barrier(threads);
    emu_barrier = &barrier;
    std::vector<std::thread> block;
    for (int t = 0; t < threads; ++t) {
      block.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(b);
        kernel(args...);
      });
    }
    for (std::thread& thread : block) thread.join();
  }
}
