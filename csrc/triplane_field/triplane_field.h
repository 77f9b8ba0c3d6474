// Torch-facing entry points of the fused triplane field op, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "talk3d/triplane_field_math.h"

namespace talk3d {

// Inputs checked and laid out for the kernels.
struct FieldInputs {
  at::Tensor planes_cl;  // [B, 3, H, W, C] view with channel stride 1 (no copy when possible)
  at::Tensor xyz;        // [B, N, 3] contiguous
  at::Tensor w1, b1, w2, b2;  // contiguous: [HID, C], [HID], [OUT, HID], [OUT]
  int64_t B, N, H, W, C, HID, OUT;
  double box_warp;
  int axes;
};

// Validates the inputs (shapes, dtypes, devices; raising ValueError/TypeError naming the argument)
// and returns them in kernel layout, planes copied channels-last when planes_copied(planes). Shared
// by every back end so they all accept the same inputs.
FieldInputs prepare_field_inputs(const at::Tensor& planes, const at::Tensor& xyz,
                                 const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, double box_warp, int64_t axes);

// Whether prepare_field_inputs copies these [B, 3, C, H, W] planes to make them channels-last (their
// channels are not contiguous in memory: the API layout, or other strides), rather than viewing them.
bool planes_copied(const at::Tensor& planes);

// Geometry of planes_cl (element strides of one batch element) for the per-point math.
field::PlaneGeom plane_geom(const at::Tensor& planes_cl);

// Gradient outputs of the backward; empty placeholders (grad_placeholder) for what was not asked for.
using FieldGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> triplane_field_fwd_cpu(const at::Tensor& planes,
                                                          const at::Tensor& xyz,
                                                          const at::Tensor& w1,
                                                          const at::Tensor& b1,
                                                          const at::Tensor& w2,
                                                          const at::Tensor& b2, double box_warp,
                                                          int64_t axes);

FieldGrads triplane_field_bwd_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                                  const at::Tensor& planes, const at::Tensor& xyz,
                                  const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, double box_warp, int64_t axes,
                                  std::array<bool, 6> needs);

// The training forward of the CPU back end: also returns saved [B, N, C + HID], each point's decoder
// input f and pre-activations, which triplane_field_bwd_saved_cpu reads instead of recomputing them,
// and planes_cl [B, 3, H, W, C], the channels-last copy of planes that are not channels-last in
// memory (empty otherwise), which the backward reads instead of copying them again.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplane_field_fwd_train_cpu(
    const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double box_warp, int64_t axes);

FieldGrads triplane_field_bwd_saved_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                                        const at::Tensor& planes, const at::Tensor& xyz,
                                        const at::Tensor& w1, const at::Tensor& b1,
                                        const at::Tensor& w2, const at::Tensor& b2,
                                        const at::Tensor& saved, const at::Tensor& feat,
                                        const at::Tensor& planes_cl, double box_warp, int64_t axes,
                                        std::array<bool, 6> needs);

// Empty placeholders stand for gradients that were not asked for (a custom op returns tensors).
at::Tensor grad_placeholder(const at::Tensor& like);

}  // namespace talk3d
