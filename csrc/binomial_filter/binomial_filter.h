// Torch-facing entry points of binomial_filter2d, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

namespace talk3d {

// Checks x [N, C, H, W] (float32/float64/float16/bfloat16) and out_h, out_w >= 1, raising
// ValueError/TypeError naming the problem. `who` names the caller in the messages.
void check_binomial_filter_inputs(const char* who, const at::Tensor& x, int64_t out_h, int64_t out_w);

// x itself when dense in NCHW or NHWC (channels-last) memory, else an NCHW copy.
at::Tensor binomial_filter_dense_input(const at::Tensor& x);

// An empty [N, C, out_h, out_w] output in src's layout (NHWC when src is channels-last and not also
// NCHW-contiguous, which a tensor with C == 1 or H == W == 1 is).
at::Tensor binomial_filter_output(const at::Tensor& src, int64_t out_h, int64_t out_w);

// Whether the filter reads src (dense, from binomial_filter_dense_input) as NHWC.
bool binomial_filter_nhwc(const at::Tensor& src);

// y [N, C, out_h, out_w] in x's layout (see above): y[i, j] = gain * sum_{a, b < 4} k_a k_b x[i + a - top, j + b - left] with
// k = [1, 3, 3, 1] / 8 and x zero outside its H x W (top/left: the zero rows/columns padded before
// it; negative crops). Accumulates in float (double for double); y has x's dtype.
at::Tensor binomial_filter2d_cpu(const at::Tensor& x, int64_t top, int64_t left, int64_t out_h,
                                 int64_t out_w, double gain);

}  // namespace talk3d
