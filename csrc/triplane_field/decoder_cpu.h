// The EG3D-size decoder (C = 32 -> hidden 64 -> 1 + F = 33) in float for the CPU kernels, written with
// explicit vectors of the core's width (GCC/Clang vector extensions): 16 floats where AVX-512 is
// there, 8 (AVX2) elsewhere. Wider-than-hardware vectors are not an option: on an AVX2-only core
// (GCC 12, znver3) 16-float vectors were kept in memory and moved piecewise, and the decoder ran 10x
// slower than with 8-float ones (3.2 us a point against 0.3, measured 2026-12-04).
//
// The math is field::mlp_forward / field::mlp_backward's (triplane_field_math.h, which the other
// sizes, float64 and the GPU run), and the activations are the shared ones. What differs is only
// where the partial sums live. Written with arrays, GCC keeps the 64 hidden sums of one point in
// memory (a store and reload per FMA), and each output is one chain of 32-64 dependent FMAs
// (4-cycle latency each): the decoder ran at ~7 FMAs per cycle per core against a peak of 32.
// Here every sum is a few vector registers, split in independent chains that the core overlaps.
// Sums are therefore added in a different order than the shared version (float rounding only).
// The backward's other per-point vector work at this size lives here too: the weight gradients as
// sums of outer products over a tile of points, and each plane's share of the coordinate gradient.
#pragma once

#include "talk3d/triplane_field_math.h"

namespace talk3d {
namespace cpu_decoder {

constexpr int kC = 32, kHid = 64, kOut = 33;
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
using Dims = field::StaticDims<kC, kHid, kOut>;

typedef float vfl __attribute__((vector_size(kLanes * sizeof(float))));

// Unaligned loads and stores (rows of 33 are not 64-byte aligned) through a 4-byte-aligned twin of
// the vector type: GCC emits plain unaligned vector moves for it (vmovups, two per vector on AVX2).
// A 64-byte __builtin_memcpy, as here before, compiled to vector moves with AVX-512 but, on an
// AVX2-only core (GCC 12, znver3), to general-register copies reassembled by vpinsrq: the decoder
// ran 10x slower there (3.2 us a point against 0.3).
typedef float vflu __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));
inline vfl load(const float* p) { return *reinterpret_cast<const vflu*>(p); }
inline void store(float* p, vfl v) { *reinterpret_cast<vflu*>(p) = v; }
inline vfl splat(float x) { return vfl{} + x; }
// Sum of the lanes as a tree of halves (log2(kLanes) dependent adds; a lane-by-lane loop is a chain of
// kLanes, and it was a tenth of the backward).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
inline float hsum(vfl v) {
// GCC < 12 has no __builtin_shufflevector: the same tree over an array. GCC 12 compiles that one
// slower (xyz-only backward at the CPU size, best of 15: 10.0-12.2 ms against 7.5-10.2 ms).
#if !defined(__clang__) && defined(__GNUC__) && __GNUC__ < 12
  float s[kLanes];
  for (int i = 0; i < kLanes; ++i) s[i] = v[i];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
#else
#if defined(__AVX512F__)
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const vf8 a = v;
#endif
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#endif
}

// The activations on whole vectors: host_math::exp / log1p_unit (common.h), the same steps
// (exp_mantissa and log1p_unit are templates shared with them), on the vector type instead of
// left to GCC's auto-vectoriser. Auto-vectorised, the backward's
// 64-unit `dh * softplus_grad(pre)` loop ran in 256-bit halves with masked selects and cost 10 ms
// of the 28-ms backward at the CPU size (AVX-512 core, GCC 12; measured 2026-12-06 by replacing it
// with a plain product: 28 -> 19 ms). Here each is a dozen FMAs per 16 units.
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfl vexp(vfl x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  vfl n;
  const vfl p = host_math::exp_mantissa(x, n);
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  // 2^n: the bits read as floats. A cast between vector types of one size reinterprets them (GCC
  // and Clang); a reference cast, as before, broke the aliasing rules (GCC warned).
  return p * (vfl)bits;
}

// t3d_softplus and field::softplus_grad (sigmoid; 1 above torch's threshold 20) on a vector, with
// the same guards against subnormal arithmetic (common.h, kTinyLog1p and kSigmoidZero).
inline vfl vsoftplus(vfl x) {
  const vfl relu = x > splat(0.0f) ? x : splat(0.0f);
  const vfl neg_abs = x > splat(0.0f) ? -x : x;
  const vfl t = vexp(neg_abs);
  const auto tiny = t < splat(host_math::kTinyLog1p);
  return relu + (tiny ? splat(0.0f) : host_math::log1p_unit(tiny ? splat(host_math::kTinyLog1p) : t));
}
inline vfl vsoftplus_grad(vfl x) {
  const auto zero = x < splat(host_math::kSigmoidZero);
  const vfl sig = 1.0f / (1.0f + vexp(zero ? splat(-host_math::kSigmoidZero) : -x));
  return x > splat(float(field::kSoftplusThreshold)) ? splat(1.0f) : (zero ? splat(0.0f) : sig);
}

