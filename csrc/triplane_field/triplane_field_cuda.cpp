// CUDA implementation of the triplane field ops: validates, allocates, and calls the torch-free
// launchers in kernels/triplane_field. Compiled only when the installed torch has CUDA.
#include <algorithm>
#include <cstdlib>
#include <string>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "triplane_field.h"
#include "triplane_field/triplane_field_cuda.h"

namespace talk3d {

namespace {

cuda::FieldDType storage_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::FieldDType::kF32;
    case at::kHalf: return cuda::FieldDType::kF16;
    case at::kBFloat16: return cuda::FieldDType::kBF16;
    case at::kDouble: return cuda::FieldDType::kF64;
    default: TORCH_CHECK_TYPE(false, "triplane_field (cuda): unsupported dtype ", t);
  }
}

// TALK3D_FIELD_MMA=1: the forward of fp16/bf16 planes at the EG3D size runs its decoder on tensor
// cores (kernels/triplane_field/field_mma.cuh; sm_80+). Opt-in until it has been timed against the
// FMA kernel on a GPU (benchmarks: field-forward-bf16, cuda-mma). Read at every call, so a process
// can compare both.
bool tensor_cores_requested() {
  const char* v = std::getenv("TALK3D_FIELD_MMA");
  return v != nullptr && std::string(v) == "1";
}

cuda::FieldProblem make_problem(const FieldInputs& in) {
  TORCH_CHECK_VALUE(in.planes_cl.is_cuda(), "triplane_field (cuda): planes must be on a CUDA device");
  TORCH_CHECK_VALUE((in.C <= cuda::kMaxC && in.HID <= cuda::kMaxHid && in.OUT <= cuda::kMaxOut) ||
                        (in.C == 32 && in.HID == 64 && in.OUT == 33),
                    "triplane_field (cuda): sizes C=", in.C, ", hidden=", in.HID, ", 1+F=", in.OUT,
                    " exceed the CUDA kernel's bounds");
  cuda::FieldProblem p;
  p.dtype = storage_dtype(in.planes_cl.scalar_type());
  p.planes = in.planes_cl.data_ptr();
  p.s_batch = in.planes_cl.stride(0);
  p.s_plane = in.planes_cl.stride(1);
  p.s_y = in.planes_cl.stride(2);
  p.s_x = in.planes_cl.stride(3);
  p.B = static_cast<int>(in.B);
  p.H = static_cast<int>(in.H);
  p.W = static_cast<int>(in.W);
  p.C = static_cast<int>(in.C);
  p.xyz = in.xyz.data_ptr();
  p.N = in.N;
  p.w1 = in.w1.data_ptr();
  p.b1 = in.b1.data_ptr();
  p.w2 = in.w2.data_ptr();
  p.b2 = in.b2.data_ptr();
  p.HID = static_cast<int>(in.HID);
  p.OUT = static_cast<int>(in.OUT);
  p.box_warp = in.box_warp;
  p.axes = in.axes;
  p.mlp = tensor_cores_requested() ? cuda::kMlpTensorCores : cuda::kMlpFma;
  return p;
}

