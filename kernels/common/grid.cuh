// Grid sizing of the grid-stride kernels (composite, occupancy marching, binomial filter). Torch-free,
// like every kernel here.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Enough blocks of `threads` to cover `work` items once, at most `blocks_per_sm` per SM of the current
// device; a grid-stride loop in the kernel takes the items beyond that.
inline cudaError_t grid_stride_blocks(int64_t work, int threads, int blocks_per_sm, int& blocks) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * blocks_per_sm;
  blocks = int(needed < cap ? needed : cap);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace talk3d
