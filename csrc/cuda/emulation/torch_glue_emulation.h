// Build csrc/cuda/filter_stats.cu and reactivate.cu for CPU tensors, torch glue included, with
// the kernels running under the host emulation (host_emulation.h): include this first, then
// the two .cu files, in a C++20 translation unit (see tests/test_cuda_kernels.py). The ops then
// register as craft_ext_emu::<op> for the CPU dispatch key (the test defines those schemas), so
// they never clash with the real craft_ext ops.
//
// Stand-ins: c10::cuda::CUDAGuard does nothing, getCurrentCUDAStream() is the null stream,
// C10_CUDA_KERNEL_LAUNCH_CHECK() checks nothing (emulated launches cannot fail).
#pragma once

#include <c10/core/Device.h>

#include "host_emulation.h"

#define CRAFT_EXT_HOST_EMULATION 1
#define CRAFT_EXT_OPS_LIBRARY craft_ext_emu
#define CRAFT_EXT_OPS_KEY CPU
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (false)

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device /*device*/) {}
};

inline cudaStream_t getCurrentCUDAStream() { return nullptr; }

}  // namespace cuda
}  // namespace c10
