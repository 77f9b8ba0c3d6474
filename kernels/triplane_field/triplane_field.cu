// CUDA kernels of the fused triplane field (sample three planes, average, decode with the EG3D MLP).
//
// The per-point math lives in talk3d/triplane_field_math.h and is shared with the CPU kernels; the
// kernels here are loops around it plus the GPU-specific parts: decoder weights staged in shared
// memory, atomics for the plane gradients, and the reduction of the weight gradients.
//
// Forward: one thread per point (grid-stride), only sigma and feat are written. The EG3D size with
// float accumulation runs the decoder one hidden unit at a time (field_forward_streaming_kernel) and
// writes the features through shared memory, a block's tile of points as one contiguous run; other
// sizes and fp64 run the header's mlp_forward.
// Backward: the forward is recomputed per point. Plane gradients go through atomicAdd into the
// contiguous d_planes; d_xyz is written per point.
// - EG3D size with float accumulation (field_backward_streaming_kernel): the decoder backward runs one
//   hidden unit at a time too (168 registers, no stack; the per-point-array form took 255 and a stack
//   frame). The weight gradients are not reduced in the kernel: each point writes the factors they are
//   sums of (f, h, dpre, dout) feature-major into a chunk of rows, and the torch-facing adapter
//   reduces each chunk with two GEMMs (on an H200 the in-kernel tile reduction below, with its
//   ~150 KB of shared memory, left one block per SM: 31 ms of a 44 ms backward).
// - Other sizes and fp64 (backward_points): weight gradients are reduced per block: points are
//   processed in tiles of blockDim.x points; every thread writes its point's f, h, dpre and dout into
//   shared memory; after a barrier the block adds the tile's outer products into per-block
//   accumulators (each accumulator entry is updated by exactly one thread); after the last tile the
//   accumulators are atomically added to d_w1, d_b1, d_w2, d_b2 once per block.
//
// Shared memory is sized at launch (backward_dims lists the order in which configurations are tried).
// The EG3D instance (StaticDims<32, 64, 33>) always stages the weights in shared memory; the generic
// instance may instead read them from global memory (large sizes in fp32/fp64 need this), and the
// backward may use smaller tiles or per-tile atomics instead of block accumulators. Nothing here
// depends on the block size being a multiple of the warp size.
//
// Tested by emulation on the CPU (one std::thread per CUDA thread, std::barrier for __syncthreads,
// tests/cuda_emu) against the PyTorch reference, and on GPUs by the cuda-marked tests.
#include "triplane_field_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "common/dispatch_storage.cuh"
#include "common/grid.cuh"
#include "common/half_types.cuh"
#include "field_mma.cuh"
#include "talk3d/triplane_field_math.h"

