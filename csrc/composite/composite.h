// Torch-facing entry points of the fused compositing op (EG3D's MipRayMarcher2), shared by the CPU
// and CUDA back ends. Two layouts:
//   dense:  sigma [B, R, S, 1], feat [B, R, S, F], t [B, R, S, 1]      -> [B, R, F], [B, R, 1], [B, R, 1]
//   packed: sigma [N, 1], feat [N, F], t [N, 1], packed_info [R, 2]    -> [R, F], [R, 1], [R, 1]
// where packed_info[r] = (first sample, sample count) of ray r (nerfacc's chunk starts and counts).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace talk3d {

struct CompositeInputs {
  at::Tensor sigma, t;    // [N] contiguous
  at::Tensor feat;        // [N, F] contiguous
  at::Tensor packed_info; // [R, 2] int64 contiguous, or undefined for the dense layout
  int64_t R, S, F;        // S: samples per ray in the dense layout
  std::vector<int64_t> lead;  // leading output dims: {B, R} dense, {R} packed

};

// Validates shapes, dtypes and devices (ValueError/TypeError naming the argument) and flattens.
CompositeInputs prepare_composite_inputs(const at::Tensor& sigma, const at::Tensor& feat,
                                         const at::Tensor& t,
                                         const std::optional<at::Tensor>& packed_info);

// Output tensors of the forward for these inputs: feat [..., F], depth [..., 1], weight_sum [..., 1].
std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_outputs(const CompositeInputs& in);

using CompositeOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Per-ray tensors and gradient buffers of the backward, shared by every back end.
struct CompositeBackwardIO {
  at::Tensor gf, gd, gw;          // grads of feat [R, F], depth [R], weight_sum [R]: contiguous, sigma's dtype
  at::Tensor sf, sd, sw;          // the saved forward outputs, likewise
  at::Tensor dsigma, dfeat, dt;   // contiguous like the inputs; undefined where not needed; zeroed
                                  // in the packed layout (samples outside every ray are not visited)
  // (dsigma, dfeat, dt) with empty placeholders for the gradients not asked for.
  CompositeOut result(const at::Tensor& sigma, const at::Tensor& feat, const at::Tensor& t) const;
};

// Checks the gradients and saved outputs against `in` (device, element counts) and allocates the
// gradient buffers.
CompositeBackwardIO prepare_composite_backward(const CompositeInputs& in, const at::Tensor& grad_feat,
                                               const at::Tensor& grad_depth, const at::Tensor& grad_wsum,
                                               const at::Tensor& out_feat, const at::Tensor& out_depth,
                                               const at::Tensor& out_wsum, const at::Tensor& sigma,
                                               const at::Tensor& feat, const at::Tensor& t,
                                               std::array<bool, 3> needs);

CompositeOut composite_fwd_cpu(const at::Tensor& sigma, const at::Tensor& feat, const at::Tensor& t,
                               const std::optional<at::Tensor>& packed_info);

// Gradients for (sigma, feat, t); an entry whose `needs` is false is an empty tensor.
CompositeOut composite_bwd_cpu(const at::Tensor& grad_feat, const at::Tensor& grad_depth,
                               const at::Tensor& grad_wsum, const at::Tensor& sigma,
                               const at::Tensor& feat, const at::Tensor& t,
                               const std::optional<at::Tensor>& packed_info,
                               const at::Tensor& out_feat, const at::Tensor& out_depth,
                               const at::Tensor& out_wsum, std::array<bool, 3> needs);

// ---- composite_weights: per-sample weights omega_j = (w_{j-1} + w_j) / 2 instead of summed features.
//   sigma [B, R, S, 1], t [B, R, S, 1] sorted -> omega [B, R, S, 1], depth [B, R, 1], weight_sum [B, R, 1]
// (feature image = 2 sum_j omega_j f_j - 1, summed by the caller in any sample order).

struct WeightsInputs {
  at::Tensor sigma, t;        // [R * S] contiguous
  int64_t R, S;
  std::vector<int64_t> lead;  // {B, R}
};

WeightsInputs prepare_weights_inputs(const at::Tensor& sigma, const at::Tensor& t);

// Output tensors of the forward: omega [B, R, S, 1], depth [B, R, 1], weight_sum [B, R, 1].
CompositeOut weights_outputs(const WeightsInputs& in);

using WeightsGrads = std::tuple<at::Tensor, at::Tensor>;

// The backward's tensors, shared by every back end.
struct WeightsBackwardIO {
  at::Tensor go, gd, gw;  // grads of omega [R * S], depth [R], weight_sum [R]: contiguous, sigma's dtype
  at::Tensor so, sd, sw;  // the saved forward outputs, likewise
  at::Tensor dsigma, dt;  // [B, R, S, 1] contiguous; undefined where not needed
  // (dsigma, dt) with empty placeholders for the gradients not asked for.
  WeightsGrads result(const at::Tensor& sigma, const at::Tensor& t) const;
};

// Checks the gradients and saved outputs against `in` (device, element counts), brings them to
// sigma's dtype, contiguous, and allocates the gradient buffers asked for.
WeightsBackwardIO prepare_weights_backward(const WeightsInputs& in, const at::Tensor& sigma, const at::Tensor& t,
                                           const at::Tensor& grad_omega, const at::Tensor& grad_depth,
                                           const at::Tensor& grad_wsum, const at::Tensor& out_omega,
                                           const at::Tensor& out_depth, const at::Tensor& out_wsum,
                                           std::array<bool, 2> needs);

CompositeOut composite_weights_fwd_cpu(const at::Tensor& sigma, const at::Tensor& t);

// Gradients for (sigma, t); an entry whose `needs` is false is an empty tensor.
WeightsGrads composite_weights_bwd_cpu(const at::Tensor& grad_omega, const at::Tensor& grad_depth,
                                       const at::Tensor& grad_wsum, const at::Tensor& sigma, const at::Tensor& t,
                                       const at::Tensor& out_omega, const at::Tensor& out_depth,
                                       const at::Tensor& out_wsum, std::array<bool, 2> needs);

}  // namespace talk3d
