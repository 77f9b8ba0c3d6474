// CUDA implementation of bias_act: validates, allocates, and calls the torch-free launchers in
// kernels/bias_act. Compiled only when the installed torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bias_act.h"
#include "bias_act/bias_act_cuda.h"

namespace talk3d {

namespace {

cuda::BiasActProblem problem(const at::Tensor& dense, double slope, double gain, double clamp) {
  cuda::BiasActProblem p;
  switch (dense.scalar_type()) {
    case at::kHalf:
      p.dtype = cuda::BiasActDType::kF16;
      break;
    case at::kBFloat16:
      p.dtype = cuda::BiasActDType::kBF16;
      break;
    case at::kDouble:
      p.dtype = cuda::BiasActDType::kF64;
      break;
    default:
      p.dtype = cuda::BiasActDType::kF32;
  }
  const BiasActLayout L = bias_act_layout(dense);
  p.n = dense.numel();
  p.C = L.C;
  p.inner = L.inner;
  p.slope = slope;
  p.gain = gain;
  p.clamp = clamp;
  return p;
}

at::Tensor bias_act_fwd_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& b, double slope, double gain,
                             double clamp) {
  check_bias_act_inputs("bias_act (cuda)", x, b, gain);
  TORCH_CHECK_VALUE(x.is_cuda(), "bias_act (cuda): x must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = bias_act_dense(x);
  at::Tensor out = at::empty_like(src);
  const bool has_b = b.has_value() && b->defined();
  const at::Tensor bias = has_b ? b->contiguous() : at::Tensor();
  const cudaError_t err = cuda::bias_act_forward(problem(src, slope, gain, clamp), src.data_ptr(),
                                                 has_b ? bias.data_ptr() : nullptr, out.data_ptr(),
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bias_act (cuda): launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor bias_act_bwd_cuda(const at::Tensor& grad, const at::Tensor& y, double slope, double gain, double clamp) {
  TORCH_CHECK_VALUE(y.is_cuda(), "bias_act backward (cuda): y must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(y.device());
  const BiasActBackwardOperands ops = bias_act_backward_operands("bias_act backward (cuda)", grad, y, gain);
  const at::Tensor &ys = ops.y, &gs = ops.grad;
  at::Tensor dx = at::empty_like(ys);
  const cudaError_t err = cuda::bias_act_backward(problem(ys, slope, gain, clamp), gs.data_ptr(), ys.data_ptr(),
                                                  dx.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bias_act backward (cuda): launch failed: ", cudaGetErrorString(err));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(talk3d, CUDA, m) {
  m.impl("bias_act_fwd", &bias_act_fwd_cuda);
  m.impl("bias_act_bwd", &bias_act_bwd_cuda);
}

}  // namespace talk3d
