// CUDA implementation of binomial_filter2d: validates, allocates, and calls the torch-free launcher
// in kernels/binomial_filter. Compiled only when the installed torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binomial_filter.h"
#include "binomial_filter/binomial_filter_cuda.h"

namespace talk3d {

namespace {

cuda::FirDType fir_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::FirDType::kF16;
    case at::kBFloat16:
      return cuda::FirDType::kBF16;
    case at::kDouble:
      return cuda::FirDType::kF64;
    default:
      return cuda::FirDType::kF32;
  }
}

at::Tensor binomial_filter2d_cuda(const at::Tensor& x, int64_t top, int64_t left, int64_t out_h,
                                  int64_t out_w, double gain) {
  check_binomial_filter_inputs("binomial_filter2d (cuda)", x, out_h, out_w);
  TORCH_CHECK_VALUE(x.is_cuda(), "binomial_filter2d (cuda): x must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor src = binomial_filter_dense_input(x);
  at::Tensor out = binomial_filter_output(src, out_h, out_w);
  cuda::FirProblem p;
  p.dtype = fir_dtype(src.scalar_type());
  p.x = src.data_ptr();
  p.y = out.data_ptr();
  p.N = src.size(0);
  p.C = src.size(1);
  p.channels_last = binomial_filter_nhwc(src);
  p.H = src.size(2);
  p.W = src.size(3);
  p.out_h = out_h;
  p.out_w = out_w;
  p.top = top;
  p.left = left;
  p.gain = gain;
  const cudaError_t err = cuda::binomial_filter2d(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "binomial_filter2d (cuda): launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(talk3d, CUDA, m) {
  m.impl("binomial_filter2d", &binomial_filter2d_cuda);
}

}  // namespace talk3d
