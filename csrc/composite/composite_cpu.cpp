// C++ CPU back end of the compositing op: a parallel loop over rays around composite_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "composite.h"
#include "talk3d/composite_math.h"

namespace talk3d {

namespace {

// Features per sample the CPU kernel keeps on the stack.
constexpr int kCpuMaxF = 256;
// Rays per parallel_for grain: a ray is ~S * F multiply-adds, so a few dozen make a task.
constexpr int64_t kRayGrain = 32;

// (first sample, count) of ray r.
inline void ray_range(const CompositeInputs& in, const int64_t* pinfo, int64_t r, int64_t& start,
                      int64_t& count) {
  if (pinfo) {
    start = pinfo[2 * r];
    count = pinfo[2 * r + 1];
  } else {
    start = r * in.S;
    count = in.S;
  }
}

template <typename scalar_t>
composite::RayView<scalar_t> ray_view(const CompositeInputs& in, int64_t start, int64_t count) {
  return {in.sigma.data_ptr<scalar_t>() + start, in.t.data_ptr<scalar_t>() + start,
          in.feat.data_ptr<scalar_t>() + start * in.F, count};
}

}  // namespace

CompositeOut composite_fwd_cpu(const at::Tensor& sigma, const at::Tensor& feat, const at::Tensor& t,
                               const std::optional<at::Tensor>& packed_info) {
  const CompositeInputs in = prepare_composite_inputs(sigma, feat, t, packed_info);
  TORCH_CHECK_TYPE(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == at::kDouble,
                   "composite (cpu): takes float32 or float64, got ", sigma.scalar_type());
  TORCH_CHECK_VALUE(in.F <= kCpuMaxF, "composite (cpu): at most ", kCpuMaxF, " features, got ", in.F);
  auto [out_feat, out_depth, out_wsum] = composite_outputs(in);
  const int64_t* pinfo = in.packed_info.defined() ? in.packed_info.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_fwd_cpu", [&] {
    scalar_t* of = out_feat.data_ptr<scalar_t>();
    scalar_t* od = out_depth.data_ptr<scalar_t>();
    scalar_t* ow = out_wsum.data_ptr<scalar_t>();
    const int F = static_cast<int>(in.F);
    at::parallel_for(0, in.R, kRayGrain, [&](int64_t begin, int64_t end) {
      scalar_t acc[kCpuMaxF];
      for (int64_t r = begin; r < end; ++r) {
        for (int c = 0; c < F; ++c) acc[c] = scalar_t(0);
        scalar_t wsum, dnum;
        int64_t start, count;
        ray_range(in, pinfo, r, start, count);
        composite::forward_ray<0, kCpuMaxF>(ray_view<scalar_t>(in, start, count), F, acc, wsum, dnum);
        for (int c = 0; c < F; ++c) of[r * F + c] = acc[c] * scalar_t(2) - scalar_t(1);
        od[r] = dnum / wsum;  // NaN for a ray with no weight, as the reference gives
        ow[r] = wsum;
      }
    });
  });
  return {out_feat, out_depth, out_wsum};
}

CompositeOut composite_bwd_cpu(const at::Tensor& grad_feat, const at::Tensor& grad_depth,
                               const at::Tensor& grad_wsum, const at::Tensor& sigma,
                               const at::Tensor& feat, const at::Tensor& t,
                               const std::optional<at::Tensor>& packed_info,
                               const at::Tensor& out_feat, const at::Tensor& out_depth,
                               const at::Tensor& out_wsum, std::array<bool, 3> needs) {
  const CompositeInputs in = prepare_composite_inputs(sigma, feat, t, packed_info);
  TORCH_CHECK_TYPE(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == at::kDouble,
                   "composite (cpu): takes float32 or float64, got ", sigma.scalar_type());
  TORCH_CHECK_VALUE(in.F <= kCpuMaxF, "composite (cpu): at most ", kCpuMaxF, " features, got ", in.F);
  CompositeBackwardIO io = prepare_composite_backward(in, grad_feat, grad_depth, grad_wsum, out_feat,
                                                      out_depth, out_wsum, sigma, feat, t, needs);
  at::Tensor &dsig = io.dsigma, &dfeat = io.dfeat, &dt = io.dt;
  const at::Tensor &gf = io.gf, &gd = io.gd, &gw = io.gw, &sf = io.sf, &sd = io.sd, &sw = io.sw;
  const bool packed = in.packed_info.defined();
  const int64_t* pinfo = packed ? in.packed_info.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_bwd_cpu", [&] {
    scalar_t* ds = dsig.defined() ? dsig.data_ptr<scalar_t>() : nullptr;
    scalar_t* df = dfeat.defined() ? dfeat.data_ptr<scalar_t>() : nullptr;
    scalar_t* dtp = dt.defined() ? dt.data_ptr<scalar_t>() : nullptr;
    const scalar_t *pgf = gf.data_ptr<scalar_t>(), *pgd = gd.data_ptr<scalar_t>(),
                   *pgw = gw.data_ptr<scalar_t>(), *psf = sf.data_ptr<scalar_t>(),
                   *psd = sd.data_ptr<scalar_t>(), *psw = sw.data_ptr<scalar_t>();
    const int F = static_cast<int>(in.F);
    at::parallel_for(0, in.R, kRayGrain, [&](int64_t begin, int64_t end) {
      scalar_t gC[kCpuMaxF];
      for (int64_t r = begin; r < end; ++r) {
        for (int c = 0; c < F; ++c) gC[c] = scalar_t(2) * pgf[r * F + c];
        const auto g = composite::fold_ray_grad<0, kCpuMaxF>(gC, psf + r * F, psd[r], psw[r],
                                                              pgd[r], pgw[r], F);
        int64_t start, count;
        ray_range(in, pinfo, r, start, count);
        composite::backward_ray<0, kCpuMaxF>(ray_view<scalar_t>(in, start, count), F, gC, g,
                                             ds ? ds + start : nullptr, dtp ? dtp + start : nullptr,
                                             df ? df + start * F : nullptr);
      }
    });
  });
  return io.result(sigma, feat, t);
}

