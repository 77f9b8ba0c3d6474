// C++ CPU kernel of transpose_inner: a tiled transpose, parallel over (matrix, tile row, tile column).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "layout.h"

namespace talk3d {

namespace {

// Tile side: a 64 x 64 tile of floats (16 KB read, 16 KB written) stays in L1, and each source or
// destination row of the tile is whole cache lines.
constexpr int64_t kTile = 64;
// Tiles per parallel_for grain.
constexpr int64_t kTileGrain = 16;

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

// One tile [a0, a1) x [b0, b1) of one matrix: dm[b * A + a] = sm[a * B + b].
template <typename scalar_t>
void transpose_tile(const scalar_t* sm, scalar_t* dm, int64_t A, int64_t B, int64_t a0, int64_t a1,
                    int64_t b0, int64_t b1) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t a8 = a0 + (a1 - a0) / 8 * 8, b8 = b0 + (b1 - b0) / 8 * 8;
    // The inner loop walks along the rows of the matrix whose rows are the long ones, so that the
    // 8 lines it touches there are finished before the next 8: the other way round, the 8 x 8
    // blocks of one pass hit up to kTile lines a long row apart, which share an L1 set (rows of
    // 2^k floats), and each line was evicted half written. [H*W, 32] -> [32, H*W] at 256^2 (the
    // plane gradient back to the API layout) took 2.1 ms against 1.0 for the opposite direction.
    if (A >= B) {
      for (int64_t b = b0; b < b8; b += 8)
        for (int64_t a = a0; a < a8; a += 8) transpose8x8(sm + a * B + b, B, dm + b * A + a, A);
    } else {
      for (int64_t a = a0; a < a8; a += 8)
        for (int64_t b = b0; b < b8; b += 8) transpose8x8(sm + a * B + b, B, dm + b * A + a, A);
    }
    // The ragged edges, element by element.
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t a = (b < b8 ? a8 : a0); a < a1; ++a) dm[b * A + a] = sm[a * B + b];
    return;
  }
#endif
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t a = a0; a < a1; ++a) dm[b * A + a] = sm[a * B + b];
}

}  // namespace

at::Tensor transpose_inner_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 3, "transpose_inner: x must be 3-D [M, A, B], got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "transpose_inner (cpu): x must be on the CPU");
  const at::Tensor src = x.contiguous();
  const int64_t M = src.size(0), A = src.size(1), B = src.size(2);
  at::Tensor out = at::empty({M, B, A}, src.options());
  if (src.numel() == 0) return out;
  const int64_t ta = (A + kTile - 1) / kTile, tb = (B + kTile - 1) / kTile;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, src.scalar_type(), "transpose_inner_cpu", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = out.data_ptr<scalar_t>();
    at::parallel_for(0, M * ta * tb, kTileGrain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / (ta * tb), a0 = (task / tb) % ta * kTile, b0 = task % tb * kTile;
        const int64_t a1 = std::min(A, a0 + kTile), b1 = std::min(B, b0 + kTile);
        transpose_tile(s + m * A * B, d + m * A * B, A, B, a0, a1, b0, b1);
      }
    });
  });
  return out;
}

}  // namespace talk3d
