// Input validation of occupancy-grid marching, shared by the CPU and CUDA back ends.
#include <c10/util/Exception.h>

#include "occupancy.h"

namespace talk3d {

void check_march_inputs(const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t,
                        const at::Tensor& bits, int64_t res, double box) {
  TORCH_CHECK_VALUE(origins.dim() == 3 && origins.size(2) == 3,
                    "occupied_intervals: origins must be [B, R, 3], got ", origins.sizes());
  TORCH_CHECK_VALUE(dirs.sizes() == origins.sizes(), "occupied_intervals: dirs must be [B, R, 3] like origins, got ",
                    dirs.sizes());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == origins.size(0) && t.size(1) == origins.size(1) && t.size(2) >= 2,
                    "occupied_intervals: t must be [B, R, S >= 2] matching origins, got ", t.sizes());
  const auto st = origins.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble, "occupied_intervals: origins must be float32 or float64, got ", st);
  TORCH_CHECK_TYPE(dirs.scalar_type() == st && t.scalar_type() == st,
                   "occupied_intervals: origins, dirs and t must share one dtype");
  TORCH_CHECK_TYPE(bits.scalar_type() == at::kByte, "occupied_intervals: bits must be uint8, got ", bits.scalar_type());
  TORCH_CHECK_VALUE(res > 0 && res <= 4096, "occupied_intervals: res must be in [1, 4096], got ", res);
  TORCH_CHECK_VALUE(box > 0, "occupied_intervals: box must be positive, got ", box);
  TORCH_CHECK_VALUE(bits.dim() == 1 && bits.numel() == (res * res * res + 7) / 8,
                    "occupied_intervals: bits must be [ceil(res^3 / 8) = ", (res * res * res + 7) / 8,
                    "] for res ", res, ", got ", bits.sizes());
  for (const at::Tensor* x : {&dirs, &t, &bits})
    TORCH_CHECK_VALUE(x->device() == origins.device(), "occupied_intervals: all inputs must be on ",
                      origins.device(), ", got one on ", x->device());
}

}  // namespace talk3d
