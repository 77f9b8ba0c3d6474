// CUDA kernels of bias_act: grid-stride loops around talk3d/bias_act_math.h (which the CPU kernel
// shares), one element per thread and step.
//
// Why it exists: the super-resolution's every layer ends in bias, leaky ReLU, gain and clamp, four
// PyTorch kernels over the layer's whole output forward (each reading and writing it) and as many
// in the backward, on the largest activations of the network (2 x 128 x 512^2 in training).
#include "bias_act_cuda.h"

#include "common/dispatch_storage.cuh"
#include "common/grid.cuh"
#include "common/half_types.cuh"
#include "talk3d/bias_act_math.h"

namespace talk3d {
namespace cuda {
namespace {

constexpr int kBiasActThreads = 256;
constexpr int kBiasActBlocksPerSM = 8;

template <typename S>
__global__ void __launch_bounds__(kBiasActThreads)
    bias_act_forward_kernel(const S* __restrict__ x, const typename AccOf<S>::type* __restrict__ b,
                            S* __restrict__ y, BiasActProblem p) {
  using acc_t = typename AccOf<S>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
    const acc_t bias = b ? b[(i / p.inner) % p.C] : acc_t(0);
    y[i] = static_cast<S>(bias_act::forward<acc_t>(static_cast<acc_t>(x[i]), bias, acc_t(p.slope),
                                                  acc_t(p.gain), acc_t(p.clamp)));
  }
}

template <typename S>
__global__ void __launch_bounds__(kBiasActThreads)
    bias_act_backward_kernel(const S* __restrict__ dy, const S* __restrict__ y, S* __restrict__ dx,
                             BiasActProblem p) {
  using acc_t = typename AccOf<S>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride)
    dx[i] = static_cast<S>(bias_act::backward<acc_t>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(y[i]),
                                                    acc_t(p.slope), acc_t(p.gain), acc_t(p.clamp)));
}

// A problem with elements must have channels and a positive gain (the backward reads signs off y).
cudaError_t check(const BiasActProblem& p) {
  if (p.n < 0 || p.C < 1 || p.inner < 1 || !(p.gain > 0)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

cudaError_t bias_act_forward(const BiasActProblem& p, const void* x, const void* b, void* y, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (check(p) != cudaSuccess || !x || !y) return cudaErrorInvalidValue;
  int blocks = 0;
  const cudaError_t err = grid_stride_blocks(p.n, kBiasActThreads, kBiasActBlocksPerSM, blocks);
  if (err != cudaSuccess) return err;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto s) {
    using S = decltype(s);
    using acc_t = typename AccOf<S>::type;
    const auto kernel = bias_act_forward_kernel<S>;
    kernel<<<blocks, kBiasActThreads, 0, stream>>>(static_cast<const S*>(x), static_cast<const acc_t*>(b),
                                                   static_cast<S*>(y), p);
    return cudaGetLastError();
  });
}

cudaError_t bias_act_backward(const BiasActProblem& p, const void* dy, const void* y, void* dx, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  if (check(p) != cudaSuccess || !dy || !y || !dx) return cudaErrorInvalidValue;
  int blocks = 0;
  const cudaError_t err = grid_stride_blocks(p.n, kBiasActThreads, kBiasActBlocksPerSM, blocks);
  if (err != cudaSuccess) return err;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto s) {
    using S = decltype(s);
    const auto kernel = bias_act_backward_kernel<S>;
    kernel<<<blocks, kBiasActThreads, 0, stream>>>(static_cast<const S*>(dy), static_cast<const S*>(y),
                                                   static_cast<S*>(dx), p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace talk3d
