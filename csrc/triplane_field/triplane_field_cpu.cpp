// C++ CPU back end of the fused triplane field: thin loops around triplane_field_math.h.
//
// Forward: points are independent; at::parallel_for over them.
// Backward: plane gradients are a scatter, so concurrent points may hit the same texel. Rather than
// atomics (a locked CAS per channel per tap costs more than the whole forward), the points are split
// into a few partitions, each run by one task with its own plane-gradient buffer and its own weight
// gradient sums; the buffers are summed at the end. The number of partitions is capped so the extra
// buffers stay within kScratchBudgetBytes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "triplane_field.h"

namespace talk3d {

namespace {

using field::BoundedDims;
using field::PlaneGeom;
using field::StaticDims;

// Bounds of the generic instance: per-point arrays live on the stack.
constexpr int kCpuMaxC = 128, kCpuMaxHid = 256, kCpuMaxOut = 257;
using EG3DDims = StaticDims<32, 64, 33>;
using GenericDims = BoundedDims<kCpuMaxC, kCpuMaxHid, kCpuMaxOut>;

// Extra memory the backward may spend on per-partition plane-gradient buffers.
constexpr int64_t kScratchBudgetBytes = int64_t(512) << 20;
// Fewer points than this per partition are not worth a buffer of their own.
constexpr int64_t kMinPointsPerPartition = 4096;
// Points per parallel_for grain in the forward.
constexpr int64_t kForwardGrain = 256;

// Decoder weights plus the transposes the forward's axpy-shaped loops read (see mlp_forward).
template <typename scalar_t>
struct DecoderWeights {
  std::vector<scalar_t> w1t, w2t;
  const scalar_t *w1, *b1, *w2, *b2;
  explicit DecoderWeights(const FieldInputs& in)
      : w1t(in.C * in.HID), w2t(in.HID * in.OUT) {
    w1 = in.w1.data_ptr<scalar_t>();
    b1 = in.b1.data_ptr<scalar_t>();
    w2 = in.w2.data_ptr<scalar_t>();
    b2 = in.b2.data_ptr<scalar_t>();
    for (int64_t j = 0; j < in.HID; ++j)
      for (int64_t c = 0; c < in.C; ++c) w1t[c * in.HID + j] = w1[j * in.C + c];
    for (int64_t k = 0; k < in.OUT; ++k)
      for (int64_t j = 0; j < in.HID; ++j) w2t[j * in.OUT + k] = w2[k * in.HID + j];
  }
};

// Per-point scratch: the forward's intermediates, kept on the stack.
template <typename Dims, typename acc_t>
struct PointState {
  acc_t q[3];
  acc_t f[Dims::kMaxC];
  acc_t pre[Dims::kMaxHid];
  acc_t h[Dims::kMaxHid];
  acc_t o[Dims::kMaxOut];
};

template <typename Dims, typename scalar_t>
void eval_point(const Dims& d, const DecoderWeights<scalar_t>& w, const scalar_t* planes,
                const PlaneGeom& g, int axes, const scalar_t* xyz, scalar_t inv_half_box,
                PointState<Dims, scalar_t>& s) {
  field::scale_point(xyz, inv_half_box, s.q);
  field::sample_mean(d, planes, g, axes, s.q, s.f);
  field::mlp_forward<Dims, scalar_t>(d, w.w1t.data(), w.b1, w.w2t.data(), w.b2, s.f, s.pre, s.h,
                                     s.o);
}

template <typename scalar_t, typename Dims>
void forward_impl(const Dims d, const FieldInputs& in, scalar_t* sigma, scalar_t* feat) {
  const DecoderWeights<scalar_t> w(in);
  const scalar_t* planes = in.planes_cl.data_ptr<scalar_t>();
  const scalar_t* xyz = in.xyz.data_ptr<scalar_t>();
  const PlaneGeom g = plane_geom(in.planes_cl);
  const int64_t s_batch = in.planes_cl.stride(0);
  const scalar_t inv_half_box = scalar_t(2.0 / in.box_warp);
  const int64_t N = in.N, F = in.OUT - 1;
  at::parallel_for(0, in.B * N, kForwardGrain, [&](int64_t begin, int64_t end) {
    PointState<Dims, scalar_t> s;
    for (int64_t i = begin; i < end; ++i) {
      eval_point(d, w, planes + (i / N) * s_batch, g, in.axes, xyz + 3 * i, inv_half_box, s);
      sigma[i] = s.o[0];
      for (int64_t k = 0; k < F; ++k) feat[i * F + k] = field::feature_activation(s.o[1 + k]);
    }
  });
}

struct Needs {
  bool planes, xyz, w1, b1, w2, b2;
  bool upstream_of_w2() const { return planes || xyz || w1 || b1; }
};

template <typename scalar_t, typename Dims>
void backward_impl(const Dims d, const FieldInputs& in, const scalar_t* gsigma,
                   const scalar_t* gfeat, const Needs need, scalar_t* d_planes, scalar_t* d_xyz,
                   scalar_t* d_w1, scalar_t* d_b1, scalar_t* d_w2, scalar_t* d_b2) {
  const DecoderWeights<scalar_t> w(in);
  const scalar_t* planes = in.planes_cl.data_ptr<scalar_t>();
  const scalar_t* xyz = in.xyz.data_ptr<scalar_t>();
  const PlaneGeom g = plane_geom(in.planes_cl);
  const int64_t s_batch = in.planes_cl.stride(0);
  // d_planes is contiguous [B, 3, H, W, C]: its own geometry, which may differ from the input's.
  const PlaneGeom dg{g.H, g.W, int64_t(g.H) * g.W * in.C, int64_t(g.W) * in.C, in.C};
  const int64_t d_batch = 3 * dg.s_plane;
  const int64_t plane_elems = in.B * d_batch;
  const scalar_t inv_half_box = scalar_t(2.0 / in.box_warp);
  const int64_t N = in.N, P = in.B * N, F = in.OUT - 1;
  const int64_t nw1 = in.HID * in.C, nw2 = in.OUT * in.HID;

  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                         P / kMinPointsPerPartition));
  if (need.planes) {
    const int64_t bytes = std::max<int64_t>(1, plane_elems * int64_t(sizeof(scalar_t)));
    parts = std::min<int64_t>(parts, 1 + kScratchBudgetBytes / bytes);
  }
  // Partition 0 accumulates straight into d_planes; the others into scratch. Allocated through
  // ATen so the memory shows in torch's allocator statistics (and the benchmarks' peak memory).
  const auto opts = in.planes_cl.options();
  at::Tensor scratch_t = at::zeros({need.planes ? (parts - 1) * plane_elems : 0}, opts);
  scalar_t* scratch = scratch_t.data_ptr<scalar_t>();
  // Weight gradient sums per partition: [w1 | b1 | w2 | b2].
  const int64_t nwt = nw1 + in.HID + nw2 + in.OUT;
  at::Tensor wsum_t = at::zeros({parts * nwt}, opts);
  scalar_t* wsum = wsum_t.data_ptr<scalar_t>();

  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    PointState<Dims, scalar_t> s;
    scalar_t dout[Dims::kMaxOut];
    scalar_t df[Dims::kMaxC];
    for (int64_t part = pbegin; part < pend; ++part) {
      scalar_t* dpl = part == 0 ? d_planes : scratch + (part - 1) * plane_elems;
      scalar_t* acc = wsum + part * nwt;
      scalar_t* __restrict__ aw1 = acc;
      scalar_t* __restrict__ ab1 = aw1 + nw1;
      scalar_t* __restrict__ aw2 = ab1 + in.HID;
      scalar_t* __restrict__ ab2 = aw2 + nw2;
      const int64_t first = P * part / parts, last = P * (part + 1) / parts;
      for (int64_t i = first; i < last; ++i) {
        const int64_t b = i / N;
        const scalar_t* pl = planes + b * s_batch;
        eval_point(d, w, pl, g, in.axes, xyz + 3 * i, inv_half_box, s);
        dout[0] = gsigma[i];
        for (int64_t k = 0; k < F; ++k)
          dout[1 + k] = field::feature_activation_grad(s.o[1 + k], gfeat[i * F + k]);
        if (need.w2)
          for (int k = 0; k < d.out(); ++k)
            for (int j = 0; j < d.hid(); ++j) aw2[k * d.hid() + j] += dout[k] * s.h[j];
        if (need.b2)
          for (int k = 0; k < d.out(); ++k) ab2[k] += dout[k];
        if (!need.upstream_of_w2()) continue;
        field::mlp_backward<Dims, scalar_t>(d, w.w1, w.w2, dout, s.pre, df);  // s.pre <- dpre
        if (need.w1)
          for (int j = 0; j < d.hid(); ++j)
            for (int c = 0; c < d.c(); ++c) aw1[j * d.c() + c] += s.pre[j] * s.f[c];
        if (need.b1)
          for (int j = 0; j < d.hid(); ++j) ab1[j] += s.pre[j];
        if (need.planes || need.xyz) {
          scalar_t* dpl_b = dpl + b * d_batch;
          // Taps are found with the input's geometry g and written at offsets in d_planes' own
          // contiguous layout dg (the header converts).
          scalar_t dxyz[3];
          field::sample_mean_backward(
              d, pl, g, in.axes, s.q, inv_half_box, df, need.planes, dg,
              [dpl_b](int64_t off, scalar_t v) { dpl_b[off] += v; }, need.xyz, dxyz);
          if (need.xyz)
            for (int k = 0; k < 3; ++k) d_xyz[3 * i + k] = dxyz[k];
        }
      }
    }
  });

  // Sum the partitions' plane buffers into d_planes and their weight sums into the outputs.
  if (need.planes && parts > 1) {
    at::parallel_for(0, plane_elems, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t p = 1; p < parts; ++p) {
        const scalar_t* src = scratch + (p - 1) * plane_elems;
        for (int64_t e = begin; e < end; ++e) d_planes[e] += src[e];
      }
    });
  }
  scalar_t* outs[4] = {d_w1, d_b1, d_w2, d_b2};
  const int64_t sizes[4] = {nw1, in.HID, nw2, in.OUT};
  int64_t at_ = 0;
  for (int t = 0; t < 4; ++t) {
    if (outs[t] != nullptr)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        scalar_t sum = 0;
        for (int64_t p = 0; p < parts; ++p) sum += wsum[p * nwt + at_ + e];
        outs[t][e] = sum;
      }
    at_ += sizes[t];
  }
}