namespace talk3d {
namespace cuda {
namespace {

using EG3DDims = field::StaticDims<32, 64, 33>;  // the EG3D decoder, unrolled at compile time
constexpr int kThreads = 128;  // block size of both kernels (the backward may use fewer, see below)

// acc: accumulation type; pos: type of xyz; load: type the planes are read as (half-precision planes
// through the 2-byte wrappers of common/half_types.cuh: the header converts with `acc_t(src[c])`).
template <typename S>
struct Storage;

template <>
struct Storage<float> {
  using acc = float;
  using pos = float;
  using load = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};
template <>
struct Storage<double> {
  using acc = double;
  using pos = double;
  using load = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};
template <>
struct Storage<__half> {
  using acc = float;
  using pos = float;
  using load = Half16;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <>
struct Storage<__nv_bfloat16> {
  using acc = float;
  using pos = float;
  using load = BFloat16;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

// ------------------------------------------------------------------------------------------------
// Weight views. The header's decoder functions index w1t [C, HID], w2t [HID, OUT], b1, b2, w1 [HID, C]
// and w2 [OUT, HID] with a flat int index. The fast path hands them `const acc_t*` into shared memory
// (filled by load_weights). The fallback reads global memory (storage type) through this view:
//   element i -> p[hi * s_hi + lo * s_lo] with hi = i / n, lo = i % n.
// Identity: n = 1, s_hi = 1, s_lo = 0. Transpose of a row-major [R, K] matrix viewed as [K, R]: n = R,
// s_hi = 1, s_lo = K (i = k * R + r -> p[k + r * K]).
// ------------------------------------------------------------------------------------------------
template <typename S>
struct GlobalWeights {
  using acc_t = typename Storage<S>::acc;
  const S* p;
  int n, s_hi, s_lo;
  __device__ __forceinline__ acc_t operator[](int i) const {
    const int hi = i / n;
    const int lo = i - hi * n;
    return Storage<S>::to_acc(p[int64_t(hi) * s_hi + int64_t(lo) * s_lo]);
  }
};

// ------------------------------------------------------------------------------------------------
// Dynamic shared memory layout, in elements of the accumulation type. Computed once on the host and
// passed to the kernel, so the size allocated and the offsets used cannot disagree. -1 = absent.
// ------------------------------------------------------------------------------------------------
struct SmemLayout {
  int w1t, w2t, b1, b2, w1, w2;  // weight copies (acc type)
  int fa, ha, dp, dq;            // tile buffers: [T][ldf] f|1, [T][ldh] h|1, [T][ldp] dpre, [T][ldo] dout
  int ldf, ldh, ldp, ldo;
  int g1, g2;                    // block accumulators: [HID][C + 1] (dW1 | db1), [OUT][HID + 1] (dW2 | db2)
  int64_t elems;                 // total size
};

inline int round_up4(int x) { return (x + 3) / 4 * 4; }

// Row strides of the tile buffers. Every row is written by one thread (thread t writes row t), so an
// odd stride makes those writes bank-conflict free. Rows read as the "A" operand of the outer products
// (dpre, dout) are read four consecutive entries at a time from a multiple of 4, so they hold at least
// round_up4(size) entries (the padding is zero-filled).
inline SmemLayout make_layout(int C, int HID, int OUT, int T, bool weights, bool backward, bool tiles,
                              bool accum) {
  SmemLayout L;
  int64_t n = 0;
  auto take = [&n](int64_t count) {
    const int off = int(n);
    n += count;
    return off;
  };
  L.w1t = L.w2t = L.b1 = L.b2 = L.w1 = L.w2 = -1;
  L.fa = L.ha = L.dp = L.dq = -1;
  L.g1 = L.g2 = -1;
  L.ldf = (C + 1) | 1;
  L.ldh = (HID + 1) | 1;
  L.ldp = round_up4(HID) + 1;
  L.ldo = round_up4(OUT) + 1;
  if (weights) {
    L.w1t = take(int64_t(C) * HID);
    L.w2t = take(int64_t(HID) * OUT);
    L.b1 = take(HID);
    L.b2 = take(OUT);
    if (backward) {
      L.w1 = take(int64_t(HID) * C);
      L.w2 = take(int64_t(OUT) * HID);
    }
  }
  if (tiles) {
    L.fa = take(int64_t(T) * L.ldf);
    L.ha = take(int64_t(T) * L.ldh);
    L.dp = take(int64_t(T) * L.ldp);
    L.dq = take(int64_t(T) * L.ldo);
    if (accum) {
      L.g1 = take(int64_t(HID) * (C + 1));
      L.g2 = take(int64_t(OUT) * (HID + 1));
    }
  }
  L.elems = n;
  return L;
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments.
// ------------------------------------------------------------------------------------------------
template <typename S>
struct FwdArgs {
  using acc_t = typename Storage<S>::acc;
  using load_t = typename Storage<S>::load;
  using pos_t = typename Storage<S>::pos;
  const load_t* planes;
  int64_t s_batch;
  field::PlaneGeom geom;  // geometry of the input planes (their own strides)
  const pos_t* xyz;
  int64_t N, total;       // total = B * N
  const S *w1, *b1, *w2, *b2;
  acc_t inv_half_box;
  int axes;
  SmemLayout L;
  S* sigma;
  S* feat;
};

template <typename S>
struct BwdArgs {
  using acc_t = typename Storage<S>::acc;
  using load_t = typename Storage<S>::load;
  using pos_t = typename Storage<S>::pos;
  const load_t* planes;
  int64_t s_batch;
  field::PlaneGeom geom;      // geometry of the input planes (their own strides)
  field::PlaneGeom out_geom;  // geometry of d_planes: contiguous [3, H, W, C]
  int64_t d_planes_batch;     // 3 * H * W * C
  const pos_t* xyz;
  int64_t N, total;
  const S *w1, *b1, *w2, *b2;
  acc_t inv_half_box;
  int axes;
  SmemLayout L;
  const S* grad_sigma;
  const S* grad_feat;
  acc_t *d_planes, *d_xyz, *d_w1, *d_b1, *d_w2, *d_b2;
  bool vec4_grad;  // d_planes rows 16-byte aligned, C % 4 == 0, float: four channels per atomic
  bool vec_gfeat;  // grad_feat rows start 16-byte aligned: read 16 bytes a load (the streaming backward)
};

// Four consecutive plane-gradient channels (16-byte aligned): one vector atomic on Hopper and later
// (the plane gradient's 384 scalar atomics per point dominated the backward), four scalar ones before.
__device__ __forceinline__ void atomic_add4(float* p, float v0, float v1, float v2, float v3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(v0, v1, v2, v3));
#else
  atomicAdd(p, v0);
  atomicAdd(p + 1, v1);
  atomicAdd(p + 2, v2);
  atomicAdd(p + 3, v3);
#endif
}
__device__ __forceinline__ void atomic_add4(double* p, double v0, double v1, double v2, double v3) {
  atomicAdd(p, v0);
  atomicAdd(p + 1, v1);
  atomicAdd(p + 2, v2);
  atomicAdd(p + 3, v3);
}

template <typename acc_t>
__device__ __forceinline__ acc_t* smem_base() {
  extern __shared__ __align__(16) unsigned char t3d_field_smem[];
  return reinterpret_cast<acc_t*>(t3d_field_smem);
}

// Copies the decoder weights into shared memory as acc type: w1t [C, HID], w2t [HID, OUT], b1, b2 and,
// for the backward (L.w1 >= 0), w1 [HID, C] and w2 [OUT, HID]. The caller synchronises afterwards.
template <typename S>
__device__ void load_weights(const S* w1, const S* b1, const S* w2, const S* b2, int C, int HID,
                             int OUT, const SmemLayout& L, typename Storage<S>::acc* sm) {
  using acc_t = typename Storage<S>::acc;
  acc_t* w1t_s = sm + L.w1t;
  acc_t* w2t_s = sm + L.w2t;
  acc_t* b1_s = sm + L.b1;
  acc_t* b2_s = sm + L.b2;
  acc_t* w1_s = L.w1 >= 0 ? sm + L.w1 : nullptr;
  acc_t* w2_s = L.w2 >= 0 ? sm + L.w2 : nullptr;
  for (int e = threadIdx.x; e < HID * C; e += blockDim.x) {  // w1[e], e = j * C + c
    const int j = e / C, c = e - j * C;
    const acc_t v = Storage<S>::to_acc(w1[e]);
    w1t_s[c * HID + j] = v;
    if (w1_s) w1_s[e] = v;
  }
  for (int e = threadIdx.x; e < OUT * HID; e += blockDim.x) {  // w2[e], e = k * HID + j
    const int k = e / HID, j = e - k * HID;
    const acc_t v = Storage<S>::to_acc(w2[e]);
    w2t_s[j * OUT + k] = v;
    if (w2_s) w2_s[e] = v;
  }
  for (int j = threadIdx.x; j < HID; j += blockDim.x) b1_s[j] = Storage<S>::to_acc(b1[j]);
  for (int k = threadIdx.x; k < OUT; k += blockDim.x) b2_s[k] = Storage<S>::to_acc(b2[k]);
}

// ------------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------------
template <typename S, typename Dims, typename WArr>
__device__ void forward_points(const FwdArgs<S>& a, const Dims& d, const WArr& w1t, const WArr& b1,
                               const WArr& w2t, const WArr& b2) {
  using acc_t = typename Storage<S>::acc;
  const int F = d.out() - 1;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.total; i += stride) {
    const int64_t b = i / a.N;
    acc_t q[3];
    field::scale_point(a.xyz + 3 * i, a.inv_half_box, q);
    acc_t f[Dims::kMaxC], pre[Dims::kMaxHid], h[Dims::kMaxHid], o[Dims::kMaxOut];
    field::sample_mean(d, a.planes + b * a.s_batch, a.geom, a.axes, q, f);
    field::mlp_forward<Dims, acc_t>(d, w1t, b1, w2t, b2, f, pre, h, o);
    if (a.sigma) a.sigma[i] = Storage<S>::from_acc(o[0]);
    if (a.feat) {
      S* out = a.feat + i * F;
      for (int k = 1; k < d.out(); ++k) out[k - 1] = Storage<S>::from_acc(field::feature_activation(o[k]));
    }
  }
}

template <typename S, typename Dims, bool kSmemWeights>
__global__ void __launch_bounds__(kThreads) field_forward_kernel(const FwdArgs<S> a, const Dims d) {
  using acc_t = typename Storage<S>::acc;
  if constexpr (kSmemWeights) {
    acc_t* sm = smem_base<acc_t>();
    load_weights<S>(a.w1, a.b1, a.w2, a.b2, d.c(), d.hid(), d.out(), a.L, sm);
    __syncthreads();
    const acc_t* w1t = sm + a.L.w1t;
    const acc_t* w2t = sm + a.L.w2t;
    const acc_t* b1 = sm + a.L.b1;
    const acc_t* b2 = sm + a.L.b2;
    forward_points(a, d, w1t, b1, w2t, b2);
  } else {
    const GlobalWeights<S> w1t{a.w1, d.hid(), 1, d.c()};
    const GlobalWeights<S> w2t{a.w2, d.out(), 1, d.hid()};
    const GlobalWeights<S> b1{a.b1, 1, 1, 0};
    const GlobalWeights<S> b2{a.b2, 1, 1, 0};
    forward_points(a, d, w1t, b1, w2t, b2);
  }
}

// Forward of the EG3D decoder size with float accumulation (fp32, fp16 and bf16 storage): the decoder
// runs one hidden unit at a time (mlp_forward_streaming), so a thread keeps only its point's 32
// features and 33 outputs live. The weights sit in shared memory as W1 rows and zero-padded W2^T rows,
// read four at a time; every thread of a warp reads the same address (a broadcast).
// kVecTaps: planes whose texels start 16-byte aligned are read 16 bytes of channels per load.
struct StreamingLayout {  // offsets in floats; all multiples of 4 (16-byte aligned rows)
  static constexpr int kC = 32, kHid = 64, kOut = 33, kOut4 = 36;
  static constexpr int w1 = 0, b1 = w1 + kHid * kC, w2t = b1 + kHid, b2 = w2t + kHid * kOut4;
  static constexpr int elems = b2 + kOut4;
};

// The forward's shared memory: the weights above, then the features of one tile of kThreads points,
// a row of kStageRow floats per thread (odd: thread t's k-th write and the write-out's reads of a row
// fall in distinct banks).
struct ForwardStage {
  static constexpr int kF = StreamingLayout::kOut - 1, kStageRow = kF + 1;
  static constexpr int offset = StreamingLayout::elems, elems = offset + kThreads * kStageRow;
};

// Stages the decoder weights as StreamingLayout (float) in shared memory; the caller synchronises.
template <typename S>
__device__ void load_streaming_weights(const S* w1, const S* b1, const S* w2, const S* b2, float* sm) {
  using L = StreamingLayout;
  for (int e = threadIdx.x; e < L::kHid * L::kC; e += blockDim.x) sm[L::w1 + e] = Storage<S>::to_acc(w1[e]);
  for (int e = threadIdx.x; e < L::kHid * L::kOut4; e += blockDim.x) {
    const int j = e / L::kOut4, k = e - j * L::kOut4;
    sm[L::w2t + e] = k < L::kOut ? Storage<S>::to_acc(w2[k * L::kHid + j]) : 0.0f;
  }
  for (int j = threadIdx.x; j < L::kHid; j += blockDim.x) sm[L::b1 + j] = Storage<S>::to_acc(b1[j]);
  for (int k = threadIdx.x; k < L::kOut4; k += blockDim.x) sm[L::b2 + k] = k < L::kOut ? Storage<S>::to_acc(b2[k]) : 0.0f;
}

template <typename S, bool kVecTaps>
__global__ void __launch_bounds__(kThreads)
    field_forward_streaming_kernel(const FwdArgs<S> a, const EG3DDims d) {
  using L = StreamingLayout;
  using G = ForwardStage;
  constexpr int F = G::kF;
  float* sm = smem_base<float>();
  load_streaming_weights(a.w1, a.b1, a.w2, a.b2, sm);
  __syncthreads();
  float* stage = sm + G::offset;
  // The block walks tiles of blockDim.x consecutive points; every thread takes the same number of
  // steps (the barriers below), a thread past the end computing nothing. A thread's 32 features are
  // staged in shared memory and the block writes the tile's features out as one contiguous run:
  // written straight from the thread, each store instruction of a warp touched 32 cache lines
  // 128 bytes apart (one 32-byte sector each, 4 bytes used) instead of one.
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < a.total; base += step) {
    const int64_t i = base + threadIdx.x;
    if (i < a.total) {
      const int64_t b = i / a.N;
      float q[3];
      field::scale_point(a.xyz + 3 * i, a.inv_half_box, q);
      float f[L::kC], o[L::kOut];
      field::sample_mean<kVecTaps>(d, a.planes + b * a.s_batch, a.geom, a.axes, q, f);
      field::mlp_forward_streaming(d, sm + L::w1, sm + L::b1, sm + L::w2t, sm + L::b2, f, o);
      if (a.sigma) a.sigma[i] = Storage<S>::from_acc(o[0]);
      if (a.feat) {  // (a density-only call, as the occupancy grid's, skips the 32 sigmoids)
        float* row = stage + threadIdx.x * G::kStageRow;
#pragma unroll
        for (int k = 0; k < F; ++k) row[k] = field::feature_activation(o[k + 1]);
      }
    }
    if (a.feat) {  // the same for the whole block
      __syncthreads();
      const int n = int(a.total - base < int64_t(blockDim.x) ? a.total - base : int64_t(blockDim.x)) * F;
      S* out = a.feat + base * F;
      for (int e = threadIdx.x; e < n; e += blockDim.x)
        out[e] = Storage<S>::from_acc(stage[(e / F) * G::kStageRow + e % F]);
      __syncthreads();  // the next tile overwrites the stage
    }
  }
}

// Forward of the EG3D decoder size with half-precision storage (fp16, bf16) on tensor cores
// (sm_80+, FieldProblem::mlp = kMlpTensorCores): a thread per point gathers its 32 features in fp32
// as the streaming kernel does; each warp then rounds its 32 points' features to the storage type and
// runs the decoder as two matrix products with mma.sync (common shapes of field_mma.cuh):
//   hidden [32 x 64] = features [32 x 32] W1^T + b1,   outputs [32 x 40] = softplus(hidden) W2^T + b2
// (W2 padded from 33 to 40 rows with zeros), fp32 accumulation, the softplus applied to the first
// product's accumulators and rounded straight into the second's A fragments. The per-point FMA form
// does 4352 FMAs and ~1100 shared-memory weight loads a point; here a warp's 32 points take 72
// mma instructions. Numerics: the features and hidden units are rounded to the storage type, as
// PyTorch's own half-precision decoder rounds them (tests hold both to the same bound).
struct MmaLayout {
  static constexpr int kC = 32, kHid = 64, kOut = 33, kOutPad = 40;
  // Row strides in 2-byte elements. A fragment read touches rows r..r+7 at words 4 apart; strides of
  // 20 and 36 words put the 32 lanes' words in 32 distinct banks.
  static constexpr int kLdW1 = 40, kLdW2 = 72, kLdTile = 40;
  // Floats per staged output row. Lane (g, t) stores rows g and g+8 at columns 2t, 2t+1: an odd stride
  // of 37 keeps those stores at most 2-way bank conflicts (33: up to 4-way) and, being odd, the
  // per-lane sigma reads (stride apart) conflict-free.
  static constexpr int kLdStage = 37;
  static_assert(kLdStage >= kOut && kLdStage % 2 == 1, "a whole output row, odd stride");
  // Byte offsets, 16-byte aligned.
  static constexpr int w1 = 0;                                // [kHid][kLdW1] storage bits
  static constexpr int w2 = w1 + kHid * kLdW1 * 2;            // [kOutPad][kLdW2], rows >= kOut zero
  static constexpr int b1 = w2 + kOutPad * kLdW2 * 2;         // [kHid] float
  static constexpr int b2 = b1 + kHid * 4;                    // [kOutPad] float, zero padded
  static constexpr int warps = b2 + kOutPad * 4;
  // Per warp: the features tile [32][kLdTile] (2-byte), then, reusing it, the outputs [32][kLdStage] float.
  static constexpr int kWarpBytes = (32 * kLdStage * 4 + 15) / 16 * 16;
  static constexpr int bytes = warps + (kThreads / 32) * kWarpBytes;
  static_assert(32 * kLdTile * 2 <= kWarpBytes, "the features tile fits the warp's region");
  static_assert(w2 % 16 == 0 && b1 % 16 == 0 && b2 % 16 == 0 && warps % 16 == 0, "aligned regions");
};

template <typename S, bool kVecTaps>
__global__ void __launch_bounds__(kThreads)
    field_forward_mma_kernel(const FwdArgs<S> a, const EG3DDims d) {
  using M = MmaLayout;
  using W = typename Storage<S>::load;  // Half16 / BFloat16: the storage bits and their conversions
  const W* w1 = reinterpret_cast<const W*>(a.w1);
  const W* w2 = reinterpret_cast<const W*>(a.w2);
  unsigned char* sm = smem_base<unsigned char>();
  uint16_t* w1s = reinterpret_cast<uint16_t*>(sm + M::w1);
  uint16_t* w2s = reinterpret_cast<uint16_t*>(sm + M::w2);
  float* b1s = reinterpret_cast<float*>(sm + M::b1);
  float* b2s = reinterpret_cast<float*>(sm + M::b2);
  for (int e = threadIdx.x; e < M::kHid * M::kC; e += blockDim.x) w1s[(e / M::kC) * M::kLdW1 + e % M::kC] = w1[e].bits;
  for (int e = threadIdx.x; e < M::kOutPad * M::kHid; e += blockDim.x) {
    const int o = e / M::kHid, j = e % M::kHid;
    w2s[o * M::kLdW2 + j] = o < M::kOut ? w2[o * M::kHid + j].bits : 0;
  }
  for (int j = threadIdx.x; j < M::kHid; j += blockDim.x) b1s[j] = Storage<S>::to_acc(a.b1[j]);
  for (int o = threadIdx.x; o < M::kOutPad; o += blockDim.x) b2s[o] = o < M::kOut ? Storage<S>::to_acc(a.b2[o]) : 0.0f;
  __syncthreads();

  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  unsigned char* mine = sm + M::warps + warp * M::kWarpBytes;
  uint16_t* tile = reinterpret_cast<uint16_t*>(mine);
  float* stage = reinterpret_cast<float*>(mine);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  // Warps walk tiles of 32 consecutive points on their own (only __syncwarp below).
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + warp * 32; base < a.total; base += step) {
    const int64_t i = base + lane;
    float f[M::kC];
#pragma unroll
    for (int c = 0; c < M::kC; ++c) f[c] = 0.0f;
    if (i < a.total) {  // a lane past the end contributes a zero row
      float q[3];
      field::scale_point(a.xyz + 3 * i, a.inv_half_box, q);
      field::sample_mean<kVecTaps>(d, a.planes + (i / a.N) * a.s_batch, a.geom, a.axes, q, f);
    }
    uint32_t* row = reinterpret_cast<uint32_t*>(tile + lane * M::kLdTile);
#pragma unroll
    for (int c = 0; c < M::kC; c += 2) row[c / 2] = mma::pack2<W>(f[c], f[c + 1]);
    __syncwarp();
    uint32_t afr[2][2][4];  // [16-point half][16-channel block][register]
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int kb = 0; kb < 2; ++kb)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int r = mt * 16 + g + 8 * (j & 1), k = kb * 16 + 8 * (j >> 1) + 2 * t;
          afr[mt][kb][j] = *reinterpret_cast<const uint32_t*>(tile + r * M::kLdTile + k);
        }
    __syncwarp();  // the outputs below overwrite the tile
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float acc[M::kHid / 8][4];
#pragma unroll
      for (int nt = 0; nt < M::kHid / 8; ++nt) {
        const int col = nt * 8 + 2 * t;
        acc[nt][0] = acc[nt][2] = b1s[col];
        acc[nt][1] = acc[nt][3] = b1s[col + 1];
#pragma unroll
        for (int kb = 0; kb < 2; ++kb) {
          const uint16_t* w = w1s + (nt * 8 + g) * M::kLdW1 + kb * 16 + 2 * t;
          const uint32_t bfr[2] = {*reinterpret_cast<const uint32_t*>(w), *reinterpret_cast<const uint32_t*>(w + 8)};
          mma::mma_16816<W>(acc[nt], afr[mt][kb], bfr);
        }
      }
      // softplus, rounded into the second product's A fragments: k-block kb2 of the hidden units is
      // accumulator tiles 2 kb2 (registers 0, 1) and 2 kb2 + 1 (registers 2, 3).
      uint32_t hfr[M::kHid / 16][4];
#pragma unroll
      for (int kb2 = 0; kb2 < M::kHid / 16; ++kb2)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float* c = acc[2 * kb2 + half];
          hfr[kb2][2 * half] = mma::pack2<W>(field::softplus(c[0]), field::softplus(c[1]));
          hfr[kb2][2 * half + 1] = mma::pack2<W>(field::softplus(c[2]), field::softplus(c[3]));
        }
#pragma unroll
      for (int nt = 0; nt < M::kOutPad / 8; ++nt) {
        const int col = nt * 8 + 2 * t;
        float out[4] = {b2s[col], b2s[col + 1], b2s[col], b2s[col + 1]};
#pragma unroll
        for (int kb2 = 0; kb2 < M::kHid / 16; ++kb2) {
          const uint16_t* w = w2s + (nt * 8 + g) * M::kLdW2 + kb2 * 16 + 2 * t;
          const uint32_t bfr[2] = {*reinterpret_cast<const uint32_t*>(w), *reinterpret_cast<const uint32_t*>(w + 8)};
          mma::mma_16816<W>(out, hfr[kb2], bfr);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // only the outputs asked for (the occupancy grid's: sigma alone)
          const int r = mt * 16 + g + 8 * (e >> 1), o = col + (e & 1);
          if (o == 0 && a.sigma) stage[r * M::kLdStage] = out[e];
          if (o > 0 && o < M::kOut && a.feat) stage[r * M::kLdStage + o] = field::feature_activation(out[e]);
        }
      }
    }
    __syncwarp();
    // The warp's outputs, coalesced: sigma a point a lane, features as one run of n * 32 values.
    const int n = static_cast<int>(a.total - base < 32 ? a.total - base : 32);
    if (a.sigma && lane < n) a.sigma[base + lane] = Storage<S>::from_acc(stage[lane * M::kLdStage]);
    if (a.feat) {
      S* out = a.feat + base * (M::kOut - 1);
      for (int e = lane; e < n * (M::kOut - 1); e += 32)
        out[e] = Storage<S>::from_acc(stage[(e / (M::kOut - 1)) * M::kLdStage + 1 + e % (M::kOut - 1)]);
    }
    __syncwarp();  // the next tile overwrites the stage
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
// ------------------------------------------------------------------------------------------------

