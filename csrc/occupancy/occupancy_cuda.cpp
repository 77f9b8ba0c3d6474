// CUDA implementation of occupancy-grid marching: validates, allocates, and calls the torch-free
// launcher in kernels/occupancy. Compiled only when the installed torch has CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "occupancy.h"
#include "occupancy/occupancy_cuda.h"

namespace talk3d {

namespace {

at::Tensor occupied_intervals_cuda(const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& t,
                                   const at::Tensor& bits, int64_t res, double box, bool outside_occupied) {
  check_march_inputs(origins, dirs, t, bits, res, box);
  TORCH_CHECK_VALUE(origins.is_cuda(), "occupied_intervals (cuda): inputs must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(origins.device());
  const at::Tensor o = origins.contiguous(), d = dirs.contiguous(), tt = t.contiguous(),
                   b = bits.contiguous();
  at::Tensor out = at::empty({o.size(0), o.size(1), 2}, o.options().dtype(at::kInt));
  const int64_t M = o.size(0) * o.size(1);
  if (M == 0) return out;
  cuda::MarchProblem p;
  p.dtype = o.scalar_type() == at::kDouble ? cuda::MarchDType::kF64 : cuda::MarchDType::kF32;
  p.origins = o.data_ptr();
  p.dirs = d.data_ptr();
  p.t = tt.data_ptr();
  p.M = M;
  p.S = tt.size(2);
  p.bits = b.data_ptr<uint8_t>();
  p.res = static_cast<int>(res);
  p.box = box;
  p.outside_occupied = outside_occupied;
  const cudaError_t err =
      cuda::occupied_intervals(p, out.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "occupied_intervals (cuda): launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(talk3d, CUDA, m) {
  m.impl("occupied_intervals", &occupied_intervals_cuda);
}

}  // namespace talk3d
