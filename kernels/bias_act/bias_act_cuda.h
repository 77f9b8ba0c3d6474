// Launchers of the bias_act CUDA kernels. Torch-free like the other kernels;
// csrc/bias_act/bias_act_cuda.cpp is the torch-facing adapter.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Storage type of x, y and the gradients (float accumulation, double for kF64). The bias is float
// (double for kF64).
enum class BiasActDType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// Dense tensors of n elements with C channels: element i is channel (i / inner) % C (NCHW and any
// other contiguous [N, C, ...]: inner = the product of the dims after C) or i % C (channels-last:
// inner = 1).
struct BiasActProblem {
  BiasActDType dtype;
  int64_t n, C, inner;
  double slope, gain, clamp;  // clamp < 0: none
};

// y = clamp(lrelu(x + b) * gain); b may be null (no bias).
cudaError_t bias_act_forward(const BiasActProblem& p, const void* x, const void* b, void* y, cudaStream_t stream);

// dx from dy and the forward's y.
cudaError_t bias_act_backward(const BiasActProblem& p, const void* dy, const void* y, void* dx, cudaStream_t stream);

}  // namespace cuda
}  // namespace talk3d
