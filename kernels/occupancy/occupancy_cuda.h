// Launcher of the occupancy-grid marching CUDA kernel (op occupied_intervals). Torch-free like
// kernels/triplane_field; csrc/occupancy/occupancy_cuda.cpp is the torch-facing adapter.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Type of origins, dirs and t; the marching runs in that type.
enum class MarchDType : int { kF32 = 0, kF64 = 1 };

// M rays with S >= 2 sorted samples each; the grid covers [-box/2, box/2]^3 with res^3 cells
// (layout in talk3d/occupancy_math.h).
struct MarchProblem {
  MarchDType dtype;
  const void* origins;     // [M, 3] contiguous, dtype
  const void* dirs;        // [M, 3] contiguous, dtype
  const void* t;           // [M, S] contiguous, dtype
  int64_t M, S;
  const uint8_t* bits;     // [ceil(res^3 / 8)] occupancy bits, least significant bit first
  int res;                 // cells per axis, >= 1
  double box;              // edge of the scene cube, > 0
  bool outside_occupied;   // whether space outside the cube counts as occupied
};

// out: int32 [M, 2] contiguous: per ray the first and last interval [t_i, t_{i+1}] overlapping its
// occupied span, or (-1, -1).
cudaError_t occupied_intervals(const MarchProblem& p, int32_t* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace talk3d
