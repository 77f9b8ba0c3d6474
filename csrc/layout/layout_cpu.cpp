// C++ CPU kernel of transpose_inner: a tiled transpose, parallel over (matrix, tile row, tile column).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "layout.h"
#include "transpose_block.h"

namespace talk3d {

namespace {

// Tile side: a 64 x 64 tile of floats (16 KB read, 16 KB written) stays in L1, and each source or
// destination row of the tile is whole cache lines.
constexpr int64_t kTile = 64;
// Tiles per parallel_for grain.
constexpr int64_t kTileGrain = 16;

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
        // One tile of one matrix: dm[b * A + a] = sm[a * B + b].
        layout::transpose_block(s + m * A * B, B, d + m * A * B, A, a0, a1, b0, b1, A >= B);
      }
    });
  });
  return out;
}

}  // namespace talk3d
