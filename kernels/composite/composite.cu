// CUDA kernels of the fused compositing op (EG3D's MipRayMarcher2): one thread per ray.
//
// The per-ray math (forward scan, gradient folding, recompute backward) lives in
// talk3d/composite_math.h and is shared with the CPU kernel; the kernels here only find a ray's
// samples, keep its feature accumulators in registers, and write its outputs. A ray is a
// sequential scan over its samples, so a thread per ray needs no synchronisation at all: rays own
// disjoint outputs (dense: by construction; packed: rays do not overlap, nerfacc's layout).
//
// Two instances per storage type: F = 32 (EG3D), with the feature loops fully unrolled and the
// accumulators in registers, and a generic one for 1 <= F <= kCompositeMaxF whose loops run to the
// bound and stop at F (its arrays may spill to local memory; it is not the hot path).
//
// Tested by emulation on the CPU (tests/test_cuda_emulation_render.py: one std::thread per CUDA
// thread) against the CPU op and the PyTorch reference, and on an H100 and an H200 (the CUDA tests of
// tests/test_composite.py and tests/test_composite_weights.py).
#include "composite_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common/dispatch_storage.cuh"
#include "common/grid.cuh"
#include "common/half_types.cuh"
#include "talk3d/composite_math.h"

namespace talk3d {
namespace cuda {
namespace {

constexpr int kCompositeThreads = 128;
// The grid is sized for this many resident 128-thread blocks per SM (2048 threads, a full SM on
// sm_80/sm_90); a grid-stride loop takes the rays beyond that.
constexpr int kCompositeBlocksPerSM = 16;

// Storage types: fp32, fp64, and Half16 / BFloat16 from common/half_types.cuh.

template <typename S>
struct FwdArgs {
  const S* sigma;              // [N]
  const S* t;                  // [N]
  const S* feat;               // [N, F]
  const int64_t* packed_info;  // [R, 2] or null (dense)
  int64_t N, R, S_dense;
  int F;
  S* out_feat;                 // [R, F]
  S* out_depth;                // [R]
  S* out_wsum;                 // [R]
};

template <typename S>
struct BwdArgs {
  const S* sigma;              // [N]
  const S* t;                  // [N]
  const S* feat;               // [N, F]
  const int64_t* packed_info;  // [R, 2] or null (dense)
  int64_t N, R, S_dense;
  int F;
  const S* grad_feat;          // [R, F]
  const S* grad_depth;         // [R]
  const S* grad_wsum;          // [R]
  const S* saved_feat;         // [R, F]
  const S* saved_depth;        // [R]
  const S* saved_wsum;         // [R]
  S* dsigma;                   // [N] or null
  S* dfeat;                    // [N, F] or null
  S* dt;                       // [N] or null
};

// First sample and sample count of ray r. A packed range outside [0, N) becomes an empty ray, so a
// malformed packed_info can never make the kernel touch memory outside the inputs.
__device__ __forceinline__ void ray_range(const int64_t* packed_info, int64_t r, int64_t S_dense,
                                          int64_t N, int64_t& start, int64_t& count) {
  if (packed_info) {
    start = packed_info[2 * r];
    count = packed_info[2 * r + 1];
    if (start < 0 || count < 0 || start > N - count) start = count = 0;
  } else {
    start = r * S_dense;
    count = S_dense;
  }
}

// kF > 0: F == kF at compile time; kF == 0: run-time F <= kCompositeMaxF.
template <int kF, typename S>
__global__ void __launch_bounds__(kCompositeThreads) composite_forward_kernel(const FwdArgs<S> a) {
  using acc_t = typename AccOf<S>::type;
  constexpr int kArr = kF > 0 ? kF : kCompositeMaxF;
  const int F = kF > 0 ? kF : a.F;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.R; r += stride) {
    int64_t start, count;
    ray_range(a.packed_info, r, a.S_dense, a.N, start, count);
    const composite::RayView<S> ray{a.sigma + start, a.t + start, a.feat + start * F, count};
    acc_t acc[kArr];
#pragma unroll
    for (int c = 0; c < kArr; ++c) acc[c] = acc_t(0);
    acc_t wsum, dnum;
    composite::forward_ray<kF, kCompositeMaxF>(ray, F, acc, wsum, dnum);
    S* of = a.out_feat + r * F;
#pragma unroll
    for (int c = 0; c < kArr; ++c) {
      if (kF == 0 && c >= F) break;
      of[c] = static_cast<S>(acc[c] * acc_t(2) - acc_t(1));
    }
    // NaN for a ray with no weight, as the CPU op and the reference give. Spelled out rather than
    // left to 0 / 0, whose result --use_fast_math's approximate division does not promise.
    a.out_depth[r] = static_cast<S>(wsum != acc_t(0) ? dnum / wsum : acc_t(NAN));
    a.out_wsum[r] = static_cast<S>(wsum);
  }
}

template <int kF, typename S>
__global__ void __launch_bounds__(kCompositeThreads) composite_backward_kernel(const BwdArgs<S> a) {
  using acc_t = typename AccOf<S>::type;
  constexpr int kArr = kF > 0 ? kF : kCompositeMaxF;
  const int F = kF > 0 ? kF : a.F;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.R; r += stride) {
    int64_t start, count;
    ray_range(a.packed_info, r, a.S_dense, a.N, start, count);
    const composite::RayView<S> ray{a.sigma + start, a.t + start, a.feat + start * F, count};
    // dL/dC = 2 dL/dfeat (feat = 2 C - 1).
    acc_t gC[kArr];
    const S* gf = a.grad_feat + r * F;
#pragma unroll
    for (int c = 0; c < kArr; ++c) {
      if (kF == 0 && c >= F) break;
      gC[c] = acc_t(2) * composite::load<acc_t>(gf, c);
    }
    const composite::RayGrad<acc_t> g = composite::fold_ray_grad<kF, kCompositeMaxF>(
        gC, a.saved_feat + r * F, composite::load<acc_t>(a.saved_depth, r),
        composite::load<acc_t>(a.saved_wsum, r), composite::load<acc_t>(a.grad_depth, r),
        composite::load<acc_t>(a.grad_wsum, r), F);
    composite::backward_ray<kF, kCompositeMaxF>(ray, F, gC, g, a.dsigma ? a.dsigma + start : nullptr,
                                                a.dt ? a.dt + start : nullptr,
                                                a.dfeat ? a.dfeat + start * F : nullptr);
  }
}

// composite_weights: one thread per dense ray, no feature work.
template <typename S>
__global__ void __launch_bounds__(kCompositeThreads) composite_weights_forward_kernel(
    const S* sigma, const S* t, int64_t R, int64_t n, S* omega, S* depth, S* wsum) {
  using acc_t = typename AccOf<S>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < R; r += stride) {
    acc_t w, dnum;
    composite::weights_forward_ray(sigma + r * n, t + r * n, n, omega + r * n, w, dnum);
    depth[r] = static_cast<S>(w != acc_t(0) ? dnum / w : acc_t(NAN));  // see composite_forward_kernel
    wsum[r] = static_cast<S>(w);
  }
}