// A gradient buffer's data, or null for a gradient not asked for (the launchers skip those).
void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "triplane_field (cuda): ", what, " failed: ",
              cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& planes, const at::Tensor& xyz,
                                            const at::Tensor& w1, const at::Tensor& b1,
                                            const at::Tensor& w2, const at::Tensor& b2,
                                            double box_warp, int64_t axes) {
  const FieldInputs in = prepare_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor sigma = at::empty({in.B, in.N, 1}, planes.options());
  at::Tensor feat = at::empty({in.B, in.N, in.OUT - 1}, planes.options());
  if (in.B * in.N == 0) return {sigma, feat};
  check_launch(cuda::field_forward(make_problem(in), sigma.data_ptr(), feat.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               "forward");
  return {sigma, feat};
}

// Points per chunk of the streaming backward when the decoder's weight gradients are wanted, at most:
// the chunk's factor rows take BackwardRows::count x 4 B x 2^18 = 204 MB, and one chunk (2^18 threads)
// still fills an H100/H200 at the kernel's three blocks of 128 threads per SM. The chunk is rounded
// down to whole waves of the kernel's resident threads (cuda::field_backward_streaming_wave): 2^18
// points are 5.17 waves on an H100 (3 x 132 x 128 threads), and the sixth, 17 % full, repeated in
// every chunk.
// (Splitting each chunk's GEMMs into 64 batched slices, to give cuBLAS more than a 64 x 33 output to
// spread, was not faster on an H200: the whole backward at the GPU size took 28.4 ms with it and
// 26.8 ms without, in two calls' runs of benchmarks/profile_field.py.)
constexpr int64_t kRowsChunk = int64_t(1) << 18;

// The EG3D-size backward (fp32/fp16/bf16): plane and point gradients from the streaming kernel; the
// decoder's weight gradients as GEMMs (cuBLAS, through at::addmm_) over the factor rows the kernel
// writes for each chunk of points. d: the zero-filled gradient buffers of bwd_cuda.
void backward_streaming(const cuda::FieldProblem& p, const at::Tensor& gs, const at::Tensor& gf,
                        at::Tensor (&d)[6], std::array<bool, 6> needs) {
  using Rows = cuda::BackwardRows;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = int64_t(p.B) * p.N;
  const bool want_w = needs[2] || needs[3] || needs[4] || needs[5];
  int64_t chunk = total;
  if (want_w) {
    int64_t wave = 0;
    check_launch(cuda::field_backward_streaming_wave(p, wave), "backward");
    chunk = std::min(total, wave > 0 && wave <= kRowsChunk ? kRowsChunk / wave * wave : kRowsChunk);
  }
  const auto f32 = gs.options().dtype(at::kFloat);
  at::Tensor rows = want_w ? at::empty({Rows::count, chunk}, f32) : at::Tensor();
  at::Tensor g1 = want_w ? at::zeros({Rows::HID, Rows::C + 1}, f32) : at::Tensor();    // [dW1 | db1]
  at::Tensor g2 = want_w ? at::zeros({Rows::OUT, Rows::HID + 1}, f32) : at::Tensor();  // [dW2 | db2]
  for (int64_t begin = 0; begin < total; begin += chunk) {
    const int64_t n = std::min(chunk, total - begin);
    check_launch(cuda::field_backward_streaming(p, begin, n, gs.data_ptr(), gf.data_ptr(), ptr(d[0]), ptr(d[1]),
                                                want_w ? rows.data_ptr<float>() : nullptr, chunk, stream),
                 "backward");
    if (want_w) {
      const at::Tensor cols = rows.narrow(1, 0, n);
      g1.addmm_(cols.narrow(0, Rows::dpre, Rows::HID), cols.narrow(0, Rows::f, Rows::C + 1).t());
      g2.addmm_(cols.narrow(0, Rows::dout, Rows::OUT), cols.narrow(0, Rows::h, Rows::HID + 1).t());
    }
  }
  if (needs[2]) d[2].copy_(g1.narrow(1, 0, Rows::C));
  if (needs[3]) d[3].copy_(g1.select(1, Rows::C));
  if (needs[4]) d[4].copy_(g2.narrow(1, 0, Rows::HID));
  if (needs[5]) d[5].copy_(g2.select(1, Rows::HID));
}

FieldGrads bwd_cuda(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                    const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1,
                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                    double box_warp, int64_t axes, std::array<bool, 6> needs) {
  const FieldInputs in = prepare_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  const c10::cuda::CUDAGuard guard(planes.device());
  TORCH_CHECK_VALUE(grad_sigma.sizes() == at::IntArrayRef({in.B, in.N, 1}),
                    "triplane_field backward: grad_sigma must be [B, N, 1], got ", grad_sigma.sizes());
  TORCH_CHECK_VALUE(grad_feat.sizes() == at::IntArrayRef({in.B, in.N, in.OUT - 1}),
                    "triplane_field backward: grad_feat must be [B, N, F], got ", grad_feat.sizes());
  // Called through torch.ops directly, a gradient on another device would reach the kernel as a
  // foreign pointer (an illegal access that poisons the CUDA context): refuse it here.
  TORCH_CHECK_VALUE(grad_sigma.device() == planes.device() && grad_feat.device() == planes.device(),
                    "triplane_field backward: grad_sigma and grad_feat must be on the planes' device ",
                    planes.device(), ", got ", grad_sigma.device(), " and ", grad_feat.device());
  const at::Tensor gs = grad_sigma.to(planes.scalar_type()).contiguous();
  const at::Tensor gf = grad_feat.to(planes.scalar_type()).contiguous();
  // Gradients accumulate in fp32 (fp64 for fp64) and are cast to the inputs' dtypes at the end.
  const auto acc = planes.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto o = planes.options().dtype(acc);
  at::Tensor d[6] = {
      needs[0] ? at::zeros({in.B, 3, in.H, in.W, in.C}, o) : at::Tensor(),
      needs[1] ? at::zeros({in.B, in.N, 3}, o) : at::Tensor(),
      needs[2] ? at::zeros({in.HID, in.C}, o) : at::Tensor(),
      needs[3] ? at::zeros({in.HID}, o) : at::Tensor(),
      needs[4] ? at::zeros({in.OUT, in.HID}, o) : at::Tensor(),
      needs[5] ? at::zeros({in.OUT}, o) : at::Tensor(),
  };
  const cuda::FieldProblem problem = make_problem(in);
  if (in.B * in.N > 0 && cuda::field_backward_streaming_applies(problem)) {
    backward_streaming(problem, gs, gf, d, needs);
  } else if (in.B * in.N > 0) {
    check_launch(cuda::field_backward(problem, gs.data_ptr(), gf.data_ptr(), ptr(d[0]), ptr(d[1]),
                                      ptr(d[2]), ptr(d[3]), ptr(d[4]), ptr(d[5]),
                                      c10::cuda::getCurrentCUDAStream()),
                 "backward");
  }
  const at::Tensor* like[6] = {&planes, &xyz, &w1, &b1, &w2, &b2};
  for (int i = 0; i < 6; ++i)
    d[i] = d[i].defined() ? d[i].to(like[i]->scalar_type()) : grad_placeholder(*like[i]);
  if (needs[0]) d[0] = d[0].permute({0, 1, 4, 2, 3});
  return {d[0], d[1], d[2], d[3], d[4], d[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(talk3d, CUDA, m) {
  m.impl("triplane_field_fwd", &fwd_cuda);
  m.impl("triplane_field_bwd", &bwd_cuda);
}

}  // namespace talk3d