// Outer-product reduction of one tile:  for m < M, k < K:  sink(m, k, sum_{p < np} A[p][m] * B[p][k]),
// A rows at A + p * lda (lda >= round_up4(M), entries M .. round_up4(M)-1 readable), B rows at
// B + p * ldb (ldb >= K). Work item = (block of 4 consecutive m, one k); item it goes to thread
// it % blockDim.x, so every (m, k) is produced by exactly one thread, the same one for every tile.
// Consecutive threads take consecutive k (B reads conflict-free, A reads broadcast).
template <typename acc_t, typename Sink>
__device__ void tile_outer_products(const acc_t* A, int lda, int M, const acc_t* B, int ldb, int K,
                                    int np, Sink&& sink) {
  const int items = (M + 3) / 4 * K;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int m0 = it / K * 4;
    const int k = it - (m0 / 4) * K;
    acc_t s0 = acc_t(0), s1 = acc_t(0), s2 = acc_t(0), s3 = acc_t(0);
    for (int p = 0; p < np; ++p) {
      const acc_t bv = B[p * ldb + k];
      const acc_t* ar = A + p * lda + m0;
      s0 += ar[0] * bv;
      s1 += ar[1] * bv;
      s2 += ar[2] * bv;
      s3 += ar[3] * bv;
    }
    sink(m0, k, s0);
    if (m0 + 1 < M) sink(m0 + 1, k, s1);
    if (m0 + 2 < M) sink(m0 + 2, k, s2);
    if (m0 + 3 < M) sink(m0 + 3, k, s3);
  }
}

