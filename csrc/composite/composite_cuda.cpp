// CUDA implementation of the compositing op: validates, allocates, and calls the torch-free
// launchers in kernels/composite. Compiled only when the installed torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "composite.h"
#include "composite/composite_cuda.h"
#include "triplane_field/triplane_field.h"  // grad_placeholder

namespace talk3d {

namespace {

cuda::CompositeDType storage_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::CompositeDType::kF32;
    case at::kHalf: return cuda::CompositeDType::kF16;
    case at::kBFloat16: return cuda::CompositeDType::kBF16;
    case at::kDouble: return cuda::CompositeDType::kF64;
    default: TORCH_CHECK_TYPE(false, "composite (cuda): unsupported dtype ", t);
  }
}

cuda::CompositeProblem make_problem(const CompositeInputs& in) {
  TORCH_CHECK_VALUE(in.sigma.is_cuda(), "composite (cuda): inputs must be on a CUDA device");
  TORCH_CHECK_VALUE(in.F >= 1 && in.F <= cuda::kCompositeMaxF, "composite (cuda): F must be in [1, ",
                    cuda::kCompositeMaxF, "], got ", in.F);
  cuda::CompositeProblem p;
  p.dtype = storage_dtype(in.sigma.scalar_type());
  p.sigma = in.sigma.data_ptr();
  p.t = in.t.data_ptr();
  p.feat = in.feat.data_ptr();
  // packed_info on another device is rejected by prepare_composite_inputs.
  p.packed_info = in.packed_info.defined() ? in.packed_info.data_ptr<int64_t>() : nullptr;
  p.N = in.sigma.numel();
  p.R = in.R;
  p.S = in.S;
  p.F = static_cast<int>(in.F);
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "composite (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

CompositeOut fwd_cuda(const at::Tensor& sigma, const at::Tensor& feat, const at::Tensor& t,
                      const std::optional<at::Tensor>& packed_info) {
  const CompositeInputs in = prepare_composite_inputs(sigma, feat, t, packed_info);
  const c10::cuda::CUDAGuard guard(sigma.device());
  const cuda::CompositeProblem p = make_problem(in);
  auto [out_feat, out_depth, out_wsum] = composite_outputs(in);
  if (in.R > 0) {
    check_launch(cuda::composite_forward(p, out_feat.data_ptr(), out_depth.data_ptr(), out_wsum.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()),
                 "forward");
  }
  return {out_feat, out_depth, out_wsum};
}

CompositeOut bwd_cuda(const at::Tensor& grad_feat, const at::Tensor& grad_depth, const at::Tensor& grad_wsum,
                      const at::Tensor& sigma, const at::Tensor& feat, const at::Tensor& t,
                      const std::optional<at::Tensor>& packed_info, const at::Tensor& out_feat,
                      const at::Tensor& out_depth, const at::Tensor& out_wsum, std::array<bool, 3> needs) {
  const CompositeInputs in = prepare_composite_inputs(sigma, feat, t, packed_info);
  const c10::cuda::CUDAGuard guard(sigma.device());
  const cuda::CompositeProblem p = make_problem(in);
  // The kernel reads every per-ray tensor in the storage dtype, contiguous, on sigma's device.
  CompositeBackwardIO io = prepare_composite_backward(in, grad_feat, grad_depth, grad_wsum, out_feat,
                                                      out_depth, out_wsum, sigma, feat, t, needs);
  const at::Tensor &gf = io.gf, &gd = io.gd, &gw = io.gw, &sf = io.sf, &sd = io.sd, &sw = io.sw;
  auto ptr = [](at::Tensor& x) { return x.defined() ? x.data_ptr() : nullptr; };
  if (in.R > 0) {
    check_launch(cuda::composite_backward(p, gf.data_ptr(), gd.data_ptr(), gw.data_ptr(), sf.data_ptr(),
                                          sd.data_ptr(), sw.data_ptr(), ptr(io.dsigma), ptr(io.dfeat), ptr(io.dt),
                                          c10::cuda::getCurrentCUDAStream()),
                 "backward");
  }
  return io.result(sigma, feat, t);
}

cuda::WeightsProblem make_weights_problem(const WeightsInputs& in) {
  TORCH_CHECK_VALUE(in.sigma.is_cuda(), "composite_weights (cuda): inputs must be on a CUDA device");
  return {storage_dtype(in.sigma.scalar_type()), in.sigma.data_ptr(), in.t.data_ptr(), in.R, in.S};
}

CompositeOut weights_fwd_cuda(const at::Tensor& sigma, const at::Tensor& t) {
  const WeightsInputs in = prepare_weights_inputs(sigma, t);
  const c10::cuda::CUDAGuard guard(sigma.device());
  const cuda::WeightsProblem p = make_weights_problem(in);
  auto [omega, depth, wsum] = weights_outputs(in);
  check_launch(cuda::composite_weights_forward(p, omega.data_ptr(), depth.data_ptr(), wsum.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream()),
               "weights forward");
  return {omega, depth, wsum};
}

WeightsGrads weights_bwd_cuda(const at::Tensor& grad_omega, const at::Tensor& grad_depth, const at::Tensor& grad_wsum,
                              const at::Tensor& sigma, const at::Tensor& t, const at::Tensor& out_omega,
                              const at::Tensor& out_depth, const at::Tensor& out_wsum, std::array<bool, 2> needs) {
  const WeightsInputs in = prepare_weights_inputs(sigma, t);
  const c10::cuda::CUDAGuard guard(sigma.device());
  const cuda::WeightsProblem p = make_weights_problem(in);
  WeightsBackwardIO io = prepare_weights_backward(in, sigma, t, grad_omega, grad_depth, grad_wsum, out_omega,
                                                  out_depth, out_wsum, needs);
  auto ptr = [](at::Tensor& x) { return x.defined() ? x.data_ptr() : nullptr; };
  check_launch(cuda::composite_weights_backward(p, io.go.data_ptr(), io.gd.data_ptr(), io.gw.data_ptr(),
                                                io.so.data_ptr(), io.sd.data_ptr(), io.sw.data_ptr(),
                                                ptr(io.dsigma), ptr(io.dt), c10::cuda::getCurrentCUDAStream()),
               "weights backward");
  return io.result(sigma, t);
}

}  // namespace

TORCH_LIBRARY_IMPL(talk3d, CUDA, m) {
  m.impl("composite_fwd", &fwd_cuda);
  m.impl("composite_bwd", &bwd_cuda);
  m.impl("composite_weights_fwd", &weights_fwd_cuda);
  m.impl("composite_weights_bwd", &weights_bwd_cuda);
}

}  // namespace talk3d