// h [kHid] = softplus(pre [kHid]).
inline void softplus_row(const float* __restrict__ pre, float* __restrict__ h) {
  for (int v = 0; v < kHid / kLanes; ++v) store(h + v * kLanes, vsoftplus(load(pre + v * kLanes)));
}

// Same contract as field::mlp_forward at the EG3D size, plus w2 itself for the sigma row.
//   w1t [C, HID] (W1 transposed), b1 [HID], w2 [OUT, HID], w2t [HID, OUT] (W2 transposed), b2 [OUT];
//   f [C] -> pre [HID] (pre-activations), h [HID] (softplus), o [OUT] (raw outputs).
inline void mlp_forward(const float* __restrict__ w1t, const float* __restrict__ b1,
                        const float* __restrict__ w2, const float* __restrict__ w2t,
                        const float* __restrict__ b2, const float* __restrict__ f,
                        float* __restrict__ pre, float* __restrict__ h, float* __restrict__ o) {
  constexpr int kV1 = kHid / kLanes;  // vectors of hidden units: 4 (AVX-512) or 8 (AVX2)
  // Layer 1: kCh1 chains (input channels c mod kCh1) of kV1 vectors, 8 accumulators either way:
  // enough independent FMAs to hide their latency, few enough to stay in AVX2's 16 registers.
  constexpr int kCh1 = kV1 >= 8 ? 1 : 2;
  vfl a[kCh1][kV1];
  for (int v = 0; v < kV1; ++v) {
    a[0][v] = load(b1 + v * kLanes);
    for (int q = 1; q < kCh1; ++q) a[q][v] = vfl{};
  }
  for (int c = 0; c < kC; c += kCh1) {
    for (int q = 0; q < kCh1; ++q) {
      const vfl fq = splat(f[c + q]);
      const float* r = w1t + (c + q) * kHid;
      for (int v = 0; v < kV1; ++v) a[q][v] += load(r + v * kLanes) * fq;
    }
  }
  for (int v = 0; v < kV1; ++v) {
    vfl sum = a[0][v];
    for (int q = 1; q < kCh1; ++q) sum += a[q][v];
    store(pre + v * kLanes, sum);
    store(h + v * kLanes, vsoftplus(sum));
  }
  // Layer 2: sigma is the dot product of W2's first row with h; the 32 features accumulate in kCh2
  // chains (hidden units j mod kCh2) of kVF vectors: 8 accumulators, as in layer 1.
  constexpr int kVF = (kOut - 1) / kLanes, kCh2 = 8 / kVF;
  vfl s = vfl{};
  for (int v = 0; v < kV1; ++v) s += load(w2 + v * kLanes) * load(h + v * kLanes);
  vfl acc[kCh2][kVF];
  for (int q = 0; q < kCh2; ++q)
    for (int v = 0; v < kVF; ++v) acc[q][v] = vfl{};
  for (int j = 0; j < kHid; j += kCh2) {
    for (int q = 0; q < kCh2; ++q) {
      const vfl hj = splat(h[j + q]);
      const float* row = w2t + (j + q) * kOut + 1;
      for (int v = 0; v < kVF; ++v) acc[q][v] += load(row + v * kLanes) * hj;
    }
  }
  o[0] = b2[0] + hsum(s);
  for (int v = 0; v < kVF; ++v) {
    vfl sum = acc[0][v];
    for (int q = 1; q < kCh2; ++q) sum += acc[q][v];
    store(o + 1 + v * kLanes, load(b2 + 1 + v * kLanes) + sum);
  }
}

