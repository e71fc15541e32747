// Empty: tests/cuda_emulation/emu.h provides what kernels.cu uses from this CUDA header.
#pragma once
