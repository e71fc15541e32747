// Just enough CUDA to run csrc/cuda/kernels.cu on a CPU (tests/test_cuda_emulated.py).
// - Every CUDA thread of a block is a std::thread, running freely between barriers.
// - __syncthreads is a barrier of the block, after which half of the warps lag behind; a warp
//   shuffle is a barrier of the warp's 32 threads only. So a block-wide race that a missing
//   __syncthreads leaves can show: it did for two of three barriers removed on trial, not for
//   the one at the end of quant_max_kernel's loop (its race needs warp 0 a whole unit behind).
// - __shared__ variables are statics (one block at a time uses them).
// - Vector accesses go through emu_vector, which counts them and those not aligned to their size.
// - A block whose threads do not all reach a barrier aborts after a minute instead of hanging.
// Not emulated: blocks running at the same time (they run one after another, ascending or, with
// EMU_BLOCKS_REVERSED, descending), shared memory that starts as garbage (statics start zeroed
// and keep the last block's values), the GPU memory model, timing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
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

inline std::barrier<>* emu_block_barrier;
inline std::vector<std::barrier<>*> emu_warp_barriers;
// After each barrier half of the warps wait a little (odd ones after odd-numbered barriers, even
// ones after even-numbered), so that the others run ahead as warps may on a GPU: a block-wide
// race (shared memory reused without a barrier in between) then shows up as wrong results
// instead of depending on the scheduler's luck.
inline thread_local unsigned emu_barriers_passed = 0;
inline void __syncthreads() {
  emu_block_barrier->arrive_and_wait();
  if ((threadIdx.x / 32 + ++emu_barriers_passed) % 2 == 1) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// Every thread of the warp calls it (group_max: all threads of the block do), so the exchange
// goes through memory between two barriers of the warp. Offsets below 32 stay inside the warp.
inline float emu_exchange[1024];
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int offset) {
  std::barrier<>& warp = *emu_warp_barriers[threadIdx.x / 32];
  emu_exchange[threadIdx.x] = v;
  warp.arrive_and_wait();
  const float other = emu_exchange[threadIdx.x ^ offset];
  warp.arrive_and_wait();
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
// threads: a multiple of 32 (every kernel uses 256).
template <typename Kernel, typename... Args>
void emu_launch(int grid, int threads, Kernel kernel, Args... args) {
  gridDim.x = static_cast<unsigned>(grid);
  for (int i = 0; i < grid; ++i) {
#ifdef EMU_BLOCKS_REVERSED
    const int b = grid - 1 - i;
#else
    const int b = i;
#endif
    std::barrier<> block_barrier(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    emu_warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(32));
      emu_warp_barriers.push_back(warps.back().get());
    }
    emu_block_barrier = &block_barrier;
    std::mutex mutex;
    std::condition_variable finished;
    int running = threads;
    std::vector<std::thread> block;
    for (int t = 0; t < threads; ++t) {
      block.emplace_back([&, t] {
        threadIdx.x = static_cast<unsigned>(t);
        blockIdx.x = static_cast<unsigned>(b);
        kernel(args...);
        const std::lock_guard<std::mutex> lock(mutex);
        if (--running == 0) finished.notify_one();
      });
    }
    {
      std::unique_lock<std::mutex> lock(mutex);
      if (!finished.wait_for(lock, std::chrono::seconds(60), [&] { return running == 0; })) {
        std::fprintf(stderr, "emulated CUDA block %d: %d threads never finished (a barrier not all reach?)\n", b,
                     running);
        std::abort();
      }
    }
    for (std::thread& thread : block) thread.join();
  }
}
