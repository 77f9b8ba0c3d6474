// Torch-facing entry points of binomial_filter2d, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

namespace talk3d {

// Checks x [N, C, H, W] (float32/float64/float16/bfloat16) and out_h, out_w >= 1, raising
// ValueError/TypeError naming the problem. `who` names the caller in the messages.
void check_binomial_filter_inputs(const char* who, const at::Tensor& x, int64_t out_h, int64_t out_w);

// y [N, C, out_h, out_w]: y[i, j] = gain * sum_{a, b < 4} k_a k_b x[i + a - top, j + b - left] with
// k = [1, 3, 3, 1] / 8 and x zero outside its H x W (top/left: the zero rows/columns padded before
// it; negative crops). Accumulates in float (double for double); y has x's dtype.
at::Tensor binomial_filter2d_cpu(const at::Tensor& x, int64_t top, int64_t left, int64_t out_h,
                                 int64_t out_w, double gain);

}  // namespace talk3d
