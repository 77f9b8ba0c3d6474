// Launcher of the binomial_filter2d CUDA kernel. Torch-free like the other kernels;
// csrc/binomial_filter/binomial_filter_cuda.cpp is the torch-facing adapter.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace talk3d {
namespace cuda {

// Storage type of x and y (float accumulation, double for kF64).
enum class FirDType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// x [N, C, H, W] -> y [N, C, out_h, out_w], each channel plane filtered:
// y[i, j] = gain * sum_{a, b < 4} k_a k_b x[i + a - top, j + b - left], k = [1, 3, 3, 1] / 8, x zero
// outside its H x W. Both dense in one layout: NCHW (`channels_last` false) or NHWC (true: memory
// [N, H, W, C], the convolutions' preferred layout on tensor cores).
struct FirProblem {
  FirDType dtype;
  const void* x;
  void* y;
  int64_t N, C, H, W, out_h, out_w, top, left;
  bool channels_last;
  double gain;
};

cudaError_t binomial_filter2d(const FirProblem& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace talk3d
