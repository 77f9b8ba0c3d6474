// Per-element math of bias_act, shared by the CPU and CUDA kernels: StyleGAN2's
// y = clamp(lrelu(x + b) * gain, -c, c), where lrelu has slope `slope` below zero (1: linear,
// 0: relu, 0.2: EG3D's leaky ReLU) and a negative c means no clamp.
//
// The backward reads the output y, not x: with gain > 0, y > 0 exactly when x + b > 0, and y lies
// strictly inside (-c, c) exactly when the clamp let the gradient through (up to the measure-zero
// case of landing on c exactly, which torch's clamp passes and this blocks). So the op saves
// nothing the network does not keep anyway: y is the next convolution's input.
#pragma once

#include "talk3d/common.h"

namespace talk3d {
namespace bias_act {

template <typename Acc>
T3D_HD Acc forward(Acc x, Acc b, Acc slope, Acc gain, Acc clamp) {
  Acc z = x + b;
  z = (z > Acc(0) ? z : z * slope) * gain;
  if (clamp >= Acc(0)) z = t3d_clamp(z, -clamp, clamp);
  return z;
}

// dL/dx (= the bias's gradient before summing) from dL/dy and the output y.
template <typename Acc>
T3D_HD Acc backward(Acc dy, Acc y, Acc slope, Acc gain, Acc clamp) {
  const Acc pass = (clamp < Acc(0) || (y < clamp && y > -clamp)) ? Acc(1) : Acc(0);
  return dy * pass * gain * (y > Acc(0) ? Acc(1) : slope);
}

}  // namespace bias_act
}  // namespace talk3d
