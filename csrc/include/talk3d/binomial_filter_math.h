// Per-element math of binomial_filter2d, shared by the CPU and CUDA kernels: EG3D's resampling
// filter (upfirdn2d's setup_filter([1, 3, 3, 1]): the outer product of k = [1, 3, 3, 1] / 8 with
// itself) applied to one channel plane with zero padding. The filter is symmetric, so convolution
// and correlation agree.
#pragma once

#include "talk3d/common.h"

namespace talk3d {
namespace fir {

constexpr int kTaps = 4;
// Neighbouring outputs of one row made together: kStrip + 3 loads per input row feed kStrip
// outputs, instead of 4 loads per output (the taps overlap).
constexpr int kStrip = 4;
constexpr int kSpan = kStrip + kTaps - 1;  // input columns one strip reads

// N channels filtered together (the CUDA kernel's eight half-precision channels per 16-byte load in
// NHWC): filter_strip's arithmetic with Acc = Lanes<float, N> runs lane by lane, the same operations
// in the same order as with Acc = float.
template <typename T, int N>
struct Lanes {
  T v[N];
  Lanes() = default;
  T3D_HD explicit Lanes(T x) {
    for (int i = 0; i < N; ++i) v[i] = x;
  }
  T3D_HD Lanes& operator+=(const Lanes& o) {
    for (int i = 0; i < N; ++i) v[i] += o.v[i];
    return *this;
  }
  T3D_HD friend Lanes operator+(Lanes a, const Lanes& b) { return a += b; }
  T3D_HD friend Lanes operator*(Lanes a, const Lanes& b) {
    for (int i = 0; i < N; ++i) a.v[i] *= b.v[i];
    return a;
  }
};

// k_a of [1, 3, 3, 1] / 8.
template <typename Acc>
T3D_HD Acc tap(int a) {
  return (a == 0 || a == kTaps - 1) ? Acc(0.125) : Acc(0.375);
}

// One input row's contribution before its row tap k_a: sum_b k_b v_b, symmetric pairs first.
template <typename Acc>
T3D_HD Acc row_taps(Acc v0, Acc v1, Acc v2, Acc v3) {
  return Acc(0.125) * (v0 + v3) + Acc(0.375) * (v1 + v2);
}

// out[s] = gain * sum_{a, b < 4} k_a k_b x(y0 + a, x0 + s + b) for s < kStrip, x zero outside
// [0, H) x [0, W). load(r, c) returns x(r, c) as Acc and is called only in range. Idx: the index type
// (the CUDA kernel's int32_t while the tensor allows it, else int64_t).
template <typename Acc, typename Load, typename Idx>
T3D_HD void filter_strip(const Load& load, Idx H, Idx W, Idx y0, Idx x0, Acc gain, Acc out[kStrip]) {
  Acc acc[kStrip];
  T3D_UNROLL
  for (int s = 0; s < kStrip; ++s) acc[s] = Acc(0);
  T3D_UNROLL
  for (int a = 0; a < kTaps; ++a) {
    const Idx r = y0 + a;
    if (r < 0 || r >= H) continue;
    Acc v[kSpan];
    T3D_UNROLL
    for (int c = 0; c < kSpan; ++c) {
      const Idx col = x0 + c;
      v[c] = (col >= 0 && col < W) ? load(r, col) : Acc(0);
    }
    const Acc ka = tap<Acc>(a);
    T3D_UNROLL
    for (int s = 0; s < kStrip; ++s) acc[s] += ka * row_taps(v[s], v[s + 1], v[s + 2], v[s + 3]);
  }
  T3D_UNROLL
  for (int s = 0; s < kStrip; ++s) out[s] = gain * acc[s];
}

}  // namespace fir
}  // namespace talk3d
