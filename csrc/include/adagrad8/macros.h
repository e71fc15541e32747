// ADAGRAD8_HD marks the per-element math that CPU and CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define ADAGRAD8_HD __host__ __device__ __forceinline__
#else
#define ADAGRAD8_HD inline
#endif
