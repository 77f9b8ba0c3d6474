// Macros and small math helpers shared by host (C++) and device (CUDA) code.
// Nothing here includes torch: the CUDA kernels in kernels/ compile with nvcc alone.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define T3D_HD __host__ __device__ __forceinline__
#else
#define T3D_HD inline
#endif

namespace talk3d {

// Overloads instead of templates on <cmath>: `expf` and friends exist both on the host (C library)
// and on the device (CUDA math API), so one spelling compiles everywhere.
T3D_HD float t3d_exp(float x) { return expf(x); }
T3D_HD double t3d_exp(double x) { return exp(x); }
T3D_HD float t3d_log1p(float x) { return log1pf(x); }
T3D_HD double t3d_log1p(double x) { return log1p(x); }
T3D_HD float t3d_floor(float x) { return floorf(x); }
T3D_HD double t3d_floor(double x) { return floor(x); }
T3D_HD float t3d_clamp(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }
T3D_HD double t3d_clamp(double x, double lo, double hi) { return fmin(fmax(x, lo), hi); }

template <typename T>
T3D_HD T t3d_sigmoid(T x) {
  return T(1) / (T(1) + t3d_exp(-x));
}

}  // namespace talk3d
