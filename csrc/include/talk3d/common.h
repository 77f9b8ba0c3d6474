// Macros and small math helpers shared by host (C++) and device (CUDA) code.
// Nothing here includes torch: the CUDA kernels in kernels/ compile with nvcc alone.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define T3D_HD __host__ __device__ __forceinline__
#else
#define T3D_HD inline
#endif

// Full unrolling where per-point arrays must stay in registers on the GPU (indices then become
// compile-time constants). Host compilers decide for themselves.
#if defined(__CUDA_ARCH__)
#define T3D_UNROLL _Pragma("unroll")
#else
#define T3D_UNROLL
#endif

namespace talk3d {

// Overloads instead of templates on <cmath>: `expf` and friends exist both on the host (C library)
// and on the device (CUDA math API), so one spelling compiles everywhere.
// Eight consecutive 2-byte values (half, bfloat16 or their wrappers) from a 16-byte aligned address:
// one 16-byte load where the CUDA vector types exist (the GPU, and the CPU emulation of the CUDA
// kernels), split into its eight little-endian halves; eight 2-byte loads otherwise.
template <typename T>
T3D_HD void load8(const T* p, T v[8]) {
  static_assert(sizeof(T) == 2, "2-byte storage");
#if defined(__CUDACC__) || defined(__VECTOR_TYPES_H__)
  const uint4 x = *reinterpret_cast<const uint4*>(p);
  const unsigned int w[4] = {x.x, x.y, x.z, x.w};
  T3D_UNROLL
  for (int i = 0; i < 8; ++i) {
    const unsigned short bits = static_cast<unsigned short>(w[i >> 1] >> ((i & 1) * 16));
    memcpy(&v[i], &bits, 2);
  }
#else
  for (int i = 0; i < 8; ++i) v[i] = p[i];
#endif
}

// a * b + c rounded once. Written out where a result must not depend on how the compiler
// contracts it: on the host, GCC may build a loop twice (vectorised and scalar) and contract one
// copy's a * b + c into an FMA but not the other's, and which copy a ray runs in depends on how
// at::parallel_for splits the work (composite's depth differed by 1 ulp between batch sizes).
T3D_HD float t3d_fma(float a, float b, float c) { return fmaf(a, b, c); }
T3D_HD double t3d_fma(double a, double b, double c) { return fma(a, b, c); }
T3D_HD float t3d_floor(float x) { return floorf(x); }
T3D_HD double t3d_floor(double x) { return floor(x); }
T3D_HD float t3d_exp(float x) { return expf(x); }
T3D_HD double t3d_exp(double x) { return exp(x); }
// clamp with fmax/fmin's NaN rule (a NaN x gives lo). On the host as selects: libm's fminf/fmaxf
// are calls there (x86 has no instruction with their NaN semantics), two per plane per point.
#if defined(__CUDA_ARCH__)
T3D_HD float t3d_clamp(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }
T3D_HD double t3d_clamp(double x, double lo, double hi) { return fmin(fmax(x, lo), hi); }
#else
template <typename T>
inline T t3d_clamp(T x, T lo, T hi) {
  x = x > lo ? x : lo;  // false for NaN: lo, as fmax gives
  return x < hi ? x : hi;
}
#endif

#if !defined(__CUDA_ARCH__)
// Branch-free float exp and log1p for the CPU kernels. libm's expf/log1pf are opaque calls that
// stop GCC from vectorising the decoder's per-unit loops, and they dominated the CPU kernel's time
// (3 transcendentals per hidden unit per point). These inline versions vectorise; both are within
// a few float ulps of libm on the ranges the field uses. The device uses CUDA's own expf/log1pf.
// Vectorising them takes -fno-trapping-math (csrc/sources.json): without it GCC 12 on an AVX2-only
// core will not turn exp's clamps into selects ("control flow in loop"), and the decoder's
// 64-unit softplus loop ran scalar, most of a point's time (AVX-512's masked compares hid this).
namespace host_math {

inline float bits_to_float(int32_t i) {
  float f;
  __builtin_memcpy(&f, &i, sizeof(f));
  return f;
}

// The steps shared by the scalar functions below and the CPU decoder's vector versions
// (csrc/triplane_field/decoder_cpu.h): T is float or a GCC vector of floats (a scalar operand of a
// vector operation is broadcast, so one spelling serves both; `r * 0 + c` starts a Horner sum
// with the constant c in either type).
//
// exp(x) = 2^n * exp(r), |r| <= ln2/2: n = round(x / ln2) by the 1.5 * 2^23 trick (floorf would
// not vectorise: it may trap), ln2 split in two for an exact reduction, and a degree-6 polynomial
// for exp(r) (Cephes' coefficients). x must be clamped to [-87, 88] (keeps 2^n a normal float).
template <typename T>
inline T exp_mantissa(T x, T& n) {
  n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  T r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  T p = r * 0.0f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// log(1 + t) for t in [0, 1]: 2 atanh(s) with s = t / (2 + t) <= 1/3, so no cancellation for tiny t;
// the odd series to s^15 leaves a relative error below 2e-9.
template <typename T>
inline T log1p_unit(T t) {
  const T s = t / (2.0f + t), z = s * s;
  T p = z * 0.0f + 1.0f / 15.0f;
  p = p * z + 1.0f / 13.0f;
  p = p * z + 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  p = p * z + 1.0f;
  return 2.0f * s * p;
}

// No subnormal floats in these functions (DAZ/FTZ are off in torch's threads; every operation
// with a subnormal input or result takes a microcode assist, ~100x an FMA). They showed where
// |pre-activations| pass ~87 (the synthetic head's decoder; rare with EG3D's): e^-|x| clamps to
// 1.6e-38, and log1p_unit's s = t / (2 + t) and s^2 fell below FLT_MIN; a sigmoid of x < -87
// is itself subnormal. Measured 2026-12-06 on the field calls of a 32^2 frame of that head (CPU,
// 49k points): backward 17.4 -> 11.5 ms a call and training forward 10.2 -> 8.5 ms with these
// guards (FTZ/DAZ set by hand then changes nothing). So:
//   - softplus(x) = relu(x) + log1p(t), t = e^-|x|, takes log1p(t) as 0 below kTinyLog1p (an
//     absolute error < 1e-18), and the series never runs on a smaller t;
//   - sigmoid(x) is 0 below kSigmoidZero (e^x < 4.3e-18), and e^-x is never formed there.
// So neither returns a value under 1e-18 but 0, and the products the decoder forms of them
// (with weights, output gradients, features) stay normal too.
constexpr float kTinyLog1p = 1e-18f, kSigmoidZero = -40.0f;

inline float exp(float x) {
  // Ternaries, not fminf/fmaxf: GCC vectorises selects but not the NaN-aware libm min/max.
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38
  x = x > 88.0f ? 88.0f : x;
  float n;
  const float p = exp_mantissa(x, n);
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

}  // namespace host_math
#endif

// softplus(x) = log(1 + e^x), beta 1. torch returns x itself above its threshold 20, where the
// exact value differs by < 2.1e-9; the float versions below use the exact form everywhere.
T3D_HD float t3d_softplus(float x) {
#if defined(__CUDA_ARCH__)
  return x > 20.0f ? x : log1pf(expf(x));
#else
  const float t = host_math::exp(-fabsf(x));
  const bool tiny = t < host_math::kTinyLog1p;
  return (x > 0.0f ? x : 0.0f) + (tiny ? 0.0f : host_math::log1p_unit(tiny ? host_math::kTinyLog1p : t));
#endif
}
T3D_HD double t3d_softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

T3D_HD float t3d_sigmoid(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f / (1.0f + expf(-x));
#else
  const bool zero = x < host_math::kSigmoidZero;
  const float s = 1.0f / (1.0f + host_math::exp(zero ? -host_math::kSigmoidZero : -x));
  return zero ? 0.0f : s;
#endif
}
T3D_HD double t3d_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

}  // namespace talk3d
