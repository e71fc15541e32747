// ADAGRAD8_HD marks the per-element math that CPU and CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define ADAGRAD8_HD __host__ __device__ __forceinline__
#else
// static: the CPU kernels compile these headers once per instruction set (DEFAULT, AVX2,
// AVX512). With external linkage the linker would keep one copy for all three, possibly the
// AVX512 one, and a CPU without AVX512 would crash wherever a call was not inlined.
#define ADAGRAD8_HD static inline
#endif
