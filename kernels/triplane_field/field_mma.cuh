// Warp-level tensor-core matrix product for the triplane field's decoder: mma.sync m16n8k16 with
// half-precision operands (fp16 or bf16, the planes' storage type) and fp32 accumulation.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"); lane =
// 4 g + t (g = groupID 0..7, t = threadID_in_group 0..3); each 32-bit register holds two adjacent
// elements, the lower index in the low 16 bits:
//   A (16 x 16, row-major): a[0] = (row g,     cols 2t, 2t+1)   a[1] = (row g + 8, cols 2t, 2t+1)
//                           a[2] = (row g,     cols 2t+8, 2t+9) a[3] = (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, "col"):      b[0] = (rows 2t, 2t+1,   col g)     b[1] = (rows 2t+8, 2t+9, col g)
//   C, D (16 x 8, fp32):    d[0], d[1] = (row g, cols 2t, 2t+1) d[2], d[3] = (row g + 8, same cols)
// so two adjacent 8-column accumulator tiles, rounded to half, are an A fragment of a next product
// (the decoder's hidden layer never leaves the registers).
//
// In the CPU emulator (tests/cuda_emu, where there is no __CUDA_ARCH__) the product is computed from
// the same fragments gathered with warp shuffles: slow, but the same layout, so the emulator checks
// the kernel's fragment bookkeeping against the reference. Device code built for targets below
// sm_80 compiles the same form, but the launcher never runs it there (tensor_cores_available).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "common/half_types.cuh"

namespace talk3d {
namespace cuda {
namespace mma {

// W: the 2-byte storage wrapper (Half16 or BFloat16, common/half_types.cuh), whose bits and
// conversions the fragments use.

// Two floats rounded to W, packed as one register: `lo` in the low 16 bits.
template <typename W>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t(W(lo).bits) | (uint32_t(W(hi).bits) << 16);
}

// The value of the 16 bits of W in the low half of `bits16`.
template <typename W>
__device__ __forceinline__ float half_value(uint32_t bits16) {
  W x;
  x.bits = static_cast<unsigned short>(bits16);
  return static_cast<float>(x);
}

// d += A * B for one 16 x 8 x 16 tile (fragments as above). Every lane of the warp must call it.
template <typename W>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  static_assert(std::is_same<W, Half16>::value || std::is_same<W, BFloat16>::value, "fp16 or bf16");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<W, Half16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  // Each lane gathers rows g and g + 8 of A (from lanes 4g .. 4g + 3) and columns 2t, 2t + 1 of B
  // (from lanes 4 (2t + c) + q), then forms its four dot products in fp32.
  const int lane = static_cast<int>(threadIdx.x % 32), g = lane / 4, t = lane % 4;
  float arow[2][16], bcol[2][16];
  for (int j = 0; j < 4; ++j) {
    for (int q = 0; q < 4; ++q) {
      const uint32_t w = __shfl_sync(0xffffffffu, a[j], 4 * g + q);
      const int k = (j >> 1) * 8 + 2 * q;
      arow[j & 1][k] = half_value<W>(w & 0xffffu);
      arow[j & 1][k + 1] = half_value<W>(w >> 16);
    }
  }
  for (int j = 0; j < 2; ++j) {
    for (int q = 0; q < 4; ++q) {
      for (int c = 0; c < 2; ++c) {
        const uint32_t w = __shfl_sync(0xffffffffu, b[j], 4 * (2 * t + c) + q);
        const int k = j * 8 + 2 * q;
        bcol[c][k] = half_value<W>(w & 0xffffu);
        bcol[c][k + 1] = half_value<W>(w >> 16);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += arow[i >> 1][k] * bcol[i & 1][k];
    d[i] = s;
  }
#endif
}

}  // namespace mma
}  // namespace cuda
}  // namespace talk3d