// Gradient of point i's raw decoder outputs o[0 .. OUT-1] from the incoming gradients of sigma and feat.
template <typename S, typename OArr, typename DArr>
__device__ __forceinline__ void output_grads(const BwdArgs<S>& a, int64_t i, int OUT, const OArr& o, DArr& dout) {
  using acc_t = typename Storage<S>::acc;
  const int F = OUT - 1;
  dout[0] = a.grad_sigma ? Storage<S>::to_acc(a.grad_sigma[i]) : acc_t(0);
  T3D_UNROLL
  for (int k = 1; k < OUT; ++k) {
    const acc_t g = a.grad_feat ? Storage<S>::to_acc(a.grad_feat[i * F + (k - 1)]) : acc_t(0);
    dout[k] = field::feature_activation_grad(o[k], g);
  }
}

// output_grads at the EG3D size, reading the row of grad_feat 16 bytes a load when it is aligned
// (a.vec_gfeat): each thread reads its own 128-byte (fp32) or 64-byte (half) row, so a warp's scalar
// loads each touched 32 cache lines; the vector loads take a quarter (fp32) or an eighth of them.
template <typename S, typename OArr, typename DArr>
__device__ __forceinline__ void output_grads_streaming(const BwdArgs<S>& a, int64_t i, const OArr& o, DArr& dout) {
  constexpr int F = StreamingLayout::kOut - 1;
  if (!a.grad_feat || !a.vec_gfeat) {
    output_grads(a, i, F + 1, o, dout);
    return;
  }
  dout[0] = a.grad_sigma ? Storage<S>::to_acc(a.grad_sigma[i]) : 0.0f;
  constexpr int kV = 16 / int(sizeof(S));
  const S* row = a.grad_feat + i * F;
  T3D_UNROLL
  for (int c = 0; c < F; c += kV) {
    S v[kV];
    field::load16(row + c, v);
    T3D_UNROLL
    for (int j = 0; j < kV; ++j) dout[1 + c + j] = field::feature_activation_grad(o[1 + c + j], Storage<S>::to_acc(v[j]));
  }
}

