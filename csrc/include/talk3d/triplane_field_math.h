// Per-point math of the fused triplane field, written once for the C++ CPU kernels and the CUDA
// kernels (host and device). Numerics follow EG3D (see shared/reference/numerics.md):
//   q = xyz * 2 / box_warp;  three planes read (u, v) pairs of q (convention `fixed` or `eg3d`);
//   bilinear taps exactly as grid_sample(align_corners=False, padding_mode='zeros');
//   f = mean of the three C-vectors;  pre = W1 f + b1;  h = softplus(pre) (torch's threshold 20);
//   o = W2 h + b2;  sigma = o[0];  feat = sigmoid(o[1:]) * (1 + 2 eps) - eps.
//
// Arrays are passed as templates (`Arr&`) so callers can hand in registers, local arrays or strided
// shared-memory views; sizes come from a Dims object that is either compile-time (loops unroll) or
// run-time with a compile-time bound (for the generic kernel instance).
#pragma once

#include "talk3d/common.h"

namespace talk3d {
namespace field {

enum PlaneAxes : int { kAxesFixed = 0, kAxesEG3D = 1 };

constexpr double kFeatureEps = 0.001;
constexpr double kSoftplusThreshold = 20.0;  // torch.nn.functional.softplus default

// Sizes known at compile time: the EG3D decoder (C = 32, hidden = 64, out = 33) is instantiated so.
template <int C, int HID, int OUT>
struct StaticDims {
  static constexpr int kMaxC = C, kMaxHid = HID, kMaxOut = OUT;
  T3D_HD constexpr int c() const { return C; }
  T3D_HD constexpr int hid() const { return HID; }
  T3D_HD constexpr int out() const { return OUT; }
};

// Sizes known at run time, bounded so per-point arrays can live on the stack.
template <int MAXC, int MAXHID, int MAXOUT>
struct BoundedDims {
  static constexpr int kMaxC = MAXC, kMaxHid = MAXHID, kMaxOut = MAXOUT;
  int c_, hid_, out_;
  T3D_HD int c() const { return c_; }
  T3D_HD int hid() const { return hid_; }
  T3D_HD int out() const { return out_; }
};

// Geometry of the channels-last planes of one batch element: element (plane, y, x, c) sits at
// plane * s_plane + y * s_y + x * s_x + c (the channel stride is 1).
struct PlaneGeom {
  int H, W;
  int64_t s_plane, s_y, s_x;
};

// Which components of the scaled point q each plane reads as (u -> width, v -> height).
T3D_HD void plane_axes(int axes, int plane, int& iu, int& iv) {
  if (plane == 0) {
    iu = 0; iv = 1;
  } else if (plane == 1) {
    iu = 0; iv = 2;
  } else {
    iu = 2; iv = (axes == kAxesEG3D) ? 0 : 1;  // eg3d's third plane re-reads x (eg3d issue #67)
  }
}

// The four bilinear taps of one plane: element offsets (or -1 when outside the plane) and weights.
template <typename acc_t>
struct Taps {
  int64_t off[4];   // (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1) in the sampled planes' layout
  acc_t w[4];
  acc_t tx, ty;     // fractional parts, for the coordinate gradient
  int x0, y0;

