// CUDA kernel of binomial_filter2d: one thread per strip of fir::kStrip neighbouring outputs of a
// row, around talk3d/binomial_filter_math.h (which the CPU kernel shares). In NCHW consecutive
// threads take consecutive strips of a row; in NHWC consecutive channels of one strip. Either way a
// warp's loads of an input row and its stores are contiguous; the strips' overlapping columns and
// the four rows' reuse across neighbouring output rows come from L1/L2.
//
// Why it exists: PyTorch runs the super-resolution's 4 x 4 FIR (a depthwise convolution, one
// channel per group) with slow kernels on a GPU (1.7 ms a call at batch 8 at inference, cuDNN's
// grouped direct kernel 4.4 ms in training; H200, 2026-12-04), where one pass at memory speed
// suffices. NHWC lets the super-resolution stay channels-last between its convolutions.
#include "binomial_filter_cuda.h"

#include <stdint.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "common/dispatch_storage.cuh"
#include "common/grid.cuh"
#include "common/half_types.cuh"
#include "talk3d/binomial_filter_math.h"

namespace talk3d {
namespace cuda {
namespace {

constexpr int kFirThreads = 256;
// Grid: this many resident blocks per SM; a grid-stride loop takes the rest.
constexpr int kFirBlocksPerSM = 8;

// Thread t -> (n, c, output row i, first column j of its strip); kNHWC picks which index runs fastest.
// I: the index type, int32_t while the tensors allow it (with_index_type; there are four divisions
// or modulos a strip).
template <bool kNHWC, typename I>
struct StripIndex {
  I n, c, i, j;
  __device__ StripIndex(I t, I C, I out_h, I strips) {
    I rest;
    if (kNHWC) {  // t = ((n * out_h + i) * strips + strip) * C + c
      c = t % C;
      rest = t / C;
      j = (rest % strips) * fir::kStrip;
      rest /= strips;
      i = rest % out_h;
      n = rest / out_h;
    } else {  // t = ((n * C + c) * out_h + i) * strips + strip
      j = (t % strips) * fir::kStrip;
      rest = t / strips;
      i = rest % out_h;
      rest /= out_h;
      c = rest % C;
      n = rest / C;
    }
  }
};

// Eight 2-byte values (Half16 / BFloat16) from or to a 16-byte aligned address, as lanes of floats.
template <typename S>
__device__ __forceinline__ fir::Lanes<float, 8> load_lanes(const S* p) {
  S raw[8];
  talk3d::load8(p, raw);  // one 16-byte load (common.h)
  fir::Lanes<float, 8> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = static_cast<float>(raw[i]);
  return out;
}

template <typename S>
__device__ __forceinline__ void store_lanes(S* p, const fir::Lanes<float, 8>& v) {
  unsigned int w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) w[i >> 1] |= static_cast<unsigned int>(static_cast<S>(v.v[i]).bits) << ((i & 1) * 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// kV: channels a thread filters together. 1: one channel (any layout and type). 8: NHWC with 2-byte
// storage, C % 8 == 0 and 16-byte aligned tensors: eight channels per 16-byte load and store, so a
// warp's access to an input or output position covers 256 contiguous bytes instead of 64 (and a
// thread issues an eighth of the loads).
template <typename S, bool kNHWC, typename I, int kV>
__global__ void __launch_bounds__(kFirThreads)
    binomial_filter2d_kernel(const S* __restrict__ x, S* __restrict__ y, I N, I C, I H, I W, I out_h, I out_w,
                             I top, I left, double gain) {
  static_assert(kV == 1 || (kV == 8 && kNHWC && sizeof(S) == 2), "eight lanes: NHWC, 2-byte storage");
  using acc_t = typename AccOf<S>::type;
  using lanes_t = typename std::conditional<kV == 1, acc_t, fir::Lanes<float, kV>>::type;
  const I strips = (out_w + fir::kStrip - 1) / fir::kStrip;
  const I groups = C / kV;  // threads per strip (NHWC) or channels (kV == 1)
  const I total = N * groups * out_h * strips;
  // Element (r, col) of channel c in image n sits at base + r * row + col * step, in either layout.
  const I step = kNHWC ? C : I(1), x_row = W * step, y_row = out_w * step;
  const I stride = I(gridDim.x) * I(blockDim.x);
  for (I t = I(blockIdx.x) * I(blockDim.x) + I(threadIdx.x); t < total; t += stride) {
    const StripIndex<kNHWC, I> s(t, groups, out_h, strips);
    const I c = s.c * kV;  // first channel of the thread's group
    const S* plane = x + (kNHWC ? s.n * H * W * C + c : (s.n * C + c) * H * W);
    const auto load = [plane, x_row, step](I r, I col) {
      if constexpr (kV == 1) {
        return static_cast<acc_t>(plane[r * x_row + col * step]);
      } else {
        return load_lanes(plane + r * x_row + col * step);
      }
    };
    lanes_t v[fir::kStrip];
    fir::filter_strip<lanes_t>(load, H, W, s.i - top, s.j - left, lanes_t(gain), v);
    S* row = y + (kNHWC ? s.n * out_h * out_w * C + c : (s.n * C + c) * out_h * out_w) + s.i * y_row;
#pragma unroll
    for (int k = 0; k < fir::kStrip; ++k) {
      if (s.j + k >= out_w) continue;
      if constexpr (kV == 1) {
        row[(s.j + k) * step] = static_cast<S>(v[k]);
      } else {
        store_lanes(row + (s.j + k) * step, v[k]);
      }
    }
  }
}

template <typename S, typename I, int kV>
cudaError_t launch_indexed(const FirProblem& p, int blocks, cudaStream_t stream) {
  const auto* x = static_cast<const S*>(p.x);
  auto* y = static_cast<S*>(p.y);
  auto kernel = binomial_filter2d_kernel<S, true, I, kV>;  // eight lanes: NHWC only
  if constexpr (kV == 1) {
    if (!p.channels_last) kernel = binomial_filter2d_kernel<S, false, I, kV>;
  }
  kernel<<<blocks, kFirThreads, 0, stream>>>(x, y, I(p.N), I(p.C), I(p.H), I(p.W), I(p.out_h), I(p.out_w), I(p.top),
                                             I(p.left), p.gain);
  return cudaGetLastError();
}

template <typename S>
cudaError_t launch(const FirProblem& p, cudaStream_t stream) {
  const int64_t strips = (p.out_w + fir::kStrip - 1) / fir::kStrip;
  // Eight channels a thread: NHWC, 2-byte storage, whole 16-byte groups of channels at aligned addresses.
  const bool lanes = p.channels_last && sizeof(S) == 2 && p.C % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0;
  const int64_t total = p.N * (lanes ? p.C / 8 : p.C) * p.out_h * strips;
  int blocks = 0;
  const cudaError_t err = grid_stride_blocks(total, kFirThreads, kFirBlocksPerSM, blocks);
  if (err != cudaSuccess) return err;
  // Every index the kernel forms stays below these (an element of x or y, a strip plus a grid step;
  // the padding offsets are at most a few elements past a row; the crop offsets themselves).
  const int64_t biggest = std::max({p.N * p.C * (p.H + 4) * (p.W + 4), p.N * p.C * p.out_h * p.out_w,
                                    total + int64_t(blocks) * kFirThreads, std::abs(p.top) + p.out_h + 4,
                                    std::abs(p.left) + p.out_w + 4});
  return with_index_type(biggest, [&](auto index) {
    using I = decltype(index);
    if constexpr (sizeof(S) == 2) {
      if (lanes) return launch_indexed<S, I, 8>(p, blocks, stream);
    }
    return launch_indexed<S, I, 1>(p, blocks, stream);
  });
}

}  // namespace

cudaError_t binomial_filter2d(const FirProblem& p, cudaStream_t stream) {
  if (p.N < 0 || p.C < 0 || p.H < 0 || p.W < 0 || p.out_h < 0 || p.out_w < 0) return cudaErrorInvalidValue;
  if (p.N == 0 || p.C == 0 || p.out_h == 0 || p.out_w == 0) return cudaSuccess;
  // An empty input (H or W = 0) padded to a non-empty output is never read (every tap is padding),
  // and torch's allocator gives it a null pointer.
  if (!p.y || (!p.x && p.H > 0 && p.W > 0)) return cudaErrorInvalidValue;
  return dispatch_storage<Half16, BFloat16>(p.dtype, [&](auto s) { return launch<decltype(s)>(p, stream); });
}

}  // namespace cuda
}  // namespace talk3d