namespace {

void check_cpu_weights_dtype(const at::Tensor& sigma) {
  TORCH_CHECK_TYPE(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == at::kDouble,
                   "composite_weights (cpu): takes float32 or float64, got ", sigma.scalar_type());
}

// A ray is ~S scalar steps with no feature work: larger grains than the feature op's.
constexpr int64_t kWeightsRayGrain = 8 * kRayGrain;

}  // namespace

CompositeOut composite_weights_fwd_cpu(const at::Tensor& sigma, const at::Tensor& t) {
  const WeightsInputs in = prepare_weights_inputs(sigma, t);
  check_cpu_weights_dtype(sigma);
  auto [omega, depth, wsum] = weights_outputs(in);
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_weights_fwd_cpu", [&] {
    const scalar_t *ps = in.sigma.data_ptr<scalar_t>(), *pt = in.t.data_ptr<scalar_t>();
    scalar_t *po = omega.data_ptr<scalar_t>(), *od = depth.data_ptr<scalar_t>(), *ow = wsum.data_ptr<scalar_t>();
    const int64_t S = in.S;
    at::parallel_for(0, in.R, kWeightsRayGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t w, dnum;
        composite::weights_forward_ray(ps + r * S, pt + r * S, S, po + r * S, w, dnum);
        od[r] = dnum / w;  // NaN for a ray with no weight, as the reference gives
        ow[r] = w;
      }
    });
  });
  return {omega, depth, wsum};
}

WeightsGrads composite_weights_bwd_cpu(const at::Tensor& grad_omega, const at::Tensor& grad_depth,
                                       const at::Tensor& grad_wsum, const at::Tensor& sigma, const at::Tensor& t,
                                       const at::Tensor& out_omega, const at::Tensor& out_depth,
                                       const at::Tensor& out_wsum, std::array<bool, 2> needs) {
  const WeightsInputs in = prepare_weights_inputs(sigma, t);
  check_cpu_weights_dtype(sigma);
  const WeightsBackwardIO io = prepare_weights_backward(in, sigma, t, grad_omega, grad_depth, grad_wsum, out_omega,
                                                        out_depth, out_wsum, needs);
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "composite_weights_bwd_cpu", [&] {
    const scalar_t *ps = in.sigma.data_ptr<scalar_t>(), *pt = in.t.data_ptr<scalar_t>();
    const scalar_t *pgo = io.go.data_ptr<scalar_t>(), *pgd = io.gd.data_ptr<scalar_t>(),
                   *pgw = io.gw.data_ptr<scalar_t>(), *pso = io.so.data_ptr<scalar_t>(),
                   *psd = io.sd.data_ptr<scalar_t>(), *psw = io.sw.data_ptr<scalar_t>();
    scalar_t* ds = io.dsigma.defined() ? io.dsigma.data_ptr<scalar_t>() : nullptr;
    scalar_t* dtp = io.dt.defined() ? io.dt.data_ptr<scalar_t>() : nullptr;
    const int64_t S = in.S;
    at::parallel_for(0, in.R, kWeightsRayGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto g = composite::fold_weights_grad(pso + r * S, pgo + r * S, S, psd[r], psw[r], pgd[r], pgw[r]);
        composite::weights_backward_ray(ps + r * S, pt + r * S, S, pgo + r * S, g, ds ? ds + r * S : nullptr,
                                        dtp ? dtp + r * S : nullptr);
      }
    });
  });
  return io.result(sigma, t);
}

}  // namespace talk3d
