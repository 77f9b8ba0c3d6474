// C++ CPU back end of occupancy-grid marching: a parallel loop over rays around occupancy_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "occupancy.h"
#include "talk3d/occupancy_math.h"

namespace talk3d {

at::Tensor occupied_intervals_cpu(const at::Tensor& origins, const at::Tensor& dirs,
                                  const at::Tensor& t, const at::Tensor& bits, int64_t res,
                                  double box, bool outside_occupied) {
  check_march_inputs(origins, dirs, t, bits, res, box);
  const at::Tensor o = origins.contiguous(), d = dirs.contiguous(), tt = t.contiguous(),
                   b = bits.contiguous();
  const int64_t M = o.size(0) * o.size(1), S = tt.size(2);
  at::Tensor out = at::empty({o.size(0), o.size(1), 2}, o.options().dtype(at::kInt));
  int32_t* po = out.data_ptr<int32_t>();
  const uint8_t* pb = b.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "occupied_intervals_cpu", [&] {
    const scalar_t *po_ = o.data_ptr<scalar_t>(), *pd = d.data_ptr<scalar_t>(),
                   *pt = tt.data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* tr = pt + r * S;
        const auto span = occupancy::occupied_span<scalar_t>(
            po_ + 3 * r, pd + 3 * r, tr[0], tr[S - 1], pb, static_cast<int>(res), scalar_t(box),
            outside_occupied);
        int k0, k1;
        occupancy::live_intervals<scalar_t>(tr, S, span, k0, k1);
        po[2 * r] = k0;
        po[2 * r + 1] = k1;
      }
    });
  });
  return out;
}

}  // namespace talk3d
