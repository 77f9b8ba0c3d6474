// Memory-layout helpers of the talk3d library (CPU): the planes' channels-last conversion.
#pragma once

#include <ATen/ATen.h>

namespace talk3d {

// x [M, A, B] (any strides) -> [M, B, A] contiguous: the last two dimensions swapped in memory.
// The planes [B, 3, C, H, W] go channels-last as x = [B * 3, C, H * W], and their gradient comes
// back as x = [B * 3, H * W, C]. Torch's generic strided copy does this several times slower
// than a plain copy; this one walks cache-sized tiles.
at::Tensor transpose_inner_cpu(const at::Tensor& x);

}  // namespace talk3d
