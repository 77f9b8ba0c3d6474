// Grid sizing of the grid-stride kernels (composite, occupancy marching, binomial filter, bias_act)
// and their index type. Torch-free, like every kernel here.
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

// The largest index a kernel indexed in int32 may reach. The CPU emulator's tests lower it (to 0) to
// run the int64-indexed kernels on small tensors: no test machine holds 2^31 elements.
#ifndef TALK3D_NARROW_INDEX_LIMIT
#define TALK3D_NARROW_INDEX_LIMIT INT32_MAX
#endif

// `launch(int32_t{})` when every index a kernel forms stays at or below `biggest` and int32 holds it,
// else `launch(int64_t{})`: 64-bit index arithmetic costs several instructions per operation (tens
// for a division or modulo) on a GPU.
template <typename Launch>
cudaError_t with_index_type(int64_t biggest, Launch&& launch) {
  return biggest <= int64_t(TALK3D_NARROW_INDEX_LIMIT) ? launch(int32_t{}) : launch(int64_t{});
}

}  // namespace cuda
}  // namespace talk3d