// Calls fn(dims) with the compile-time EG3D sizes when they match, else the bounded generic ones.
template <typename Fn>
void dispatch_dims(const FieldInputs& in, Fn&& fn) {
  if (in.C == 32 && in.HID == 64 && in.OUT == 33) {
    fn(EG3DDims{});
  } else {
    TORCH_CHECK_VALUE(in.C <= kCpuMaxC && in.HID <= kCpuMaxHid && in.OUT <= kCpuMaxOut,
                      "triplane_field (cpu): sizes C=", in.C, ", hidden=", in.HID, ", 1+F=", in.OUT,
                      " exceed the CPU kernel's bounds ", kCpuMaxC, "/", kCpuMaxHid, "/",
                      kCpuMaxOut);
    fn(GenericDims{static_cast<int>(in.C), static_cast<int>(in.HID), static_cast<int>(in.OUT)});
  }
}

void check_cpu(const FieldInputs& in) {
  TORCH_CHECK_VALUE(in.planes_cl.device().is_cpu(), "triplane_field (cpu): planes must be on the CPU");
  const auto dt = in.planes_cl.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble,
                   "triplane_field (cpu): the CPU kernel takes float32 or float64, got ", dt,
                   "; half precision is for the CUDA and Triton back ends");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> triplane_field_fwd_cpu(const at::Tensor& planes,
                                                          const at::Tensor& xyz,
                                                          const at::Tensor& w1,
                                                          const at::Tensor& b1,
                                                          const at::Tensor& w2,
                                                          const at::Tensor& b2, double box_warp,
                                                          int64_t axes) {
  const FieldInputs in = prepare_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  check_cpu(in);
  at::Tensor sigma = at::empty({in.B, in.N, 1}, planes.options());
  at::Tensor feat = at::empty({in.B, in.N, in.OUT - 1}, planes.options());
  if (in.B * in.N == 0) return {sigma, feat};
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_field_fwd_cpu", [&] {
    dispatch_dims(in, [&](auto d) {
      forward_impl<scalar_t>(d, in, sigma.data_ptr<scalar_t>(), feat.data_ptr<scalar_t>());
    });
  });
  return {sigma, feat};
}