// Plane and point gradients of point i (batch element b, scaled position q) from df = dL/df, in one
// pass over the taps. The taps are found with the input planes' geometry (a.geom, also used to read
// them for d_xyz); the plane gradient goes to the same (plane, y, x, c) in the contiguous d_planes,
// whose geometry is a.out_geom.
template <typename S, typename Dims, typename FArr>
__device__ __forceinline__ void point_grads(const BwdArgs<S>& a, const Dims& d, int64_t b, int64_t i,
                                            const typename Storage<S>::acc q[3], const FArr& df) {
  using acc_t = typename Storage<S>::acc;
  if (!a.d_planes && !a.d_xyz) return;
  const typename Storage<S>::load* planes = a.planes + b * a.s_batch;
  acc_t* const dpb = a.d_planes ? a.d_planes + b * a.d_planes_batch : nullptr;
  acc_t dxyz[3];
  if (a.vec4_grad) {
    auto add4 = [dpb](int64_t off, acc_t v0, acc_t v1, acc_t v2, acc_t v3) {
      atomic_add4(dpb + off, v0, v1, v2, v3);
    };
    field::sample_mean_backward<true>(d, planes, a.geom, a.axes, q, a.inv_half_box, df,
                                      /*add_planes=*/dpb != nullptr, a.out_geom, add4,
                                      /*want_xyz=*/a.d_xyz != nullptr, dxyz);
  } else {
    auto add = [dpb](int64_t off, acc_t v) { atomicAdd(dpb + off, v); };
    field::sample_mean_backward(d, planes, a.geom, a.axes, q, a.inv_half_box, df,
                                /*add_planes=*/dpb != nullptr, a.out_geom, add,
                                /*want_xyz=*/a.d_xyz != nullptr, dxyz);
  }
  if (a.d_xyz) {
    a.d_xyz[3 * i + 0] = dxyz[0];
    a.d_xyz[3 * i + 1] = dxyz[1];
    a.d_xyz[3 * i + 2] = dxyz[2];
  }
}

template <typename S, typename Dims, typename WArr>
__device__ void backward_points(const BwdArgs<S>& a, const Dims& d, const WArr& w1t, const WArr& b1,
                                const WArr& w2t, const WArr& b2, const WArr& w1, const WArr& w2,
                                typename Storage<S>::acc* sm) {
  using acc_t = typename Storage<S>::acc;
  const int C = d.c(), HID = d.hid(), OUT = d.out();
  const SmemLayout& L = a.L;

  // Weight gradients: block-uniform flags (kernel arguments only), so the barriers below are reached
  // by every thread of the block or by none.
  const bool want_g1 = a.d_w1 != nullptr || a.d_b1 != nullptr;
  const bool want_g2 = a.d_w2 != nullptr || a.d_b2 != nullptr;
  const bool want_w = want_g1 || want_g2;
  acc_t* Fa = want_w ? sm + L.fa : nullptr;  // [T][ldf]: f[0..C-1], 1 at column C (bias)
  acc_t* Ha = want_w ? sm + L.ha : nullptr;  // [T][ldh]: h[0..HID-1], 1 at column HID (bias)
  acc_t* Dp = want_w ? sm + L.dp : nullptr;  // [T][ldp]: dpre[0..HID-1], zeros after
  acc_t* Dq = want_w ? sm + L.dq : nullptr;  // [T][ldo]: dout[0..OUT-1], zeros after
  acc_t* G1 = (want_w && L.g1 >= 0) ? sm + L.g1 : nullptr;  // [HID][C + 1], null: per-tile atomics
  acc_t* G2 = (want_w && L.g2 >= 0) ? sm + L.g2 : nullptr;  // [OUT][HID + 1]

  acc_t* const d_w1 = a.d_w1;
  acc_t* const d_b1 = a.d_b1;
  acc_t* const d_w2 = a.d_w2;
  acc_t* const d_b2 = a.d_b2;
  // (j, c) of [dW1 | db1]: c < C -> d_w1[j][c], c == C -> d_b1[j].
  auto put1 = [=](int j, int c, acc_t v) {
    if (c < C) {
      if (d_w1) atomicAdd(d_w1 + j * C + c, v);
    } else if (d_b1) {
      atomicAdd(d_b1 + j, v);
    }
  };
  // (k, j) of [dW2 | db2]: j < HID -> d_w2[k][j], j == HID -> d_b2[k].
  auto put2 = [=](int k, int j, acc_t v) {
    if (j < HID) {
      if (d_w2) atomicAdd(d_w2 + k * HID + j, v);
    } else if (d_b2) {
      atomicAdd(d_b2 + k, v);
    }
  };
  auto sink1 = [&](int j, int c, acc_t v) {
    if (G1) G1[j * (C + 1) + c] += v;
    else put1(j, c, v);
  };
  auto sink2 = [&](int k, int j, acc_t v) {
    if (G2) G2[k * (HID + 1) + j] += v;
    else put2(k, j, v);
  };

  const int T = blockDim.x;
  const int t = threadIdx.x;
  for (int64_t start = int64_t(blockIdx.x) * T; start < a.total; start += int64_t(gridDim.x) * T) {
    const int64_t i = start + t;
    if (i < a.total) {
      const int64_t b = i / a.N;
      const typename Storage<S>::load* planes = a.planes + b * a.s_batch;
      acc_t q[3];
      field::scale_point(a.xyz + 3 * i, a.inv_half_box, q);
      acc_t f[Dims::kMaxC], pre[Dims::kMaxHid], h[Dims::kMaxHid], o[Dims::kMaxOut];
      field::sample_mean(d, planes, a.geom, a.axes, q, f);
      field::mlp_forward<Dims, acc_t>(d, w1t, b1, w2t, b2, f, pre, h, o);

      acc_t dout[Dims::kMaxOut];
      output_grads(a, i, OUT, o, dout);

      if (want_w) {
        acc_t* fr = Fa + t * L.ldf;
        for (int c = 0; c < C; ++c) fr[c] = f[c];
        fr[C] = acc_t(1);
        acc_t* hr = Ha + t * L.ldh;
        for (int j = 0; j < HID; ++j) hr[j] = h[j];
        hr[HID] = acc_t(1);
      }

      acc_t df[Dims::kMaxC];
      field::mlp_backward<Dims, acc_t>(d, w1, w2, dout, pre, df);  // pre now holds dpre

      if (want_w) {
        acc_t* pr = Dp + t * L.ldp;
        for (int j = 0; j < HID; ++j) pr[j] = pre[j];
        for (int j = HID; j < L.ldp; ++j) pr[j] = acc_t(0);
        acc_t* qr = Dq + t * L.ldo;
        for (int k = 0; k < OUT; ++k) qr[k] = dout[k];
        for (int k = OUT; k < L.ldo; ++k) qr[k] = acc_t(0);
      }

      point_grads(a, d, b, i, q, df);
    } else if (want_w) {
      // Past the end (last tile only): a zero row contributes nothing.
      for (int c = 0; c < L.ldf; ++c) Fa[t * L.ldf + c] = acc_t(0);
      for (int j = 0; j < L.ldh; ++j) Ha[t * L.ldh + j] = acc_t(0);
      for (int j = 0; j < L.ldp; ++j) Dp[t * L.ldp + j] = acc_t(0);
      for (int k = 0; k < L.ldo; ++k) Dq[t * L.ldo + k] = acc_t(0);
    }

    if (want_w) {
      __syncthreads();  // all rows of the tile written
      const int64_t left = a.total - start;
      const int np = left < T ? int(left) : T;  // rows np .. T-1 are zero rows anyway; skip them
      if (want_g1) tile_outer_products(Dp, L.ldp, HID, Fa, L.ldf, C + 1, np, sink1);
      if (want_g2) tile_outer_products(Dq, L.ldo, OUT, Ha, L.ldh, HID + 1, np, sink2);
      __syncthreads();  // tile buffers free for the next tile
    }
  }

  if (want_w) {
    __syncthreads();  // (already synchronised by the loop; kept for clarity)
    if (G1 && want_g1) {
      for (int e = threadIdx.x; e < HID * (C + 1); e += blockDim.x) {
        const int j = e / (C + 1), c = e - j * (C + 1);
        put1(j, c, G1[e]);
      }
    }
    if (G2 && want_g2) {
      for (int e = threadIdx.x; e < OUT * (HID + 1); e += blockDim.x) {
        const int k = e / (HID + 1), j = e - k * (HID + 1);
        put2(k, j, G2[e]);
      }
    }
  }
}

