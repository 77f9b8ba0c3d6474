// Input validation and layout shared by the CPU and CUDA back ends of the triplane field op.
#include <c10/util/Exception.h>

#include "layout/layout.h"
#include "triplane_field.h"

namespace talk3d {

namespace {

bool is_storage_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == rank, "triplane_field: ", name, " must have shape ", shape,
                    ", got a ", t.dim(), "-d tensor of shape ", t.sizes());
}

}  // namespace

namespace {

void check_field_inputs(const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                        double box_warp, int64_t axes) {
  check_rank(planes, "planes", 5, "[B, 3, C, H, W]");
  check_rank(xyz, "xyz", 3, "[B, N, 3]");
  check_rank(w1, "w1", 2, "[hidden, C]");
  check_rank(b1, "b1", 1, "[hidden]");
  check_rank(w2, "w2", 2, "[1 + F, hidden]");
  check_rank(b2, "b2", 1, "[1 + F]");
  TORCH_CHECK_VALUE(planes.size(1) == 3, "triplane_field: planes must have 3 planes in dim 1, got ",
                    planes.sizes());
  TORCH_CHECK_VALUE(xyz.size(2) == 3, "triplane_field: xyz must be [B, N, 3], got ", xyz.sizes());
  TORCH_CHECK_VALUE(xyz.size(0) == planes.size(0), "triplane_field: xyz batch ", xyz.size(0),
                    " does not match planes batch ", planes.size(0));
  TORCH_CHECK_VALUE(w1.size(1) == planes.size(2), "triplane_field: w1 is ", w1.sizes(),
                    " but planes have C = ", planes.size(2), " channels");
  TORCH_CHECK_VALUE(b1.size(0) == w1.size(0), "triplane_field: b1 ", b1.sizes(),
                    " does not match w1 hidden size ", w1.size(0));
  TORCH_CHECK_VALUE(w2.size(1) == w1.size(0), "triplane_field: w2 is ", w2.sizes(),
                    " but w1 has hidden size ", w1.size(0));
  TORCH_CHECK_VALUE(w2.size(0) >= 1, "triplane_field: w2 must have at least 1 output (sigma)");
  TORCH_CHECK_VALUE(b2.size(0) == w2.size(0), "triplane_field: b2 ", b2.sizes(),
                    " does not match w2 outputs ", w2.size(0));
  TORCH_CHECK_VALUE(box_warp > 0, "triplane_field: box_warp must be positive, got ", box_warp);
  TORCH_CHECK_VALUE(axes == field::kAxesFixed || axes == field::kAxesEG3D,
                    "triplane_field: axes must be 0 (fixed) or 1 (eg3d), got ", axes);

  const auto dt = planes.scalar_type();
  TORCH_CHECK_TYPE(is_storage_dtype(dt), "triplane_field: planes dtype ", dt,
                   " is not supported (float32, float64, float16, bfloat16)");
  const std::pair<const at::Tensor*, const char*> weights[] = {
      {&w1, "w1"}, {&b1, "b1"}, {&w2, "w2"}, {&b2, "b2"}};
  for (const auto& [t, name] : weights) {
    TORCH_CHECK_TYPE(t->scalar_type() == dt, "triplane_field: ", name, " has dtype ",
                     t->scalar_type(), " but planes have ", dt, "; they must match");
    TORCH_CHECK_VALUE(t->device() == planes.device(), "triplane_field: ", name, " is on ",
                      t->device(), " but planes are on ", planes.device());
  }
  // Coordinates need more mantissa than half precision offers (a 256^2 plane wants ~1/512).
  const auto want_xyz = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(xyz.scalar_type() == want_xyz, "triplane_field: xyz must be ", want_xyz,
                   " for ", dt, " planes, got ", xyz.scalar_type());
  TORCH_CHECK_VALUE(xyz.device() == planes.device(), "triplane_field: xyz is on ", xyz.device(),
                    " but planes are on ", planes.device());
}

}  // namespace

FieldInputs prepare_field_inputs(const at::Tensor& planes, const at::Tensor& xyz,
                                 const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2, double box_warp, int64_t axes) {
  check_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  FieldInputs in;
  in.B = planes.size(0);
  in.C = planes.size(2);
  in.H = planes.size(3);
  in.W = planes.size(4);
  in.N = xyz.size(1);
  in.HID = w1.size(0);
  in.OUT = w2.size(0);
  in.box_warp = box_warp;
  in.axes = static_cast<int>(axes);
  // Channels-last view: free when the caller keeps planes so, one copy otherwise (contiguous CPU
  // planes by the tiled transpose, ~2x faster than the strided copy; see layout_cpu.cpp).
  in.planes_cl = planes.permute({0, 1, 3, 4, 2});
  if (planes_copied(planes)) {
    in.planes_cl = planes.device().is_cpu() && planes.is_contiguous()
                       ? transpose_inner_cpu(planes.view({in.B * 3, in.C, in.H * in.W}))
                             .view({in.B, 3, in.H, in.W, in.C})
                       : in.planes_cl.contiguous();
  }
  in.xyz = xyz.contiguous();
  in.w1 = w1.contiguous();
  in.b1 = b1.contiguous();
  in.w2 = w2.contiguous();
  in.b2 = b2.contiguous();
  return in;
}

bool planes_copied(const at::Tensor& planes) {
  return planes.stride(2) != 1 && planes.size(2) > 1 && planes.numel() > 0;
}

field::PlaneGeom plane_geom(const at::Tensor& planes_cl) {
  field::PlaneGeom g;
  g.H = static_cast<int>(planes_cl.size(2));
  g.W = static_cast<int>(planes_cl.size(3));
  g.s_plane = planes_cl.stride(1);
  g.s_y = planes_cl.stride(2);
  g.s_x = planes_cl.stride(3);
  return g;
}

at::Tensor grad_placeholder(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace talk3d
