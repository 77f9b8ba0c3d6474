// CUDA kernel of occupancy-grid marching (op occupied_intervals): one thread per ray around
// talk3d/occupancy_math.h, which the CPU kernel shares. Each ray walks the cells it crosses and
// writes its own two outputs, so threads never interact.
//
// Tested by emulation on the CPU (tests/test_cuda_emulation_render.py) against the CPU op, and on an
// H100 and an H200 (the CUDA tests of tests/test_occupancy.py).
#include "occupancy_cuda.h"

#include <stdint.h>

#include "common/grid.cuh"
#include "talk3d/occupancy_math.h"

namespace talk3d {
namespace cuda {
namespace {

constexpr int kMarchThreads = 128;
// The grid is sized for this many resident 128-thread blocks per SM; a grid-stride loop takes the
// rays beyond that.
constexpr int kMarchBlocksPerSM = 16;

template <typename T>
struct MarchArgs {
  const T* origins;      // [M, 3]
  const T* dirs;         // [M, 3]
  const T* t;            // [M, S]
  int64_t M, S;
  const uint8_t* bits;   // [ceil(res^3 / 8)]
  int res;
  T box;
  bool outside_occupied;
  int32_t* out;          // [M, 2]
};

template <typename T>
__global__ void __launch_bounds__(kMarchThreads) occupied_intervals_kernel(const MarchArgs<T> a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.M; r += stride) {
    const T* tr = a.t + r * a.S;
    const occupancy::Span<T> span = occupancy::occupied_span<T>(
        a.origins + 3 * r, a.dirs + 3 * r, tr[0], tr[a.S - 1], a.bits, a.res, a.box, a.outside_occupied);
    int k0, k1;
    occupancy::live_intervals<T>(tr, a.S, span, k0, k1);
    a.out[2 * r] = k0;
    a.out[2 * r + 1] = k1;
  }
}

template <typename T>
cudaError_t launch_march(const MarchProblem& p, int32_t* out, cudaStream_t stream) {
  MarchArgs<T> a;
  a.origins = static_cast<const T*>(p.origins);
  a.dirs = static_cast<const T*>(p.dirs);
  a.t = static_cast<const T*>(p.t);
  a.M = p.M;
  a.S = p.S;
  a.bits = p.bits;
  a.res = p.res;
  a.box = T(p.box);  // as the CPU op: the box in the rays' type
  a.outside_occupied = p.outside_occupied;
  a.out = out;
  int blocks = 0;
  const cudaError_t err = grid_stride_blocks(p.M, kMarchThreads, kMarchBlocksPerSM, blocks);
  if (err != cudaSuccess) return err;
  auto kernel = occupied_intervals_kernel<T>;
  kernel<<<blocks, kMarchThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t occupied_intervals(const MarchProblem& p, int32_t* out, cudaStream_t stream) {
  if (p.M < 0 || p.S < 2 || p.res < 1 || !(p.box > 0)) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  if (!p.origins || !p.dirs || !p.t || !p.bits || !out) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case MarchDType::kF32:
      return launch_march<float>(p, out, stream);
    case MarchDType::kF64:
      return launch_march<double>(p, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace talk3d