// Same contract as field::mlp_backward at the EG3D size: dout [OUT] (through the output transform),
// pre [HID] pre-activations in, d loss / d pre out; df [C] = W1^T dpre. w1 [HID, C], w2 [OUT, HID].
inline void mlp_backward(const float* __restrict__ w1, const float* __restrict__ w2,
                         const float* __restrict__ dout, float* __restrict__ pre,
                         float* __restrict__ df) {
  constexpr int kV1 = kHid / kLanes, kVC = kC / kLanes;
  // dh = W2^T dout: kCh chains (outputs k mod kCh) of kV1 vectors, 8 accumulators (see mlp_forward);
  // the odd 33rd output last.
  constexpr int kCh = kV1 >= 8 ? 1 : 2;
  vfl d[kCh][kV1];
  for (int q = 0; q < kCh; ++q)
    for (int v = 0; v < kV1; ++v) d[q][v] = vfl{};
  int k = 0;
  for (; k + kCh <= kOut; k += kCh)
    for (int q = 0; q < kCh; ++q) {
      const vfl g = splat(dout[k + q]);
      for (int v = 0; v < kV1; ++v) d[q][v] += load(w2 + (k + q) * kHid + v * kLanes) * g;
    }
  for (; k < kOut; ++k)
    for (int v = 0; v < kV1; ++v) d[0][v] += load(w2 + k * kHid + v * kLanes) * splat(dout[k]);
  for (int v = 0; v < kV1; ++v) {  // pre <- dh * softplus'(pre), dh still in registers
    vfl dh = d[0][v];
    for (int q = 1; q < kCh; ++q) dh += d[q][v];
    store(pre + v * kLanes, dh * vsoftplus_grad(load(pre + v * kLanes)));
  }
  // df = W1^T dpre: kChC chains (hidden units j mod kChC) of kVC vectors, 8 accumulators.
  constexpr int kChC = 8 / kVC;
  vfl acc[kChC][kVC];
  for (int q = 0; q < kChC; ++q)
    for (int v = 0; v < kVC; ++v) acc[q][v] = vfl{};
  for (int j = 0; j < kHid; j += kChC)
    for (int q = 0; q < kChC; ++q) {
      const vfl g = splat(pre[j + q]);
      for (int v = 0; v < kVC; ++v) acc[q][v] += load(w1 + (j + q) * kC + v * kLanes) * g;
    }
  for (int v = 0; v < kVC; ++v) {
    vfl sum = acc[0][v];
    for (int q = 1; q < kChC; ++q) sum += acc[q][v];
    store(df + v * kLanes, sum);
  }
}

// field::tap_coord_grad at C = 32: one plane's (gx, gy) from its taps and df [C]. Same formula; the
// channel loop as two vectors (the shared loop's per-tap "inside the plane?" selects kept GCC from
// vectorising it).
inline void tap_coord_grad(const float* __restrict__ planes, const field::Taps<float>& t,
                           const float* __restrict__ df, float& gx_out, float& gy_out) {
  constexpr int kV = kC / kLanes;
  vfl gx = vfl{}, gy = vfl{};
  for (int v = 0; v < kV; ++v) {
    vfl tap[4];
    for (int k = 0; k < 4; ++k) tap[k] = t.off[k] >= 0 ? load(planes + t.off[k] + v * kLanes) : vfl{};
    const vfl dfv = load(df + v * kLanes);
    gx += dfv * ((tap[1] - tap[0]) * (1.0f - t.ty) + (tap[3] - tap[2]) * t.ty);
    gy += dfv * ((tap[2] - tap[0]) * (1.0f - t.tx) + (tap[3] - tap[1]) * t.tx);
  }
  gx_out = hsum(gx);
  gy_out = hsum(gy);
}

// acc[m * N + n] += sum over t < rows of a[t * lda + m] * b[t * ldb + n], N = kNV * kLanes: a tile's
// weight gradient as a sum of outer products. kRows rows of acc times kNV vectors (kAccRegs registers:
// 16 of AVX-512's 32, 8 of AVX2's 16, leaving room for b's row) stay in registers across the whole
// tile, so acc is read and written once per tile.
template <int kNV>
inline void add_outer_products(int rows, int M, const float* __restrict__ a, int lda,
                               const float* __restrict__ b, int ldb, float* __restrict__ acc) {
  constexpr int kAccRegs = kLanes == 16 ? 16 : 8;
  constexpr int kRows = kAccRegs / kNV > 0 ? kAccRegs / kNV : 1, N = kNV * kLanes;
  int m = 0;
  for (; m + kRows <= M; m += kRows) {
    vfl r[kRows][kNV];
    for (int i = 0; i < kRows; ++i)
      for (int v = 0; v < kNV; ++v) r[i][v] = vfl{};
    for (int t = 0; t < rows; ++t) {
      vfl bt[kNV];
      for (int v = 0; v < kNV; ++v) bt[v] = load(b + t * ldb + v * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const vfl ai = splat(a[t * lda + m + i]);
        for (int v = 0; v < kNV; ++v) r[i][v] += ai * bt[v];
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int v = 0; v < kNV; ++v) {
        float* dst = acc + (m + i) * N + v * kLanes;
        store(dst, load(dst) + r[i][v]);
      }
  }
  for (; m < M; ++m) {  // the odd rows (33 = 8 * 4 + 1 outputs)
    vfl r[kNV];
    for (int v = 0; v < kNV; ++v) r[v] = vfl{};
    for (int t = 0; t < rows; ++t) {
      const vfl at = splat(a[t * lda + m]);
      for (int v = 0; v < kNV; ++v) r[v] += at * load(b + t * ldb + v * kLanes);
    }
    for (int v = 0; v < kNV; ++v) {
      float* dst = acc + m * N + v * kLanes;
      store(dst, load(dst) + r[v]);
    }
  }
}

}  // namespace cpu_decoder
}  // namespace talk3d