template <typename S, typename Dims, bool kSmemWeights>
__global__ void __launch_bounds__(kThreads) field_backward_kernel(const BwdArgs<S> a, const Dims d) {
  using acc_t = typename Storage<S>::acc;
  acc_t* sm = smem_base<acc_t>();
  const int C = d.c(), HID = d.hid(), OUT = d.out();
  if constexpr (kSmemWeights) load_weights<S>(a.w1, a.b1, a.w2, a.b2, C, HID, OUT, a.L, sm);
  if (a.L.g1 >= 0) {
    for (int e = threadIdx.x; e < HID * (C + 1); e += blockDim.x) sm[a.L.g1 + e] = acc_t(0);
  }
  if (a.L.g2 >= 0) {
    for (int e = threadIdx.x; e < OUT * (HID + 1); e += blockDim.x) sm[a.L.g2 + e] = acc_t(0);
  }
  __syncthreads();
  if constexpr (kSmemWeights) {
    const acc_t* w1t = sm + a.L.w1t;
    const acc_t* w2t = sm + a.L.w2t;
    const acc_t* b1 = sm + a.L.b1;
    const acc_t* b2 = sm + a.L.b2;
    const acc_t* w1 = sm + a.L.w1;
    const acc_t* w2 = sm + a.L.w2;
    backward_points(a, d, w1t, b1, w2t, b2, w1, w2, sm);
  } else {
    const GlobalWeights<S> w1t{a.w1, HID, 1, C};
    const GlobalWeights<S> w2t{a.w2, OUT, 1, HID};
    const GlobalWeights<S> b1{a.b1, 1, 1, 0};
    const GlobalWeights<S> b2{a.b2, 1, 1, 0};
    const GlobalWeights<S> w1{a.w1, 1, 1, 0};
    const GlobalWeights<S> w2{a.w2, 1, 1, 0};
    backward_points(a, d, w1t, b1, w2t, b2, w1, w2, sm);
  }
}

// Backward of the EG3D decoder size with float accumulation (fp32, fp16, bf16): a thread per point
// of [begin, begin + count) recomputes the forward and runs the decoder backward one hidden unit at a
// time (mlp_backward_streaming), so it keeps ~100 values live instead of backward_points' ~250 (which
// cost 255 registers, a stack frame, and two blocks per SM; with weight gradients the tile buffers
// left one). Plane and point gradients as backward_points. The decoder's weight gradients are not
// reduced here: with kRows each point writes the factors they are sums of into `rows`, feature-major
// (column r = point begin + r, row stride ld; coalesced across a warp), and the caller reduces them
// with two GEMMs (layout: BackwardRows in triplane_field_cuda.h).
template <typename S, bool kVecTaps, bool kRows>
__global__ void __launch_bounds__(kThreads)
    field_backward_streaming_kernel(const BwdArgs<S> a, const EG3DDims d, int64_t begin, int64_t count,
                                    float* rows, int64_t ld) {
  using L = StreamingLayout;
  using R = BackwardRows;
  float* sm = smem_base<float>();
  load_streaming_weights(a.w1, a.b1, a.w2, a.b2, sm);
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < count; r += stride) {
    const int64_t i = begin + r;
    const int64_t b = i / a.N;
    float q[3];
    field::scale_point(a.xyz + 3 * i, a.inv_half_box, q);
    float f[L::kC], o[L::kOut], dout[L::kOut4];
    field::sample_mean<kVecTaps>(d, a.planes + b * a.s_batch, a.geom, a.axes, q, f);
    // With kRows, this point's column of the rows: h as the recompute makes it (not a second
    // softplus), dpre as the backward makes it, then f, dout and the bias columns' ones.
    float* const col = kRows ? rows + r : nullptr;
    field::mlp_forward_streaming(d, sm + L::w1, sm + L::b1, sm + L::w2t, sm + L::b2, f, o, [=](int j, float h) {
      if constexpr (kRows) col[(R::h + j) * ld] = h;
    });
    output_grads_streaming(a, i, o, dout);
    T3D_UNROLL
    for (int k = L::kOut; k < L::kOut4; ++k) dout[k] = 0.0f;
    float df[L::kC];
    field::mlp_backward_streaming(d, sm + L::w1, sm + L::b1, sm + L::w2t, f, dout, df, [=](int j, float dpre) {
      if constexpr (kRows) col[(R::dpre + j) * ld] = dpre;
    });
    if constexpr (kRows) {
      T3D_UNROLL
      for (int c = 0; c < L::kC; ++c) col[(R::f + c) * ld] = f[c];
      col[(R::f + L::kC) * ld] = 1.0f;
      col[(R::h + L::kHid) * ld] = 1.0f;
      T3D_UNROLL
      for (int k = 0; k < L::kOut; ++k) col[(R::dout + k) * ld] = dout[k];
    }
    point_grads(a, d, b, i, q, df);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.
// ------------------------------------------------------------------------------------------------
using GenericDims = field::BoundedDims<kMaxC, kMaxHid, kMaxOut>;

// The EG3D instance always keeps its weights in shared memory (at most 67 KB in fp64). Should that not
// fit a device, the generic instance (which can read them from global memory) runs instead; this keeps
// the fully unrolled EG3D code from being compiled with the slow global-memory weight view.
template <typename Dims>
constexpr bool kIsEG3D = false;
template <>
constexpr bool kIsEG3D<EG3DDims> = true;

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // bytes of dynamic + static shared memory a block may opt in to
};

cudaError_t device_info(DeviceInfo& info) {
  int dev = 0;
  cudaError_t err = device_attribute(cudaDevAttrMultiProcessorCount, dev, info.sms);
  if (err != cudaSuccess) return err;
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, info.smem_optin);
}

// Whether `kernel` runs field_mma.cuh's mma.sync on the current device: the device has them
// (compute capability 8.0+) and the kernel's code was generated for them (its PTX is sm_80+; a
// build for older architectures JIT-compiled here would run the slow warp-shuffle form).
cudaError_t tensor_cores_available(const void* kernel, bool& yes) {
  int dev = 0, major = 0, ptx = 0;
  cudaError_t err = device_attribute(cudaDevAttrComputeCapabilityMajor, dev, major);
  if (err != cudaSuccess) return err;
  err = launch_cache::lookup({kernel, dev, -2, 0}, ptx, [&](int& v) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
    if (e == cudaSuccess) v = attr.ptxVersion;  // attr is unset when the query fails
    return e;
  });
  yes = err == cudaSuccess && major >= 8 && ptx >= 80;
  return err;
}

// Opts the kernel in to `bytes` of dynamic shared memory and returns how many blocks to launch:
// enough to fill the device once (grid-stride loops take the rest), at most one per `T` points.
// Both queries are answered once per device and kernel (common/grid.cuh).
template <typename Kernel>
cudaError_t prepare_launch(Kernel kernel, int T, size_t bytes, int64_t total, const DeviceInfo& info,
                           int& blocks) {
  int per_sm = 0;
  const cudaError_t err = blocks_per_sm(reinterpret_cast<const void*>(kernel), T, bytes, per_sm);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) per_sm = 1;  // the launch itself will report what does not fit
  const int64_t needed = (total + T - 1) / T;
  const int64_t full = int64_t(per_sm) * (info.sms > 0 ? info.sms : 1);
  blocks = int(needed < full ? needed : full);
  return cudaSuccess;
}

