// Torch glue shared by csrc/cuda/filter_stats.cu and csrc/cuda/reactivate.cu: dtype mapping,
// stream / launch checking and the weight checks. The [N, K] rows the kernels run on come from
// craft_ext::filter_rows (csrc/common.h).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS, cuSPARSE
// and cuSOLVER headers): c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream names.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#ifndef CRAFT_EXT_HOST_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Library and dispatch key the ops register under: craft_ext / CUDA. Only the CPU test build of
// this glue (csrc/cuda/emulation/torch_glue_emulation.h, which also stands in for the c10::cuda
// pieces above and runs the kernels on host threads) registers elsewhere.
#ifndef CRAFT_EXT_OPS_LIBRARY
#define CRAFT_EXT_OPS_LIBRARY craft_ext
#define CRAFT_EXT_OPS_KEY CUDA
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

namespace craft_ext {
namespace cuda {

// The CUDA type with the same 16-bit layout as torch's scalar type.
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
using device_t = typename DeviceType<scalar_t>::type;

template <typename scalar_t>
device_t<scalar_t>* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<device_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

// Checks shared by the ops: a CUDA floating weight [N, ...] with N >= 0 and K >= 1.
inline void check_weight(const at::Tensor& weight, const char* op) {
#ifndef CRAFT_EXT_HOST_EMULATION
  TORCH_CHECK(weight.is_cuda(), "craft_ext::", op, " (CUDA): weight must be a CUDA tensor");
#endif
  TORCH_CHECK(weight.dim() >= 2, "craft_ext::", op, ": weight must have at least 2 dims, got ",
              weight.dim());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "craft_ext::", op,
              ": weight must be float32, float16, bfloat16 or float64, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(0) == 0 || weight.numel() > 0, "craft_ext::", op,
              ": every filter must hold at least one element");
}

}  // namespace cuda
}  // namespace craft_ext
