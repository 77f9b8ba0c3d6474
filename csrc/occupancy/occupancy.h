// Torch-facing entry points of occupancy-grid ray marching, shared by the CPU and CUDA back ends.
#pragma once

#include <ATen/ATen.h>

namespace talk3d {

// Checks origins [B, R, 3], dirs [B, R, 3], t [B, R, S] (same floating dtype and device; S >= 2),
// bits uint8 [ceil(res^3 / 8)], res > 0, box > 0, raising ValueError/TypeError naming the problem.
void check_march_inputs(const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t,
                        const at::Tensor& bits, int64_t res, double box);

// For each ray, the inclusive range [k0, k1] of its intervals [t_i, t_{i+1}] that pass through an
// occupied cell (or outside the cube when outside_occupied); (-1, -1) when none. int32 [B, R, 2].
at::Tensor occupied_intervals_cpu(const at::Tensor& origins, const at::Tensor& dirs,
                                  const at::Tensor& t, const at::Tensor& bits, int64_t res,
                                  double box, bool outside_occupied);

}  // namespace talk3d
