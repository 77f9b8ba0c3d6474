// Torch-facing entry points of bias_act (StyleGAN2's fused bias + leaky ReLU + gain + clamp), shared by
// the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

namespace talk3d {

// Checks x [N, C, ...] (float32/float64/float16/bfloat16), b [C] or undefined (float32, float64 for
// float64 x, on x's device), gain > 0, raising ValueError/TypeError naming the problem. `who` names the
// caller in the messages.
void check_bias_act_inputs(const char* who, const at::Tensor& x, const c10::optional<at::Tensor>& b, double gain);

// x itself when dense in its layout (contiguous, or 4-D channels-last), else a contiguous copy.
at::Tensor bias_act_dense(const at::Tensor& x);

// The backward's operands, checked (`who` names the caller): y dense (bias_act_dense) and the
// gradient in y's layout, so the two are walked element by element.
struct BiasActBackwardOperands {
  at::Tensor y, grad;
};
BiasActBackwardOperands bias_act_backward_operands(const char* who, const at::Tensor& grad, const at::Tensor& y,
                                                   double gain);

// The channel layout of a dense x: element i is channel (i / inner) % C.
struct BiasActLayout {
  int64_t C, inner;
};
BiasActLayout bias_act_layout(const at::Tensor& dense);

// y = clamp(lrelu_slope(x + b) * gain, -clamp, clamp) (clamp < 0: none), b broadcast along dim 1;
// y in x's dtype and layout, computed in float (double for double).
at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& b, double slope, double gain,
                            double clamp);

// dL/dx from dL/dy and the forward's output y (see talk3d/bias_act_math.h); in y's dtype and layout.
at::Tensor bias_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& y, double slope, double gain, double clamp);

}  // namespace talk3d
