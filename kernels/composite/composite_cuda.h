// Launchers of the fused compositing CUDA kernels (EG3D's MipRayMarcher2). Torch-free like
// kernels/triplane_field: raw pointers, sizes and a stream, so nvcc can compile-check them without a
// CUDA torch; csrc/composite/composite_cuda.cpp is the torch-facing adapter.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Storage type of every float input and output; accumulation is fp32 (fp64 for kF64).
enum class CompositeDType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Features per sample the generic (F != 32) kernel instance takes; F = 32 (EG3D) has its own.
constexpr int kCompositeMaxF = 64;

// Samples of R rays. Dense layout (packed_info null): ray r holds samples [r * S, r * S + S).
// Packed layout: ray r holds samples [start, start + count) with (start, count) = packed_info[r];
// a ray whose range leaves [0, N) is treated as empty (the Python wrapper rejects such input).
struct CompositeProblem {
  CompositeDType dtype;
  const void* sigma;             // [N] contiguous, dtype
  const void* t;                 // [N] contiguous, dtype; sorted within each ray
  const void* feat;              // [N, F] contiguous, dtype
  const int64_t* packed_info;    // [R, 2] contiguous (first sample, count), or null (dense)
  int64_t N;                     // samples (dense: R * S)
  int64_t R;                     // rays
  int64_t S;                     // samples per ray, dense layout only
  int F;                         // features per sample, 1 <= F <= kCompositeMaxF
};

// out_feat: [R, F] = 2 C - 1, out_depth: [R] = Dnum / W (NaN where W == 0), out_wsum: [R] = W;
// contiguous, dtype. Every output is written for every ray.
cudaError_t composite_forward(const CompositeProblem& p, void* out_feat, void* out_depth, void* out_wsum,
                              cudaStream_t stream);

// Inputs (all required, contiguous, dtype): grad_feat [R, F], grad_depth [R], grad_wsum [R] and the
// forward's outputs saved_feat [R, F], saved_depth [R], saved_wsum [R].
// Outputs (dtype, contiguous; any may be null when not wanted): dsigma [N], dfeat [N, F], dt [N].
// Only samples inside a ray are written: in the packed layout the caller zero-fills the outputs.
cudaError_t composite_backward(const CompositeProblem& p, const void* grad_feat, const void* grad_depth,
                               const void* grad_wsum, const void* saved_feat, const void* saved_depth,
                               const void* saved_wsum, void* dsigma, void* dfeat, void* dt,
                               cudaStream_t stream);

// composite_weights: the per-sample weights omega_j = (w_{j-1} + w_j) / 2 of R dense rays of S
// samples each (feature image = 2 sum_j omega_j f_j - 1, summed by the caller).
struct WeightsProblem {
  CompositeDType dtype;
  const void* sigma;  // [R * S] contiguous, dtype
  const void* t;      // [R * S] contiguous, dtype; sorted within each ray
  int64_t R, S;
};

// omega: [R * S], depth: [R] = Dnum / W (NaN where W == 0), wsum: [R] = W; contiguous, dtype.
cudaError_t composite_weights_forward(const WeightsProblem& p, void* omega, void* depth, void* wsum,
                                      cudaStream_t stream);

// Inputs (all required, contiguous, dtype): grad_omega [R * S], grad_depth [R], grad_wsum [R] and the
// forward's outputs. Outputs (dtype, contiguous; either may be null): dsigma [R * S], dt [R * S].
cudaError_t composite_weights_backward(const WeightsProblem& p, const void* grad_omega, const void* grad_depth,
                                       const void* grad_wsum, const void* saved_omega, const void* saved_depth,
                                       const void* saved_wsum, void* dsigma, void* dt, cudaStream_t stream);

}  // namespace cuda
}  // namespace talk3d
