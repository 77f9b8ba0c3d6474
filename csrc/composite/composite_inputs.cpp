// Input validation and layout shared by the CPU and CUDA back ends of the compositing op.
#include <c10/util/Exception.h>

#include "composite.h"
#include "triplane_field/triplane_field.h"  // grad_placeholder

namespace talk3d {

namespace {

void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "composite: ", name, " has dtype ",
                   t.scalar_type(), " but sigma has ", ref.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "composite: ", name, " is on ", t.device(),
                    " but sigma is on ", ref.device());
}

}  // namespace

CompositeInputs prepare_composite_inputs(const at::Tensor& sigma, const at::Tensor& feat,
                                         const at::Tensor& t,
                                         const std::optional<at::Tensor>& packed_info) {
  const auto st = sigma.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "composite: sigma dtype ", st, " is not supported");
  check_same(feat, sigma, "feat");
  check_same(t, sigma, "t");
  CompositeInputs in;
  const bool packed = packed_info.has_value() && packed_info->defined();
  if (packed) {
    const at::Tensor& pi = *packed_info;
    TORCH_CHECK_VALUE(sigma.dim() == 2 && sigma.size(1) == 1, "composite: packed sigma must be [N, 1], got ",
                      sigma.sizes());
    TORCH_CHECK_VALUE(feat.dim() == 2 && feat.size(0) == sigma.size(0), "composite: packed feat must be [N=",
                      sigma.size(0), ", F], got ", feat.sizes());
    TORCH_CHECK_VALUE(t.sizes() == sigma.sizes(), "composite: packed t must be [N, 1] like sigma, got ",
                      t.sizes());
    TORCH_CHECK_VALUE(pi.dim() == 2 && pi.size(1) == 2, "composite: packed_info must be [R, 2], got ",
                      pi.sizes());
    TORCH_CHECK_TYPE(pi.scalar_type() == at::kLong, "composite: packed_info must be int64, got ",
                     pi.scalar_type());
    TORCH_CHECK_VALUE(pi.device() == sigma.device(), "composite: packed_info is on ", pi.device(),
                      " but sigma is on ", sigma.device());
    in.packed_info = pi.contiguous();
    in.R = pi.size(0);
    in.S = 0;
    in.lead = {in.R};
    if (pi.is_cpu() && in.R > 0) {
      // Rays must address samples inside [0, N): checked here for CPU tensors (a GPU check would
      // synchronise; the Python wrapper checks CUDA inputs).
      const int64_t* p = in.packed_info.data_ptr<int64_t>();
      const int64_t N = sigma.size(0);
      for (int64_t r = 0; r < in.R; ++r)
        TORCH_CHECK_VALUE(p[2 * r] >= 0 && p[2 * r + 1] >= 0 && p[2 * r] + p[2 * r + 1] <= N,
                          "composite: packed_info[", r, "] = (", p[2 * r], ", ", p[2 * r + 1],
                          ") addresses samples outside [0, ", N, ")");
    }
  } else {
    TORCH_CHECK_VALUE(sigma.dim() == 4 && sigma.size(3) == 1, "composite: sigma must be [B, R, S, 1], got ",
                      sigma.sizes());
    TORCH_CHECK_VALUE(feat.dim() == 4 && feat.sizes().slice(0, 3) == sigma.sizes().slice(0, 3),
                      "composite: feat must be [B, R, S, F] matching sigma ", sigma.sizes(), ", got ",
                      feat.sizes());
    TORCH_CHECK_VALUE(t.sizes() == sigma.sizes(), "composite: t must be [B, R, S, 1] like sigma, got ",
                      t.sizes());
    in.R = sigma.size(0) * sigma.size(1);
    in.S = sigma.size(2);
    in.lead = {sigma.size(0), sigma.size(1)};
  }
  in.F = feat.size(-1);
  in.sigma = sigma.contiguous().view({-1});
  in.t = t.contiguous().view({-1});
  in.feat = feat.contiguous().view({-1, in.F});
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_outputs(const CompositeInputs& in) {
  std::vector<int64_t> fshape = in.lead, oshape = in.lead;
  fshape.push_back(in.F);
  oshape.push_back(1);
  const auto opts = in.sigma.options();
  return {at::empty(fshape, opts), at::empty(oshape, opts), at::empty(oshape, opts)};
}