  // Offset of tap k in another layout (e.g. a contiguous gradient buffer); only for in-plane taps.
  T3D_HD int64_t offset_in(const PlaneGeom& g, int plane, int k) const {
    return int64_t(plane) * g.s_plane + int64_t(y0 + (k >> 1)) * g.s_y +
           int64_t(x0 + (k & 1)) * g.s_x;
  }
};

// grid_sample's un-normalisation for align_corners=False: u in [-1, 1] -> pixel coordinate along an
// axis of `size` pixels. The clamp keeps NaN (-> -2) or huge points from overflowing the int
// conversion; beyond [-2, size+1] every tap is outside anyway, so the value and the gradient (both
// 0) are unchanged.
template <typename acc_t>
T3D_HD acc_t pixel_coord(acc_t u, int size) {
  return t3d_clamp(((u + acc_t(1)) * acc_t(size) - acc_t(1)) * acc_t(0.5), acc_t(-2), acc_t(size + 1));
}

template <typename acc_t>
T3D_HD Taps<acc_t> make_taps(acc_t u, acc_t v, const PlaneGeom& g, int plane) {
  const acc_t ix = pixel_coord(u, g.W), iy = pixel_coord(v, g.H);
  const acc_t fx = t3d_floor(ix), fy = t3d_floor(iy);
  const int x0 = int(fx), y0 = int(fy);
  Taps<acc_t> t;
  t.x0 = x0;
  t.y0 = y0;
  t.tx = ix - fx;
  t.ty = iy - fy;
  t.w[0] = (acc_t(1) - t.tx) * (acc_t(1) - t.ty);
  t.w[1] = t.tx * (acc_t(1) - t.ty);
  t.w[2] = (acc_t(1) - t.tx) * t.ty;
  t.w[3] = t.tx * t.ty;
  const bool xin0 = x0 >= 0 && x0 < g.W, xin1 = x0 + 1 >= 0 && x0 + 1 < g.W;
  const bool yin0 = y0 >= 0 && y0 < g.H, yin1 = y0 + 1 >= 0 && y0 + 1 < g.H;
  const int64_t base = int64_t(plane) * g.s_plane;
  t.off[0] = (xin0 && yin0) ? base + y0 * g.s_y + x0 * g.s_x : -1;
  t.off[1] = (xin1 && yin0) ? base + y0 * g.s_y + (x0 + 1) * g.s_x : -1;
  t.off[2] = (xin0 && yin1) ? base + (y0 + 1) * g.s_y + x0 * g.s_x : -1;
  t.off[3] = (xin1 && yin1) ? base + (y0 + 1) * g.s_y + (x0 + 1) * g.s_x : -1;
  return t;
}

// Scale a point into [-1, 1]^3 (EG3D multiplies by 2 / box_warp).
template <typename acc_t, typename pos_t>
T3D_HD void scale_point(const pos_t* xyz, acc_t inv_half_box, acc_t q[3]) {
  q[0] = acc_t(xyz[0]) * inv_half_box;
  q[1] = acc_t(xyz[1]) * inv_half_box;
  q[2] = acc_t(xyz[2]) * inv_half_box;
}

// Four consecutive values from a 16-byte aligned address: one vector load where float4 exists (the
// GPU, and the CPU emulation of the CUDA kernels, which includes the CUDA headers).
template <typename T>
T3D_HD void load4(const T* p, T v[4]) {
  v[0] = p[0];
  v[1] = p[1];
  v[2] = p[2];
  v[3] = p[3];
}
T3D_HD void load4(const float* p, float v[4]) {
#if defined(__CUDACC__) || defined(__VECTOR_TYPES_H__)
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x;
  v[1] = x.y;
  v[2] = x.z;
  v[3] = x.w;
#else
  load4<float>(p, v);
#endif
}

// 16 bytes of channels: four floats or eight 2-byte values.
template <typename T>
T3D_HD void load16(const T* p, T* v) {
  if constexpr (sizeof(T) == 4) {
    load4(p, v);
  } else {
    load8(p, v);
  }
}

// f[c] = mean over the three planes of the bilinear sample. `planes` points at one batch element.
// kVec: every texel starts 16-byte aligned and C is a multiple of the channels a 16-byte load holds
// (4 floats, 8 halves; compile-time C), so channels are read 16 bytes at a time (float and 2-byte
// planes). The sums are the same, in the same order, as channel by channel.
template <bool kVec = false, typename Dims, typename acc_t, typename scalar_t, typename FArr>
T3D_HD void sample_mean(const Dims& d, const scalar_t* __restrict__ planes, const PlaneGeom& g,
                        int axes, const acc_t q[3], FArr& f) {
  // Sums go to a local array: the compiler keeps it in registers, which it cannot do for the
  // caller's `f` (it might alias the planes).
  acc_t sum[Dims::kMaxC];
  for (int c = 0; c < d.c(); ++c) sum[c] = acc_t(0);
  for (int plane = 0; plane < 3; ++plane) {
    int iu, iv;
    plane_axes(axes, plane, iu, iv);
    const Taps<acc_t> t = make_taps<acc_t>(q[iu], q[iv], g, plane);
    for (int k = 0; k < 4; ++k) {
      if (t.off[k] < 0) continue;
      const scalar_t* src = planes + t.off[k];
      if constexpr (kVec) {
        static_assert(sizeof(scalar_t) == 4 || sizeof(scalar_t) == 2, "float or 2-byte planes");
        constexpr int kV = 16 / int(sizeof(scalar_t));
        static_assert(Dims::kMaxC % kV == 0, "whole 16-byte loads per texel");
        T3D_UNROLL
        for (int c = 0; c < Dims::kMaxC; c += kV) {
          scalar_t v[kV];
          load16(src + c, v);
          for (int i = 0; i < kV; ++i) sum[c + i] += t.w[k] * acc_t(v[i]);
        }
      } else {
        T3D_UNROLL
        for (int c = 0; c < d.c(); ++c) sum[c] += t.w[k] * acc_t(src[c]);
      }
    }
  }
  const acc_t third = acc_t(1) / acc_t(3);
  for (int c = 0; c < d.c(); ++c) f[c] = sum[c] * third;
}

template <typename acc_t>
T3D_HD acc_t softplus(acc_t x) {
  return t3d_softplus(x);
}

// d softplus / dx = sigmoid(x) (torch's 1 above its threshold 20 equals sigmoid(20) in float).
template <typename acc_t>
T3D_HD acc_t softplus_grad(acc_t x) {
  return x > acc_t(kSoftplusThreshold) ? acc_t(1) : t3d_sigmoid(x);
}

// Decoder forward. w1t: [C, HID] (W1 transposed), w2t: [HID, OUT] (W2 transposed); the inner loops
// run over the contiguous output index, so they vectorise on the CPU and broadcast on the GPU.
template <typename Dims, typename acc_t, typename WArr, typename FArr, typename PreArr,
          typename HArr, typename OArr>
T3D_HD void mlp_forward(const Dims& d, const WArr& w1t, const WArr& b1, const WArr& w2t,
                        const WArr& b2, const FArr& f, PreArr& pre, HArr& h, OArr& o) {
  // Accumulate in local arrays (registers), not in the caller's arrays, which the compiler must
  // assume alias the weights: that turned every FMA into a load-FMA-store chain.
  acc_t a1[Dims::kMaxHid];
  for (int j = 0; j < d.hid(); ++j) a1[j] = acc_t(b1[j]);
  for (int c = 0; c < d.c(); ++c) {
    const acc_t fc = f[c];
    for (int j = 0; j < d.hid(); ++j) a1[j] += acc_t(w1t[c * d.hid() + j]) * fc;
  }
  acc_t hl[Dims::kMaxHid];  // its own loop, so the softplus vectorises across units
  for (int j = 0; j < d.hid(); ++j) hl[j] = softplus(a1[j]);
  for (int j = 0; j < d.hid(); ++j) {
    pre[j] = a1[j];
    h[j] = hl[j];
  }
  // sigma (output 0) and the features (1..out-1) accumulate separately: EG3D's 33 outputs would
  // otherwise leave one odd lane that the CPU compiler keeps in memory across the whole loop.
  acc_t sigma = acc_t(b2[0]);
  acc_t a2[Dims::kMaxOut];
  for (int k = 1; k < d.out(); ++k) a2[k] = acc_t(b2[k]);
  for (int j = 0; j < d.hid(); ++j) {
    const acc_t hj = hl[j];
    const int row = j * d.out();
    sigma += acc_t(w2t[row]) * hj;
    for (int k = 1; k < d.out(); ++k) a2[k] += acc_t(w2t[row + k]) * hj;
  }
  o[0] = sigma;
  for (int k = 1; k < d.out(); ++k) o[k] = a2[k];
}

// One hidden unit's pre-activation b + row . f (row: a 16-byte aligned row of W1, read four weights
// at a time). The streaming forward and the streaming backward's recompute share it, so both get the
// same value.
template <int kC, typename acc_t, typename FArr>
T3D_HD acc_t unit_pre(const acc_t* row, acc_t b, const FArr& f) {
  acc_t pre = b;
  T3D_UNROLL
  for (int c = 0; c < kC; c += 4) {
    acc_t w[4];
    load4(row + c, w);
    pre += w[0] * f[c];
    pre += w[1] * f[c + 1];
    pre += w[2] * f[c + 2];
    pre += w[3] * f[c + 3];
  }
  return pre;
}

// Decoder forward one hidden unit at a time, the GPU forward kernel's form of mlp_forward: pre_j and
// h_j are used as soon as they exist, so only f and the outputs stay live (a thread per point keeps
// ~80 registers instead of the ~250 that pre[] and h[] cost, and occupancy follows). Same sums in the
// same order as mlp_forward. Compile-time sizes only (Dims::kMaxC == d.c(), C % 4 == 0).
//   w1:  [HID, C]     W1 itself, rows 16-byte aligned;
//   w2t: [HID, OUT4]  W2 transposed, rows padded with zeros to OUT4 = round_up(OUT, 4);
//   b2:  [OUT4]       zero padded.  Rows are read four entries at a time (load4).
// `unit(j, h_j)`, when given, sees every unit's activation (the backward's weight-gradient rows).
struct NoUnit {
  template <typename... A>
  T3D_HD void operator()(A...) const {}
};

template <typename Dims, typename acc_t, typename FArr, typename OArr, typename UnitFn = NoUnit>
T3D_HD void mlp_forward_streaming(const Dims& d, const acc_t* w1, const acc_t* b1, const acc_t* w2t,
                                  const acc_t* b2, const FArr& f, OArr& o, UnitFn&& unit = {}) {
  constexpr int kC = Dims::kMaxC, kOut4 = (Dims::kMaxOut + 3) / 4 * 4;
  static_assert(kC % 4 == 0, "W1 rows are read four entries at a time");
  acc_t a2[kOut4];
  T3D_UNROLL
  for (int k = 0; k < kOut4; k += 4) load4(b2 + k, a2 + k);
  for (int j = 0; j < d.hid(); ++j) {
    const acc_t h = softplus(unit_pre<kC>(w1 + j * kC, b1[j], f));
    unit(j, h);
    const acc_t* row2 = w2t + j * kOut4;
    T3D_UNROLL
    for (int k = 0; k < kOut4; k += 4) {
      acc_t w[4];
      load4(row2 + k, w);
      for (int i = 0; i < 4; ++i) a2[k + i] += w[i] * h;
    }
  }
  T3D_UNROLL
  for (int k = 0; k < Dims::kMaxOut; ++k) o[k] = a2[k];
}

// Decoder backward one hidden unit at a time, the GPU backward kernel's form of mlp_backward: pre_j
// is recomputed from f (the sums of mlp_forward_streaming, in the same order, so the same value),
// then dh_j = W2[:, j] . dout and dpre_j = dh_j softplus'(pre_j) are used at once. Only f, dout and
// df stay live (mlp_backward keeps pre[], h[] and dh[] besides: 255 registers and a stack frame in
// the backward kernel, and two blocks per SM). `unit(j, dpre_j)` sees every unit's pre-activation
// gradient, with h_j (from mlp_forward_streaming's `unit`) a factor of the decoder's weight gradients.
//   w1 [HID, C] and w2t [HID, OUT4] as for mlp_forward_streaming; dout [OUT4], zero padded.
template <typename Dims, typename acc_t, typename FArr, typename DArr, typename DfArr, typename UnitFn>
T3D_HD void mlp_backward_streaming(const Dims& d, const acc_t* w1, const acc_t* b1, const acc_t* w2t,
                                   const FArr& f, const DArr& dout, DfArr& df, UnitFn&& unit) {
  constexpr int kC = Dims::kMaxC, kOut4 = (Dims::kMaxOut + 3) / 4 * 4;
  acc_t a[kC];
  T3D_UNROLL
  for (int c = 0; c < kC; ++c) a[c] = acc_t(0);
  for (int j = 0; j < d.hid(); ++j) {
    const acc_t* row = w1 + j * kC;
    const acc_t pre = unit_pre<kC>(row, b1[j], f);
    acc_t dh = acc_t(0);
    const acc_t* row2 = w2t + j * kOut4;
    T3D_UNROLL
    for (int k = 0; k < kOut4; k += 4) {
      acc_t w[4];
      load4(row2 + k, w);
      for (int i = 0; i < 4; ++i) dh += w[i] * dout[k + i];
    }
    const acc_t dpre = dh * softplus_grad(pre);
    T3D_UNROLL
    for (int c = 0; c < kC; c += 4) {
      acc_t w[4];
      load4(row + c, w);
      for (int i = 0; i < 4; ++i) a[c + i] += w[i] * dpre;
    }
    unit(j, dpre);
  }
  T3D_UNROLL
  for (int c = 0; c < kC; ++c) df[c] = a[c];
}

// Output transform: sigma = o[0] raw, feat = sigmoid(o[1:]) * (1 + 2 eps) - eps.
template <typename acc_t>
T3D_HD acc_t feature_activation(acc_t o) {
  return t3d_sigmoid(o) * acc_t(1 + 2 * kFeatureEps) - acc_t(kFeatureEps);
}

// Gradient of the raw outputs from the gradients of (sigma, feat).
template <typename acc_t>
T3D_HD acc_t feature_activation_grad(acc_t o, acc_t g) {
  const acc_t s = t3d_sigmoid(o);
  return g * acc_t(1 + 2 * kFeatureEps) * s * (acc_t(1) - s);
}

// The same from the feature output itself, feat = s * (1 + 2 eps) - eps with s = sigmoid(o), for a
// backward that kept the outputs instead of o (s comes back to within a float rounding of feat):
// (1 + 2 eps) s (1 - s) = (feat + eps) (1 + eps - feat) / (1 + 2 eps), a product by a constant
// (a division by one is a divide instruction per feature: without fast-math it stays one).
template <typename acc_t>
T3D_HD acc_t feature_activation_grad_from_output(acc_t feat, acc_t g) {
  const acc_t eps = acc_t(kFeatureEps);
  return g * (feat + eps) * ((acc_t(1) + eps) - feat) * acc_t(1.0 / (1 + 2 * kFeatureEps));
}

// Decoder backward from the output gradient `dout` (already through the output transform).
// Overwrites `pre` with d loss / d pre and writes df = W1^T dpre. w1: [HID, C], w2: [OUT, HID].
template <typename Dims, typename acc_t, typename WArr, typename OArr, typename PreArr,
          typename FArr>
T3D_HD void mlp_backward(const Dims& d, const WArr& w1, const WArr& w2, const OArr& dout,
                         PreArr& pre, FArr& df) {
  acc_t dh[Dims::kMaxHid];
  for (int j = 0; j < d.hid(); ++j) dh[j] = acc_t(0);
  for (int k = 0; k < d.out(); ++k) {
    const acc_t g = dout[k];
    for (int j = 0; j < d.hid(); ++j) dh[j] += acc_t(w2[k * d.hid() + j]) * g;
  }
  for (int j = 0; j < d.hid(); ++j) dh[j] *= softplus_grad(pre[j]);  // vectorises across units
  acc_t a[Dims::kMaxC];
  for (int c = 0; c < d.c(); ++c) a[c] = acc_t(0);
  for (int j = 0; j < d.hid(); ++j) {
    const acc_t g = dh[j];
    pre[j] = g;
    for (int c = 0; c < d.c(); ++c) a[c] += acc_t(w1[j * d.c() + c]) * g;
  }
  for (int c = 0; c < d.c(); ++c) df[c] = a[c];
}

// Backward of sample_mean: scatters df / 3 onto the taps through `add(offset, value)` (a plain add
// into a private buffer on the CPU, an atomic on the GPU), offsets in the gradient buffer's layout
// `dg` (channel stride 1), when `add_planes`; returns the gradient with respect to the *unscaled*
// point in dxyz when `want_xyz`.
// kVec4 (requires d.c() % 4 == 0): four channels per call, `add(offset, v0, v1, v2, v3)` (one vector
// atomic on the GPU instead of four).
// One plane's share of the coordinate gradient: the derivative of df . value along the plane's
// pixel axes, gx = d/d ix and gy = d/d iy (taps outside the plane read zero):
// d value / d ix = (v10 - v00)(1 - ty) + (v11 - v01) ty, and likewise for iy.
template <typename Dims, typename acc_t, typename scalar_t, typename FArr>
T3D_HD void tap_coord_grad(const Dims& d, const scalar_t* __restrict__ planes, const Taps<acc_t>& t,
                           const FArr& df, acc_t& gx, acc_t& gy) {
  gx = acc_t(0);
  gy = acc_t(0);
  for (int c = 0; c < d.c(); ++c) {
    const acc_t v00 = t.off[0] >= 0 ? acc_t(planes[t.off[0] + c]) : acc_t(0);
    const acc_t v10 = t.off[1] >= 0 ? acc_t(planes[t.off[1] + c]) : acc_t(0);
    const acc_t v01 = t.off[2] >= 0 ? acc_t(planes[t.off[2] + c]) : acc_t(0);
    const acc_t v11 = t.off[3] >= 0 ? acc_t(planes[t.off[3] + c]) : acc_t(0);
    gx += df[c] * ((v10 - v00) * (acc_t(1) - t.ty) + (v11 - v01) * t.ty);
    gy += df[c] * ((v01 - v00) * (acc_t(1) - t.tx) + (v11 - v10) * t.tx);
  }
}

// Adds one plane's (gx, gy) to d loss / d q (before the box scale) for the plane reading q's axes
// iu, iv. ix = ((u + 1) W - 1) / 2  =>  d ix / d u = W / 2. A clamped coordinate has all taps
// outside, so gx = gy = 0 there and the clamp needs no special case.
template <typename acc_t>
T3D_HD void add_coord_grad(const PlaneGeom& g, int iu, int iv, acc_t gx, acc_t gy, acc_t dq[3]) {
  const acc_t third = acc_t(1) / acc_t(3);
  dq[iu] += gx * third * acc_t(0.5) * acc_t(g.W);
  dq[iv] += gy * third * acc_t(0.5) * acc_t(g.H);
}

template <bool kVec4 = false, typename Dims, typename acc_t, typename scalar_t, typename FArr,
          typename AddFn>
T3D_HD void sample_mean_backward(const Dims& d, const scalar_t* __restrict__ planes,
                                 const PlaneGeom& g, int axes, const acc_t q[3],
                                 acc_t inv_half_box, const FArr& df, bool add_planes,
                                 const PlaneGeom& dg, AddFn&& add, bool want_xyz,
                                 acc_t dxyz[3]) {
  const acc_t third = acc_t(1) / acc_t(3);
  acc_t dq[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int plane = 0; plane < 3; ++plane) {
    int iu, iv;
    plane_axes(axes, plane, iu, iv);
    const Taps<acc_t> t = make_taps<acc_t>(q[iu], q[iv], g, plane);
    if (add_planes) {
      for (int k = 0; k < 4; ++k) {
        if (t.off[k] < 0) continue;
        const acc_t wk = t.w[k] * third;
        const int64_t base = t.offset_in(dg, plane, k);
        if constexpr (kVec4) {
          T3D_UNROLL
          for (int c = 0; c < d.c(); c += 4)
            add(base + c, wk * df[c], wk * df[c + 1], wk * df[c + 2], wk * df[c + 3]);
        } else {
          for (int c = 0; c < d.c(); ++c) add(base + c, wk * df[c]);
        }
      }
    }
    if (want_xyz) {
      acc_t gx, gy;
      tap_coord_grad(d, planes, t, df, gx, gy);
      add_coord_grad(g, iu, iv, gx, gy, dq);
    }
  }
  if (want_xyz) {
    for (int i = 0; i < 3; ++i) dxyz[i] = dq[i] * inv_half_box;
  }
}

}  // namespace field
}  // namespace talk3d
