// Operator schemas of the talk3d library, their CPU implementations, and the Python module.
// CUDA implementations register themselves in csrc/*/..._cuda.cpp (compiled only with CUDA torch).
#include <torch/library.h>
#include <torch/extension.h>

#include "bias_act/bias_act.h"
#include "binomial_filter/binomial_filter.h"
#include "composite/composite.h"
#include "layout/layout.h"
#include "occupancy/occupancy.h"
#include "triplane_field/triplane_field.h"

TORCH_LIBRARY(talk3d, m) {
  // planes [B, 3, C, H, W], xyz [B, N, 3], w1 [HID, C], b1 [HID], w2 [1+F, HID], b2 [1+F]
  //   -> sigma [B, N, 1], feat [B, N, F]. axes: 0 = fixed, 1 = eg3d.
  m.def(
      "triplane_field_fwd(Tensor planes, Tensor xyz, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "float box_warp, int axes) -> (Tensor, Tensor)");
  // Gradients for (planes, xyz, w1, b1, w2, b2); an entry whose `needs` is false is an empty tensor.
  m.def(
      "triplane_field_bwd(Tensor grad_sigma, Tensor grad_feat, Tensor planes, Tensor xyz, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, float box_warp, int axes, bool[6] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The CPU back end's training pair: the forward also returns saved [B, N, C + HID] (each point's
  // decoder input and pre-activations), which the backward reads with the feature output instead of
  // sampling and decoding every point again.
  // Planes that are not channels-last in memory (the API's contiguous [B, 3, C, H, W]) are
  // copied channels-last inside; the forward returns that copy as planes_cl (an empty tensor when
  // the planes were channels-last already) for the backward, whose plane gradient then has the
  // planes' own layout (channels-last memory viewed [B, 3, C, H, W], or contiguous).
  m.def(
      "triplane_field_fwd_train(Tensor planes, Tensor xyz, Tensor w1, Tensor b1, Tensor w2, "
      "Tensor b2, float box_warp, int axes) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "triplane_field_bwd_saved(Tensor grad_sigma, Tensor grad_feat, Tensor planes, Tensor xyz, "
      "Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor saved, Tensor feat, Tensor planes_cl, "
      "float box_warp, int axes, bool[6] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Dense: sigma [B, R, S, 1], feat [B, R, S, F], t [B, R, S, 1] -> [B, R, F], [B, R, 1], [B, R, 1].
  // Packed (packed_info [R, 2] = first sample, count): [N, 1], [N, F], [N, 1] -> [R, F], [R, 1], [R, 1].
  // Outputs: feature image 2 C - 1, depth Dnum / W (NaN where W == 0), weight sum W.
  m.def(
      "composite_fwd(Tensor sigma, Tensor feat, Tensor t, Tensor? packed_info) "
      "-> (Tensor, Tensor, Tensor)");
  // Gradients for (sigma, feat, t), recomputed from the inputs and the saved outputs.
  m.def(
      "composite_bwd(Tensor grad_feat, Tensor grad_depth, Tensor grad_weight_sum, Tensor sigma, "
      "Tensor feat, Tensor t, Tensor? packed_info, Tensor out_feat, Tensor out_depth, "
      "Tensor out_weight_sum, bool[3] needs) -> (Tensor, Tensor, Tensor)");
  // sigma [B, R, S, 1], t [B, R, S, 1] sorted -> omega [B, R, S, 1] (each sample's weight in the
  // feature sum: feature image = 2 sum_j omega_j f_j - 1), depth [B, R, 1], weight sum [B, R, 1].
  m.def("composite_weights_fwd(Tensor sigma, Tensor t) -> (Tensor, Tensor, Tensor)");
  m.def(
      "composite_weights_bwd(Tensor grad_omega, Tensor grad_depth, Tensor grad_weight_sum, Tensor sigma, "
      "Tensor t, Tensor out_omega, Tensor out_depth, Tensor out_weight_sum, bool[2] needs) -> (Tensor, Tensor)");
  // origins [B, R, 3], dirs [B, R, 3], t [B, R, S] sorted, bits uint8 [ceil(res^3 / 8)]
  //   -> int32 [B, R, 2]: first and last interval [t_i, t_{i+1}] through occupied space, or -1.
  m.def(
      "occupied_intervals(Tensor origins, Tensor dirs, Tensor t, Tensor bits, int res, float box, "
      "bool outside_occupied) -> Tensor");
  // x [M, A, B] -> [M, B, A] contiguous (the planes' channels-last conversion and its gradient).
  m.def("transpose_inner(Tensor x) -> Tensor");
  // x [N, C, H, W] -> [N, C, out_h, out_w]: EG3D's 4 x 4 binomial FIR (outer product of [1, 3, 3, 1] / 8)
  // times gain, the window of output (i, j) starting at x[i - top, j - left], zero outside x.
  m.def("binomial_filter2d(Tensor x, int top, int left, int out_h, int out_w, float gain) -> Tensor");
  // x [N, C, ...], b [C] or None -> clamp(lrelu_slope(x + b) * gain, -clamp, clamp) (clamp < 0: none),
  // in x's dtype and layout; the backward takes the output y (gain > 0).
  m.def("bias_act_fwd(Tensor x, Tensor? b, float slope, float gain, float clamp) -> Tensor");
  m.def("bias_act_bwd(Tensor grad, Tensor y, float slope, float gain, float clamp) -> Tensor");
}

TORCH_LIBRARY_IMPL(talk3d, CPU, m) {
  m.impl("triplane_field_fwd", &talk3d::triplane_field_fwd_cpu);
  m.impl("triplane_field_bwd", &talk3d::triplane_field_bwd_cpu);
  m.impl("triplane_field_fwd_train", &talk3d::triplane_field_fwd_train_cpu);
  m.impl("triplane_field_bwd_saved", &talk3d::triplane_field_bwd_saved_cpu);
  m.impl("composite_fwd", &talk3d::composite_fwd_cpu);
  m.impl("composite_bwd", &talk3d::composite_bwd_cpu);
  m.impl("composite_weights_fwd", &talk3d::composite_weights_fwd_cpu);
  m.impl("composite_weights_bwd", &talk3d::composite_weights_bwd_cpu);
  m.impl("occupied_intervals", &talk3d::occupied_intervals_cpu);
  m.impl("transpose_inner", &talk3d::transpose_inner_cpu);
  m.impl("binomial_filter2d", &talk3d::binomial_filter2d_cpu);
  m.impl("bias_act_fwd", &talk3d::bias_act_fwd_cpu);
  m.impl("bias_act_bwd", &talk3d::bias_act_bwd_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "talk3d compiled kernels; the ops live in torch.ops.talk3d";
#ifdef TALK3D_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
