// A transposed copy of a block of a matrix, with 8 x 8 vector blocks for floats on AVX2 cores: the
// CPU kernel of transpose_inner walks the planes tile by tile with it, and the field's CPU backward
// writes its plane-gradient bands into the API layout with it.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace talk3d {
namespace layout {

#if defined(__AVX2__)
// d[i * ld + j] = s[j * ls + i] for an 8 x 8 block of floats: eight row loads, the classic
// unpack / shuffle / lane-permute network, eight row stores (element by element, a transpose
// costs a scalar load and store per float; this is what brings it near a plain copy's speed).
inline void transpose8x8(const float* s, int64_t ls, float* d, int64_t ld) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(d + i * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(d + (i + 4) * ld, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// d[b * ld + a] = s[a * ls + b] for a in [a0, a1), b in [b0, b1). `long_dest_rows`: the
// destination's rows (index b) are the long ones; the inner loop then walks along them, so that
// the 8 lines it touches there are finished before the next 8. The other way round, the 8 x 8
// blocks of one pass hit up to (b1 - b0) lines a long row apart, which share an L1 set (rows of
// 2^k floats), and each line was evicted half written: [H*W, 32] -> [32, H*W] at 256^2 (the plane
// gradient back to the API layout) took 2.1 ms against 1.2 ms walked this way (2-core Zen 5 VM).
template <typename scalar_t>
void transpose_block(const scalar_t* s, int64_t ls, scalar_t* d, int64_t ld, int64_t a0,
                     int64_t a1, int64_t b0, int64_t b1, bool long_dest_rows) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t a8 = a0 + (a1 - a0) / 8 * 8, b8 = b0 + (b1 - b0) / 8 * 8;
    if (long_dest_rows) {
      for (int64_t b = b0; b < b8; b += 8)
        for (int64_t a = a0; a < a8; a += 8) transpose8x8(s + a * ls + b, ls, d + b * ld + a, ld);
    } else {
      for (int64_t a = a0; a < a8; a += 8)
        for (int64_t b = b0; b < b8; b += 8) transpose8x8(s + a * ls + b, ls, d + b * ld + a, ld);
    }
    // The ragged edges, element by element.
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t a = (b < b8 ? a8 : a0); a < a1; ++a) d[b * ld + a] = s[a * ls + b];
    return;
  }
#endif
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t a = a0; a < a1; ++a) d[b * ld + a] = s[a * ls + b];
}

}  // namespace layout
}  // namespace talk3d
