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
  // Forward decoder of the EG3D size with fp16/bf16 storage: kMlpFma (per-point fp32 FMAs) or
  // kMlpTensorCores (mma.sync on sm_80+, features and hidden units rounded to the storage type;
  // elsewhere, and for other sizes and dtypes, the FMA kernels run).
  int mlp = 0;
};

constexpr int kMlpFma = 0, kMlpTensorCores = 1;

// sigma: [B, N, 1], feat: [B, N, OUT - 1], contiguous, dtype of the planes.
cudaError_t field_forward(const FieldProblem& p, void* sigma, void* feat, cudaStream_t stream);

// grad_sigma: [B, N, 1], grad_feat: [B, N, OUT - 1], contiguous, dtype of the planes.
// Every output pointer may be null (that gradient is not wanted). All outputs are accumulation
// type (fp32, or fp64 for kF64), contiguous, and must be zero-filled by the caller:
//   d_planes [B, 3, H, W, C], d_xyz [B, N, 3], d_w1 [HID, C], d_b1 [HID], d_w2 [OUT, HID], d_b2 [OUT].
cudaError_t field_backward(const FieldProblem& p, const void* grad_sigma, const void* grad_feat,
                           void* d_planes, void* d_xyz, void* d_w1, void* d_b1, void* d_w2,
                           void* d_b2, cudaStream_t stream);

// The streaming backward, for the EG3D sizes with fp32, fp16 or bf16 storage (applies(p)): a thread
// per point with ~100 live values instead of field_backward's 255 registers and stack frame. It
// computes the plane and point gradients of points [begin, begin + count) of the flattened B * N
// points (outputs as field_backward, zero-filled by the caller) and, when `rows` is not null, writes
// those points' weight-gradient factors into rows (BackwardRows, row stride ld >= count) instead of
// reducing them: the caller's two GEMMs over the points give the decoder's weight gradients.
bool field_backward_streaming_applies(const FieldProblem& p);
cudaError_t field_backward_streaming(const FieldProblem& p, int64_t begin, int64_t count,
                                     const void* grad_sigma, const void* grad_feat, void* d_planes,
                                     void* d_xyz, float* rows, int64_t ld, cudaStream_t stream);

// Points one launch of the streaming backward (with rows) runs at once on the current device: its
// resident blocks times their threads. Chunks that are a multiple of it leave no partly filled last
// round in the kernel's grid-stride loop.
cudaError_t field_backward_streaming_wave(const FieldProblem& p, int64_t& points);

// Rows of the streaming backward's weight-gradient factors, feature-major [count][ld] fp32, column r
// for point begin + r:  [f | 1] (C + 1 rows), [h | 1] (HID + 1), dpre (HID), dout (OUT), with
// h = softplus(pre) and dpre, dout the gradients of pre and of the raw outputs. Over the points:
//   [dW1 | db1] = dpre [f | 1]^T   ([HID, C + 1]),   [dW2 | db2] = dout [h | 1]^T   ([OUT, HID + 1]).
struct BackwardRows {
  static constexpr int C = 32, HID = 64, OUT = 33;  // the EG3D decoder
  static constexpr int f = 0, h = f + C + 1, dpre = h + HID + 1, dout = dpre + HID, count = dout + OUT;
};

// Largest sizes the generic (non-EG3D) kernel instance accepts.
constexpr int kMaxC = 64, kMaxHid = 128, kMaxOut = 129;

}  // namespace cuda
}  // namespace talk3d