CompositeBackwardIO prepare_composite_backward(const CompositeInputs& in, const at::Tensor& grad_feat,
                                               const at::Tensor& grad_depth, const at::Tensor& grad_wsum,
                                               const at::Tensor& out_feat, const at::Tensor& out_depth,
                                               const at::Tensor& out_wsum, const at::Tensor& sigma,
                                               const at::Tensor& feat, const at::Tensor& t,
                                               std::array<bool, 3> needs) {
  const auto dtype = sigma.scalar_type();
  auto per_ray = [&](const at::Tensor& x, const char* name, int64_t numel) {
    TORCH_CHECK_VALUE(x.device() == sigma.device(), "composite_bwd: ", name, " is on ", x.device(),
                      " but sigma is on ", sigma.device());
    TORCH_CHECK_VALUE(x.numel() == numel, "composite_bwd: ", name, " has ", x.numel(),
                      " elements, expected ", numel, " (the forward output's shape)");
    return x.to(dtype).contiguous();
  };
  CompositeBackwardIO io;
  io.gf = per_ray(grad_feat, "grad_feat", in.R * in.F);
  io.gd = per_ray(grad_depth, "grad_depth", in.R);
  io.gw = per_ray(grad_wsum, "grad_weight_sum", in.R);
  io.sf = per_ray(out_feat, "out_feat", in.R * in.F);
  io.sd = per_ray(out_depth, "out_depth", in.R);
  io.sw = per_ray(out_wsum, "out_weight_sum", in.R);
  const auto opts = in.sigma.options();
  const bool packed = in.packed_info.defined();
  auto alloc = [&](bool need, at::IntArrayRef shape) {
    if (!need) return at::Tensor();
    return packed ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  io.dsigma = alloc(needs[0], sigma.sizes());
  io.dfeat = alloc(needs[1], feat.sizes());
  io.dt = alloc(needs[2], t.sizes());
  return io;
}

CompositeOut CompositeBackwardIO::result(const at::Tensor& sigma, const at::Tensor& feat,
                                         const at::Tensor& t) const {
  auto out = [](const at::Tensor& g, const at::Tensor& like) {
    return g.defined() ? g : grad_placeholder(like);
  };
  return {out(dsigma, sigma), out(dfeat, feat), out(dt, t)};
}

WeightsInputs prepare_weights_inputs(const at::Tensor& sigma, const at::Tensor& t) {
  const auto st = sigma.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   "composite_weights: sigma dtype ", st, " is not supported");
  TORCH_CHECK_TYPE(t.scalar_type() == st, "composite_weights: t has dtype ", t.scalar_type(),
                   " but sigma has ", st, "; they must match");
  TORCH_CHECK_VALUE(t.device() == sigma.device(), "composite_weights: t is on ", t.device(),
                    " but sigma is on ", sigma.device());
  TORCH_CHECK_VALUE(sigma.dim() == 4 && sigma.size(3) == 1,
                    "composite_weights: sigma must be [B, R, S, 1], got ", sigma.sizes());
  TORCH_CHECK_VALUE(t.sizes() == sigma.sizes(), "composite_weights: t must be [B, R, S, 1] like sigma, got ",
                    t.sizes());
  WeightsInputs in;
  in.R = sigma.size(0) * sigma.size(1);
  in.S = sigma.size(2);
  in.lead = {sigma.size(0), sigma.size(1)};
  in.sigma = sigma.contiguous().view({-1});
  in.t = t.contiguous().view({-1});
  return in;
}

CompositeOut weights_outputs(const WeightsInputs& in) {
  const auto opts = in.sigma.options();
  at::Tensor depth = at::empty({in.lead[0], in.lead[1], 1}, opts);
  return {at::empty({in.lead[0], in.lead[1], in.S, 1}, opts), depth, at::empty_like(depth)};
}

WeightsBackwardIO prepare_weights_backward(const WeightsInputs& in, const at::Tensor& sigma, const at::Tensor& t,
                                           const at::Tensor& grad_omega, const at::Tensor& grad_depth,
                                           const at::Tensor& grad_wsum, const at::Tensor& out_omega,
                                           const at::Tensor& out_depth, const at::Tensor& out_wsum,
                                           std::array<bool, 2> needs) {
  auto take = [&](const at::Tensor& x, const char* name, int64_t numel) {
    TORCH_CHECK_VALUE(x.device() == sigma.device(), "composite_weights_bwd: ", name, " is on ", x.device(),
                      " but sigma is on ", sigma.device());
    TORCH_CHECK_VALUE(x.numel() == numel, "composite_weights_bwd: ", name, " has ", x.numel(),
                      " elements, expected ", numel, " (the forward output's shape)");
    return x.to(sigma.scalar_type()).contiguous();
  };
  const int64_t N = in.R * in.S;
  WeightsBackwardIO io;
  io.go = take(grad_omega, "grad_omega", N);
  io.gd = take(grad_depth, "grad_depth", in.R);
  io.gw = take(grad_wsum, "grad_weight_sum", in.R);
  io.so = take(out_omega, "out_omega", N);
  io.sd = take(out_depth, "out_depth", in.R);
  io.sw = take(out_wsum, "out_weight_sum", in.R);
  const auto opts = in.sigma.options();
  if (needs[0]) io.dsigma = at::empty(sigma.sizes(), opts);
  if (needs[1]) io.dt = at::empty(t.sizes(), opts);
  return io;
}

WeightsGrads WeightsBackwardIO::result(const at::Tensor& sigma, const at::Tensor& t) const {
  return {dsigma.defined() ? dsigma : grad_placeholder(sigma), dt.defined() ? dt : grad_placeholder(t)};
}

}  // namespace talk3d
