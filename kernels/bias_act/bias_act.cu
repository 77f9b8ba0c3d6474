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

// Element indices in I: int32_t where the tensor allows it (with_index_type, common/grid.cuh).
template <typename S, typename I>
__global__ void __launch_bounds__(kBiasActThreads)
    bias_act_forward_kernel(const S* __restrict__ x, const typename AccOf<S>::type* __restrict__ b,
                            S* __restrict__ y, BiasActProblem p) {
  using acc_t = typename AccOf<S>::type;
  const I n = I(p.n), C = I(p.C), inner = I(p.inner), stride = I(gridDim.x) * I(blockDim.x);
  // Element i sits at offset r of channel c's run of `inner` elements: i = (k C + c) inner + r. Both
  // advance by the stride's share each step (two compares) instead of a division and a modulo per
  // element (~40 instructions, in a kernel that should be bound by memory). No sum below can exceed
  // inner or C, so none overflows I.
  const I step_r = stride % inner, step_c = (stride / inner) % C;
  I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x);
  I r = i % inner, c = (i / inner) % C;
  for (; i < n; i += stride) {
    const acc_t bias = b ? b[c] : acc_t(0);
    y[i] = static_cast<S>(bias_act::forward<acc_t>(static_cast<acc_t>(x[i]), bias, acc_t(p.slope),
                                                  acc_t(p.gain), acc_t(p.clamp)));
    const bool carry = r >= inner - step_r;  // r + step_r wraps into the next channel's run
    r = carry ? r - (inner - step_r) : r + step_r;
    c = c >= C - step_c ? c - (C - step_c) : c + step_c;
    if (carry) c = c == C - 1 ? I(0) : c + 1;
  }
}

template <typename S, typename I>
__global__ void __launch_bounds__(kBiasActThreads)
    bias_act_backward_kernel(const S* __restrict__ dy, const S* __restrict__ y, S* __restrict__ dx,
                             BiasActProblem p) {
  using acc_t = typename AccOf<S>::type;
  const I n = I(p.n), stride = I(gridDim.x) * I(blockDim.x);
  for (I i = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); i < n; i += stride)
    dx[i] = static_cast<S>(bias_act::backward<acc_t>(static_cast<acc_t>(dy[i]), static_cast<acc_t>(y[i]),
                                                    acc_t(p.slope), acc_t(p.gain), acc_t(p.clamp)));
}

// Checks p (a problem with elements has channels and a positive gain: the backward reads signs off
// y) and sizes the grid; `launch(S{}, I{}, blocks)` then runs the kernel for the storage type S and
// the index type I (int32_t while the last grid-stride step cannot overflow it).
template <typename Launch>
cudaError_t run(const BiasActProblem& p, bool pointers_ok, Launch&& launch) {
  if (p.n == 0) return cudaSuccess;
  if (p.n < 0 || p.C < 1 || p.inner < 1 || !(p.gain > 0) || !pointers_ok) return cudaErrorInvalidValue;
  int blocks = 0;
  const cudaError_t err = grid_stride_blocks(p.n, kBiasActThreads, kBiasActBlocksPerSM, blocks);
  if (err != cudaSuccess) return err;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto s) {
    // The last grid-stride step goes at most one grid past n.
    return with_index_type(p.n + int64_t(blocks) * kBiasActThreads, [&](auto index) { return launch(s, index, blocks); });
  });
}

}  // namespace

cudaError_t bias_act_forward(const BiasActProblem& p, const void* x, const void* b, void* y, cudaStream_t stream) {
  return run(p, x && y, [&](auto s, auto index, int blocks) {
    using S = decltype(s);
    using acc_t = typename AccOf<S>::type;
    const auto kernel = bias_act_forward_kernel<S, decltype(index)>;
    kernel<<<blocks, kBiasActThreads, 0, stream>>>(static_cast<const S*>(x), static_cast<const acc_t*>(b),
                                                   static_cast<S*>(y), p);
    return cudaGetLastError();
  });
}

cudaError_t bias_act_backward(const BiasActProblem& p, const void* dy, const void* y, void* dx, cudaStream_t stream) {
  return run(p, dy && y && dx, [&](auto s, auto index, int blocks) {
    using S = decltype(s);
    const auto kernel = bias_act_backward_kernel<S, decltype(index)>;
    kernel<<<blocks, kBiasActThreads, 0, stream>>>(static_cast<const S*>(dy), static_cast<const S*>(y),
                                                   static_cast<S*>(dx), p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace talk3d