cudaError_t validate(const FieldProblem& p) {
  if (p.C < 1 || p.HID < 1 || p.OUT < 1) return cudaErrorInvalidValue;
  if (p.C > kMaxC || p.HID > kMaxHid || p.OUT > kMaxOut) return cudaErrorInvalidValue;
  if (p.B < 0 || p.N < 0 || p.H < 0 || p.W < 0) return cudaErrorInvalidValue;
  if (p.axes != field::kAxesFixed && p.axes != field::kAxesEG3D) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case FieldDType::kF32:
    case FieldDType::kF16:
    case FieldDType::kBF16:
    case FieldDType::kF64:
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

bool pointers_ok(const FieldProblem& p) {
  const bool planes_ok = p.planes != nullptr || p.H == 0 || p.W == 0;
  return planes_ok && p.xyz && p.w1 && p.b1 && p.w2 && p.b2;
}

template <typename S, typename Args>
void fill_common(const FieldProblem& p, Args& a) {
  using acc_t = typename Storage<S>::acc;
  a.planes = static_cast<const typename Storage<S>::load*>(p.planes);
  a.s_batch = p.s_batch;
  a.geom = field::PlaneGeom{p.H, p.W, p.s_plane, p.s_y, p.s_x};
  a.xyz = static_cast<const typename Storage<S>::pos*>(p.xyz);
  a.N = p.N;
  a.total = int64_t(p.B) * p.N;
  a.w1 = static_cast<const S*>(p.w1);
  a.b1 = static_cast<const S*>(p.b1);
  a.w2 = static_cast<const S*>(p.w2);
  a.b2 = static_cast<const S*>(p.b2);
  a.inv_half_box = acc_t(2.0 / p.box_warp);
  a.axes = p.axes;
}

template <typename S>
void fill_backward(const FieldProblem& p, const void* grad_sigma, const void* grad_feat, void* d_planes,
                   void* d_xyz, void* d_w1, void* d_b1, void* d_w2, void* d_b2, BwdArgs<S>& a) {
  using acc_t = typename Storage<S>::acc;
  fill_common<S>(p, a);
  const int64_t plane_elems = int64_t(p.H) * p.W * p.C;
  a.out_geom = field::PlaneGeom{p.H, p.W, plane_elems, int64_t(p.W) * p.C, int64_t(p.C)};
  a.d_planes_batch = 3 * plane_elems;
  a.grad_sigma = static_cast<const S*>(grad_sigma);
  a.grad_feat = static_cast<const S*>(grad_feat);
  a.d_planes = static_cast<acc_t*>(d_planes);
  a.d_xyz = static_cast<acc_t*>(d_xyz);
  a.d_w1 = static_cast<acc_t*>(d_w1);
  a.d_b1 = static_cast<acc_t*>(d_b1);
  a.d_w2 = static_cast<acc_t*>(d_w2);
  a.d_b2 = static_cast<acc_t*>(d_b2);
  a.vec4_grad = std::is_same<acc_t, float>::value && p.C % 4 == 0 &&
                reinterpret_cast<uintptr_t>(d_planes) % 16 == 0;
  a.vec_gfeat = !std::is_same<S, double>::value && reinterpret_cast<uintptr_t>(grad_feat) % 16 == 0 &&
                (int64_t(p.OUT - 1) * int64_t(sizeof(S))) % 16 == 0;
}

// Planes whose texels all start 16-byte aligned: 16 bytes of channels per load (4 floats or 8 halves).
template <typename S>
bool vec_taps(const FieldProblem& p) {
  using load_t = typename Storage<S>::load;
  constexpr int64_t kV = 16 / int64_t(sizeof(load_t));
  return (std::is_same<S, float>::value || sizeof(load_t) == 2) && reinterpret_cast<uintptr_t>(p.planes) % 16 == 0 &&
         p.C % kV == 0 && p.s_batch % kV == 0 && p.s_plane % kV == 0 && p.s_y % kV == 0 && p.s_x % kV == 0;
}

template <typename S, typename Dims>
cudaError_t forward_dims(const FieldProblem& p, const Dims& d, void* sigma, void* feat,
                         cudaStream_t stream) {
  using acc_t = typename Storage<S>::acc;
  DeviceInfo info;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;

  FwdArgs<S> a;
  fill_common<S>(p, a);
  a.sigma = static_cast<S*>(sigma);
  a.feat = static_cast<S*>(feat);

  const int T = kThreads;
  int blocks = 0;
  if constexpr (kIsEG3D<Dims> && (std::is_same<S, __half>::value || std::is_same<S, __nv_bfloat16>::value)) {
    auto kernel = vec_taps<S>(p) ? field_forward_mma_kernel<S, true> : field_forward_mma_kernel<S, false>;
    bool tensor_cores = false;
    if (p.mlp == kMlpTensorCores) {
      err = tensor_cores_available(reinterpret_cast<const void*>(kernel), tensor_cores);
      if (err != cudaSuccess) return err;
    }
    if (tensor_cores && size_t(MmaLayout::bytes) <= size_t(info.smem_optin)) {
      const size_t bytes = MmaLayout::bytes;
      err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
      if (err != cudaSuccess) return err;
      kernel<<<blocks, T, bytes, stream>>>(a, d);
      return cudaGetLastError();
    }
  }
  if constexpr (kIsEG3D<Dims> && std::is_same<acc_t, float>::value) {
    const size_t bytes = size_t(ForwardStage::elems) * sizeof(float);
    if (bytes <= size_t(info.smem_optin)) {
      auto kernel = vec_taps<S>(p) ? field_forward_streaming_kernel<S, true> : field_forward_streaming_kernel<S, false>;
      err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
      if (err != cudaSuccess) return err;
      kernel<<<blocks, T, bytes, stream>>>(a, d);
      return cudaGetLastError();
    }
  }
  a.L = make_layout(p.C, p.HID, p.OUT, T, /*weights=*/true, /*backward=*/false, false, false);
  size_t bytes = size_t(a.L.elems) * sizeof(acc_t);
  if (bytes <= size_t(info.smem_optin)) {
    auto kernel = field_forward_kernel<S, Dims, true>;
    err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
    if (err != cudaSuccess) return err;
    kernel<<<blocks, T, bytes, stream>>>(a, d);
  } else if constexpr (kIsEG3D<Dims>) {
    return forward_dims<S>(p, GenericDims{p.C, p.HID, p.OUT}, sigma, feat, stream);
  } else {
    a.L = make_layout(p.C, p.HID, p.OUT, T, false, false, false, false);
    bytes = 0;
    auto kernel = field_forward_kernel<S, Dims, false>;
    err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
    if (err != cudaSuccess) return err;
    kernel<<<blocks, T, bytes, stream>>>(a, d);
  }
  return cudaGetLastError();
}

template <typename S>
cudaError_t forward_typed(const FieldProblem& p, void* sigma, void* feat, cudaStream_t stream) {
  if (p.C == 32 && p.HID == 64 && p.OUT == 33) return forward_dims<S>(p, EG3DDims{}, sigma, feat, stream);
  return forward_dims<S>(p, GenericDims{p.C, p.HID, p.OUT}, sigma, feat, stream);
}

template <typename S, typename Dims>
cudaError_t backward_dims(const FieldProblem& p, const Dims& d, const void* grad_sigma,
                          const void* grad_feat, void* d_planes, void* d_xyz, void* d_w1, void* d_b1,
                          void* d_w2, void* d_b2, cudaStream_t stream) {
  using acc_t = typename Storage<S>::acc;
  DeviceInfo info;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;

  BwdArgs<S> a;
  fill_backward<S>(p, grad_sigma, grad_feat, d_planes, d_xyz, d_w1, d_b1, d_w2, d_b2, a);
  const bool want_w = d_w1 || d_b1 || d_w2 || d_b2;

  // Pick the first configuration that fits the device's shared memory. Preference: tiles of at least
  // 32 points; then weights in shared memory (every FMA reads one); then block accumulators (without
  // them the tile sums go to global atomics once per tile instead of once per block); then the
  // largest tile. Without weight gradients there are no tiles and no accumulators: T = kThreads.
  struct Option {
    bool smem_weights, block_acc;
  };
  const Option options[4] = {{true, true}, {true, false}, {false, true}, {false, false}};
  const int t_first[2] = {kThreads, 16}, t_last[2] = {32, 1};
  bool smem_weights = true;
  int T = kThreads;
  bool found = false;
  for (int pass = 0; pass < 2 && !found; ++pass) {
    for (int o = 0; o < 4 && !found; ++o) {
      if (kIsEG3D<Dims> && !options[o].smem_weights) continue;
      for (int tt = t_first[pass]; tt >= t_last[pass] && !found; tt /= 2) {
        if (!want_w && tt != kThreads) break;
        const SmemLayout L = make_layout(p.C, p.HID, p.OUT, tt, options[o].smem_weights,
                                         /*backward=*/true, /*tiles=*/want_w, options[o].block_acc);
        if (size_t(L.elems) * sizeof(acc_t) <= size_t(info.smem_optin)) {
          a.L = L;
          smem_weights = options[o].smem_weights;
          T = tt;
          found = true;
        }
      }
    }
  }
  if (!found) {
    if constexpr (kIsEG3D<Dims>) {
      return backward_dims<S>(p, GenericDims{p.C, p.HID, p.OUT}, grad_sigma, grad_feat, d_planes, d_xyz,
                              d_w1, d_b1, d_w2, d_b2, stream);
    }
    return cudaErrorInvalidConfiguration;
  }
  const size_t bytes = size_t(a.L.elems) * sizeof(acc_t);

  int blocks = 0;
  if (smem_weights) {
    auto kernel = field_backward_kernel<S, Dims, true>;
    err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
    if (err != cudaSuccess) return err;
    kernel<<<blocks, T, bytes, stream>>>(a, d);
  } else if constexpr (!kIsEG3D<Dims>) {
    auto kernel = field_backward_kernel<S, Dims, false>;
    err = prepare_launch(kernel, T, bytes, a.total, info, blocks);
    if (err != cudaSuccess) return err;
    kernel<<<blocks, T, bytes, stream>>>(a, d);
  }
  return cudaGetLastError();
}

// The EG3D sizes with float accumulation normally take the streaming backward
// (field_backward_streaming); called here, they run the generic instance rather than compiling an
// unrolled one that nothing uses.
template <typename S>
cudaError_t backward_typed(const FieldProblem& p, const void* grad_sigma, const void* grad_feat,
                           void* d_planes, void* d_xyz, void* d_w1, void* d_b1, void* d_w2, void* d_b2,
                           cudaStream_t stream) {
  if constexpr (std::is_same<S, double>::value) {
    if (p.C == 32 && p.HID == 64 && p.OUT == 33) {
      return backward_dims<S>(p, EG3DDims{}, grad_sigma, grad_feat, d_planes, d_xyz, d_w1, d_b1, d_w2,
                              d_b2, stream);
    }
  }
  return backward_dims<S>(p, GenericDims{p.C, p.HID, p.OUT}, grad_sigma, grad_feat, d_planes, d_xyz,
                          d_w1, d_b1, d_w2, d_b2, stream);
}

// The streaming backward kernel instance for p's storage and alignment, with or without rows.
template <typename S>
auto backward_streaming_kernel(const FieldProblem& p, bool rows) {
  const bool vec = vec_taps<S>(p);
  return rows ? (vec ? field_backward_streaming_kernel<S, true, true>
                     : field_backward_streaming_kernel<S, false, true>)
              : (vec ? field_backward_streaming_kernel<S, true, false>
                     : field_backward_streaming_kernel<S, false, false>);
}

template <typename S>
cudaError_t backward_streaming_typed(const FieldProblem& p, int64_t begin, int64_t count,
                                     const void* grad_sigma, const void* grad_feat, void* d_planes,
                                     void* d_xyz, float* rows, int64_t ld, cudaStream_t stream) {
  DeviceInfo info;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;
  BwdArgs<S> a;
  fill_backward<S>(p, grad_sigma, grad_feat, d_planes, d_xyz, nullptr, nullptr, nullptr, nullptr, a);
  auto kernel = backward_streaming_kernel<S>(p, rows != nullptr);
  const size_t bytes = size_t(StreamingLayout::elems) * sizeof(float);
  int blocks = 0;
  err = prepare_launch(kernel, kThreads, bytes, count, info, blocks);
  if (err != cudaSuccess) return err;
  kernel<<<blocks, kThreads, bytes, stream>>>(a, EG3DDims{}, begin, count, rows, ld);
  return cudaGetLastError();
}

}  // namespace

