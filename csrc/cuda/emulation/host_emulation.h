// Host emulation of the CUDA features that csrc/cuda/*_kernels.cuh use, so that their kernels
// and launchers can run (slowly) on a machine without a GPU and be checked against a plain C++
// computation (emulate_kernels.cpp, run by tools/check_cuda_compile.sh).
//
// Every CUDA thread of a block is a std::thread; blocks run one after another. __syncthreads
// is a std::barrier over the block, __shfl_xor_sync exchanges values through a per-warp table
// between two warp barriers, and __shared__ variables are function-local statics (one block at
// a time, so they are per block). Device memory is host memory.
//
// This checks indexing, the reduction trees, vector / scalar paths and launch configurations.
// It does not model the GPU memory model, warp divergence rules or timing, and the arithmetic is
// the host's (no FTZ, no fast-math); it is no substitute for running tests/test_cuda_kernels.py
// on a GPU. Include this file before any kernel header; compile with -std=c++20 -pthread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace emu {

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> shuffle_slots;  // one per thread
};

inline thread_local ThreadState tls{};
inline BlockState* current_block = nullptr;

inline void syncthreads() { current_block->block_barrier->arrive_and_wait(); }

template <typename V>
V shfl_xor(unsigned /*mask*/, V v, int lane_mask) {
  const unsigned t = tls.thread_idx.x;
  const unsigned warp = t / 32;
  const unsigned partner = warp * 32 + ((t % 32) ^ static_cast<unsigned>(lane_mask));
  std::barrier<>& bar = *current_block->warp_barriers[warp];
  current_block->shuffle_slots[t] = static_cast<double>(v);  // exact for float and double
  bar.arrive_and_wait();
  const V out = static_cast<V>(current_block->shuffle_slots[partner]);
  bar.arrive_and_wait();
  return out;
}

// Runs kernel<<<grid, block>>>(args...) to completion on host threads.
template <typename... Params>
struct Launch {
  dim3 grid;
  dim3 block;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args... args) const {
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned b = 0; b < grid.x; ++b) {
      BlockState state;
      state.block_barrier = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
        state.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
      }
      state.shuffle_slots.assign(threads, 0.0);
      current_block = &state;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          tls.thread_idx = uint3{t, 0, 0};
          tls.block_idx = uint3{b, 0, 0};
          tls.block_dim = block;
          tls.grid_dim = grid;
          kernel(static_cast<Params>(args)...);
        });
      }
      for (auto& th : pool) th.join();
      current_block = nullptr;
    }
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return {grid, block, kernel};
}

}  // namespace emu

// The CUDA spellings the kernel headers use, mapped onto the emulation.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::emu::tls.thread_idx)
#define blockIdx (::emu::tls.block_idx)
#define blockDim (::emu::tls.block_dim)
#define gridDim (::emu::tls.grid_dim)
#define CRAFT_EXT_LAUNCH(grid, block, stream, ...) ::emu::launch(grid, block, __VA_ARGS__)

inline void __syncthreads() { emu::syncthreads(); }
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  return emu::shfl_xor(mask, v, lane_mask);
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
