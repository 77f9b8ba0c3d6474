// Launchers of the fused triplane field CUDA kernels. Torch-free on purpose: raw pointers, sizes and
// a stream, so nvcc can compile-check the kernels on machines whose torch has no CUDA, and the
// torch-facing host code (csrc/triplane_field/triplane_field_cuda.cpp) stays a thin adapter.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Storage type of planes and decoder weights; accumulation is always fp32 (fp64 for kF64).
enum class FieldDType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct FieldProblem {
  FieldDType dtype;
  const void* planes;  // [B, 3, H, W, C] channels-last, channel stride 1, strides below (elements)
  int64_t s_batch, s_plane, s_y, s_x;
  int B, H, W, C;
  const void* xyz;     // [B, N, 3] contiguous; fp64 when dtype is kF64, else fp32
  int64_t N;
  const void* w1;      // [HID, C]   contiguous, dtype
  const void* b1;      // [HID]
  const void* w2;      // [OUT, HID]
  const void* b2;      // [OUT]
  int HID, OUT;        // OUT = 1 + F
  double box_warp;
  int axes;            // 0 = fixed, 1 = eg3d
};

// sigma: [B, N, 1], feat: [B, N, OUT - 1], contiguous, dtype of the planes.
cudaError_t field_forward(const FieldProblem& p, void* sigma, void* feat, cudaStream_t stream);

// grad_sigma: [B, N, 1], grad_feat: [B, N, OUT - 1], contiguous, dtype of the planes.
// Every output pointer may be null (that gradient is not wanted). All outputs are accumulation
// type (fp32, or fp64 for kF64), contiguous, and must be zero-filled by the caller:
//   d_planes [B, 3, H, W, C], d_xyz [B, N, 3], d_w1 [HID, C], d_b1 [HID], d_w2 [OUT, HID], d_b2 [OUT].
cudaError_t field_backward(const FieldProblem& p, const void* grad_sigma, const void* grad_feat,
                           void* d_planes, void* d_xyz, void* d_w1, void* d_b1, void* d_w2,
                           void* d_b2, cudaStream_t stream);

// Largest sizes the generic (non-EG3D) kernel instance accepts.
constexpr int kMaxC = 64, kMaxHid = 128, kMaxOut = 129;

}  // namespace cuda
}  // namespace talk3d