cudaError_t field_forward(const FieldProblem& p, void* sigma, void* feat, cudaStream_t stream) {
  cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  if (!pointers_ok(p)) return cudaErrorInvalidValue;
  if (!sigma && !feat) return cudaSuccess;
  return dispatch_storage<__half, __nv_bfloat16>(p.dtype, [&](auto s) {
    return forward_typed<decltype(s)>(p, sigma, feat, stream);
  });
}

cudaError_t field_backward(const FieldProblem& p, const void* grad_sigma, const void* grad_feat,
                           void* d_planes, void* d_xyz, void* d_w1, void* d_b1, void* d_w2, void* d_b2,
                           cudaStream_t stream) {
  cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  if (p.B == 0 || p.N == 0) return cudaSuccess;
  if (!pointers_ok(p)) return cudaErrorInvalidValue;
  // Nothing wanted, or no incoming gradient: every output stays at the caller's zeros.
  if (!d_planes && !d_xyz && !d_w1 && !d_b1 && !d_w2 && !d_b2) return cudaSuccess;
  if (!grad_sigma && !grad_feat) return cudaSuccess;
  return dispatch_storage<__half, __nv_bfloat16>(p.dtype, [&](auto s) {
    return backward_typed<decltype(s)>(p, grad_sigma, grad_feat, d_planes, d_xyz, d_w1, d_b1, d_w2, d_b2, stream);
  });
}

bool field_backward_streaming_applies(const FieldProblem& p) {
  return p.dtype != FieldDType::kF64 && p.C == BackwardRows::C && p.HID == BackwardRows::HID &&
         p.OUT == BackwardRows::OUT;
}

cudaError_t field_backward_streaming(const FieldProblem& p, int64_t begin, int64_t count,
                                     const void* grad_sigma, const void* grad_feat, void* d_planes,
                                     void* d_xyz, float* rows, int64_t ld, cudaStream_t stream) {
  cudaError_t err = validate(p);
  if (err != cudaSuccess) return err;
  if (!field_backward_streaming_applies(p)) return cudaErrorInvalidValue;
  if (begin < 0 || count < 0 || begin + count > int64_t(p.B) * p.N) return cudaErrorInvalidValue;
  if (rows && ld < count) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  if (!pointers_ok(p)) return cudaErrorInvalidValue;
  if (!d_planes && !d_xyz && !rows) return cudaSuccess;
  return dispatch_storage<__half, __nv_bfloat16>(p.dtype, [&](auto s) {
    using S = decltype(s);
    if constexpr (std::is_same<S, double>::value) {
      return cudaErrorInvalidValue;  // (excluded by applies() above)
    } else {
      return backward_streaming_typed<S>(p, begin, count, grad_sigma, grad_feat, d_planes, d_xyz, rows, ld, stream);
    }
  });
}

cudaError_t field_backward_streaming_wave(const FieldProblem& p, int64_t& points) {
  points = 0;
  if (!field_backward_streaming_applies(p)) return cudaErrorInvalidValue;
  return dispatch_storage<__half, __nv_bfloat16>(p.dtype, [&](auto s) -> cudaError_t {
    using S = decltype(s);
    if constexpr (std::is_same<S, double>::value) {
      return cudaErrorInvalidValue;  // (excluded by applies() above)
    } else {
      DeviceInfo info;
      cudaError_t err = device_info(info);
      if (err != cudaSuccess) return err;
      // The grid backward_streaming_typed launches for more points than fit at once: every resident block.
      int blocks = 0;
      err = prepare_launch(backward_streaming_kernel<S>(p, true), kThreads,
                           size_t(StreamingLayout::elems) * sizeof(float), int64_t(1) << 40, info, blocks);
      points = int64_t(blocks) * kThreads;
      return err;
    }
  });
}

}  // namespace cuda
}  // namespace talk3d