FieldGrads triplane_field_bwd_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                                  const at::Tensor& planes, const at::Tensor& xyz,
                                  const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, double box_warp, int64_t axes,
                                  std::array<bool, 6> needs) {
  const FieldInputs in = prepare_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  check_cpu(in);
  TORCH_CHECK_VALUE(grad_sigma.sizes() == at::IntArrayRef({in.B, in.N, 1}),
                    "triplane_field backward: grad_sigma must be [B, N, 1], got ", grad_sigma.sizes());
  TORCH_CHECK_VALUE(grad_feat.sizes() == at::IntArrayRef({in.B, in.N, in.OUT - 1}),
                    "triplane_field backward: grad_feat must be [B, N, F], got ", grad_feat.sizes());
  const Needs need{needs[0], needs[1], needs[2], needs[3], needs[4], needs[5]};
  const auto opts = planes.options();
  const at::Tensor gs = grad_sigma.to(planes.scalar_type()).contiguous();
  const at::Tensor gf = grad_feat.to(planes.scalar_type()).contiguous();
  at::Tensor d_planes = need.planes ? at::zeros({in.B, 3, in.H, in.W, in.C}, opts)
                                    : grad_placeholder(planes);
  at::Tensor d_xyz = need.xyz ? at::zeros({in.B, in.N, 3}, opts) : grad_placeholder(xyz);
  at::Tensor d_w1 = need.w1 ? at::zeros_like(in.w1) : grad_placeholder(w1);
  at::Tensor d_b1 = need.b1 ? at::zeros_like(in.b1) : grad_placeholder(b1);
  at::Tensor d_w2 = need.w2 ? at::zeros_like(in.w2) : grad_placeholder(w2);
  at::Tensor d_b2 = need.b2 ? at::zeros_like(in.b2) : grad_placeholder(b2);
  if (in.B * in.N > 0) {
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_field_bwd_cpu", [&] {
      auto ptr = [](at::Tensor& t, bool want) { return want ? t.data_ptr<scalar_t>() : nullptr; };
      dispatch_dims(in, [&](auto d) {
        backward_impl<scalar_t>(d, in, gs.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), need,
                                ptr(d_planes, need.planes), ptr(d_xyz, need.xyz),
                                ptr(d_w1, need.w1), ptr(d_b1, need.b1), ptr(d_w2, need.w2),
                                ptr(d_b2, need.b2));
      });
    });
  }
  // Back to the API layout [B, 3, C, H, W] (a view; the buffer stays channels-last).
  if (need.planes) d_planes = d_planes.permute({0, 1, 4, 2, 3});
  return {d_planes, d_xyz, d_w1, d_b1, d_w2, d_b2};
}

}  // namespace talk3d