template <typename S>
struct WeightsBwdArgs {
  const S* sigma;        // [R * n]
  const S* t;            // [R * n]
  int64_t R, n;
  const S* grad_omega;   // [R * n]
  const S* grad_depth;   // [R]
  const S* grad_wsum;    // [R]
  const S* saved_omega;  // [R * n]
  const S* saved_depth;  // [R]
  const S* saved_wsum;   // [R]
  S* dsigma;             // [R * n] or null
  S* dt;                 // [R * n] or null
};

template <typename S>
__global__ void __launch_bounds__(kCompositeThreads) composite_weights_backward_kernel(const WeightsBwdArgs<S> a) {
  using acc_t = typename AccOf<S>::type;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, n = a.n;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < a.R; r += stride) {
    const composite::RayGrad<acc_t> g = composite::fold_weights_grad(
        a.saved_omega + r * n, a.grad_omega + r * n, n, composite::load<acc_t>(a.saved_depth, r),
        composite::load<acc_t>(a.saved_wsum, r), composite::load<acc_t>(a.grad_depth, r),
        composite::load<acc_t>(a.grad_wsum, r));
    composite::weights_backward_ray(a.sigma + r * n, a.t + r * n, n, a.grad_omega + r * n, g,
                                    a.dsigma ? a.dsigma + r * n : nullptr, a.dt ? a.dt + r * n : nullptr);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------

// Enough blocks to cover every ray once, at most kCompositeBlocksPerSM per SM.
cudaError_t grid_size(int64_t rays, int& blocks) {
  return grid_stride_blocks(rays, kCompositeThreads, kCompositeBlocksPerSM, blocks);
}

cudaError_t validate(const CompositeProblem& p) {
  switch (p.dtype) {
    case CompositeDType::kF32:
    case CompositeDType::kF16:
    case CompositeDType::kBF16:
    case CompositeDType::kF64:
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (p.F < 1 || p.F > kCompositeMaxF || p.N < 0 || p.R < 0) return cudaErrorInvalidValue;
  if (!p.packed_info && (p.S < 0 || p.N != p.R * p.S)) return cudaErrorInvalidValue;
  if (p.N > 0 && !(p.sigma && p.t && p.feat)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename S>
cudaError_t forward_typed(const CompositeProblem& p, void* out_feat, void* out_depth, void* out_wsum,
                          cudaStream_t stream) {
  FwdArgs<S> a;
  a.sigma = static_cast<const S*>(p.sigma);
  a.t = static_cast<const S*>(p.t);
  a.feat = static_cast<const S*>(p.feat);
  a.packed_info = p.packed_info;
  a.N = p.N;
  a.R = p.R;
  a.S_dense = p.S;
  a.F = p.F;
  a.out_feat = static_cast<S*>(out_feat);
  a.out_depth = static_cast<S*>(out_depth);
  a.out_wsum = static_cast<S*>(out_wsum);
  int blocks = 0;
  const cudaError_t err = grid_size(p.R, blocks);
  if (err != cudaSuccess) return err;
  auto kernel = p.F == 32 ? composite_forward_kernel<32, S> : composite_forward_kernel<0, S>;
  kernel<<<blocks, kCompositeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename S>
cudaError_t backward_typed(const CompositeProblem& p, const void* grad_feat, const void* grad_depth,
                           const void* grad_wsum, const void* saved_feat, const void* saved_depth,
                           const void* saved_wsum, void* dsigma, void* dfeat, void* dt,
                           cudaStream_t stream) {
  BwdArgs<S> a;
  a.sigma = static_cast<const S*>(p.sigma);
  a.t = static_cast<const S*>(p.t);
  a.feat = static_cast<const S*>(p.feat);
  a.packed_info = p.packed_info;
  a.N = p.N;
  a.R = p.R;
  a.S_dense = p.S;
  a.F = p.F;
  a.grad_feat = static_cast<const S*>(grad_feat);
  a.grad_depth = static_cast<const S*>(grad_depth);
  a.grad_wsum = static_cast<const S*>(grad_wsum);
  a.saved_feat = static_cast<const S*>(saved_feat);
  a.saved_depth = static_cast<const S*>(saved_depth);
  a.saved_wsum = static_cast<const S*>(saved_wsum);
  a.dsigma = static_cast<S*>(dsigma);
  a.dfeat = static_cast<S*>(dfeat);
  a.dt = static_cast<S*>(dt);
  int blocks = 0;
  const cudaError_t err = grid_size(p.R, blocks);
  if (err != cudaSuccess) return err;
  auto kernel = p.F == 32 ? composite_backward_kernel<32, S> : composite_backward_kernel<0, S>;
  kernel<<<blocks, kCompositeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t validate_weights(const WeightsProblem& p) {
  if (p.R < 0 || p.S < 0) return cudaErrorInvalidValue;
  if (p.R * p.S > 0 && !(p.sigma && p.t)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

cudaError_t composite_weights_forward(const WeightsProblem& p, void* omega, void* depth, void* wsum,
                                      cudaStream_t stream) {
  cudaError_t err = validate_weights(p);
  if (err != cudaSuccess || p.R == 0) return err;
  if (!omega || !depth || !wsum) return cudaErrorInvalidValue;
  int blocks = 0;
  err = grid_size(p.R, blocks);
  if (err != cudaSuccess) return err;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    auto kernel = composite_weights_forward_kernel<S>;
    kernel<<<blocks, kCompositeThreads, 0, stream>>>(static_cast<const S*>(p.sigma), static_cast<const S*>(p.t), p.R,
                                                     p.S, static_cast<S*>(omega), static_cast<S*>(depth),
                                                     static_cast<S*>(wsum));
    return cudaGetLastError();
  });
}

cudaError_t composite_weights_backward(const WeightsProblem& p, const void* grad_omega, const void* grad_depth,
                                       const void* grad_wsum, const void* saved_omega, const void* saved_depth,
                                       const void* saved_wsum, void* dsigma, void* dt, cudaStream_t stream) {
  cudaError_t err = validate_weights(p);
  if (err != cudaSuccess || p.R == 0 || (!dsigma && !dt)) return err;
  if (!grad_omega || !grad_depth || !grad_wsum || !saved_omega || !saved_depth || !saved_wsum)
    return cudaErrorInvalidValue;
  int blocks = 0;
  err = grid_size(p.R, blocks);
  if (err != cudaSuccess) return err;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    WeightsBwdArgs<S> a;
    a.sigma = static_cast<const S*>(p.sigma);
    a.t = static_cast<const S*>(p.t);
    a.R = p.R;
    a.n = p.S;
    a.grad_omega = static_cast<const S*>(grad_omega);
    a.grad_depth = static_cast<const S*>(grad_depth);
    a.grad_wsum = static_cast<const S*>(grad_wsum);
    a.saved_omega = static_cast<const S*>(saved_omega);
    a.saved_depth = static_cast<const S*>(saved_depth);
    a.saved_wsum = static_cast<const S*>(saved_wsum);
    a.dsigma = static_cast<S*>(dsigma);
    a.dt = static_cast<S*>(dt);
    auto kernel = composite_weights_backward_kernel<S>;
    kernel<<<blocks, kCompositeThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t composite_forward(const CompositeProblem& p, void* out_feat, void* out_depth, void* out_wsum,
                              cudaStream_t stream) {
  const cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  if (p.R == 0) return cudaSuccess;
  if (!out_feat || !out_depth || !out_wsum) return cudaErrorInvalidValue;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto tag) {
    return forward_typed<decltype(tag)>(p, out_feat, out_depth, out_wsum, stream);
  });
}

cudaError_t composite_backward(const CompositeProblem& p, const void* grad_feat, const void* grad_depth,
                               const void* grad_wsum, const void* saved_feat, const void* saved_depth,
                               const void* saved_wsum, void* dsigma, void* dfeat, void* dt,
                               cudaStream_t stream) {
  const cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  // No ray, or no gradient wanted: nothing to write.
  if (p.R == 0 || (!dsigma && !dfeat && !dt)) return cudaSuccess;
  if (!grad_feat || !grad_depth || !grad_wsum || !saved_feat || !saved_depth || !saved_wsum)
    return cudaErrorInvalidValue;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto tag) {
    return backward_typed<decltype(tag)>(p, grad_feat, grad_depth, grad_wsum, saved_feat, saved_depth, saved_wsum,
                                         dsigma, dfeat, dt, stream);
  });
}

}  // namespace cuda
}  // namespace talk3d
