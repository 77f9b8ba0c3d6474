// Input checks and the C++ CPU kernels of bias_act: parallel loops over runs of elements that share a
// channel (NCHW: one bias per run) or hold every channel once (channels-last: the bias vector), around
// talk3d/bias_act_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "bias_act.h"
#include "talk3d/bias_act_math.h"

namespace talk3d {

void check_bias_act_inputs(const char* who, const at::Tensor& x, const c10::optional<at::Tensor>& b, double gain) {
  TORCH_CHECK_VALUE(x.dim() >= 2, who, ": x must be [N, C, ...] (at least 2-D), got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, who,
                   ": x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(gain > 0, who, ": gain must be > 0 (the backward reads the activation's sign off y), got ",
                    gain);
  if (b.has_value() && b->defined()) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == x.size(1), who, ": b must be [C] = [", x.size(1),
                      "], got ", b->sizes());
    const auto want = t == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_TYPE(b->scalar_type() == want, who, ": b must be ", want, " for ", t, " x, got ",
                     b->scalar_type());
    TORCH_CHECK_VALUE(b->device() == x.device(), who, ": b is on ", b->device(), " but x is on ", x.device());
  }
}

at::Tensor bias_act_dense(const at::Tensor& x) {
  if (x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))) return x;
  return x.contiguous();
}

BiasActBackwardOperands bias_act_backward_operands(const char* who, const at::Tensor& grad, const at::Tensor& y,
                                                   double gain) {
  check_bias_act_inputs(who, y, c10::nullopt, gain);
  TORCH_CHECK_VALUE(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(), who,
                    ": grad must match y's shape and dtype, got ", grad.sizes(), " ", grad.scalar_type(), " for ",
                    y.sizes(), " ", y.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == y.device(), who, ": grad is on ", grad.device(), " but y is on ", y.device());
  const at::Tensor ys = bias_act_dense(y);
  const auto format = ys.is_contiguous() ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  return {ys, grad.contiguous(format)};
}

BiasActLayout bias_act_layout(const at::Tensor& dense) {
  if (!dense.is_contiguous()) return {dense.size(1), 1};  // channels-last: the channel runs fastest
  int64_t inner = 1;
  for (int64_t d = 2; d < dense.dim(); ++d) inner *= dense.size(d);
  return {dense.size(1), inner};
}

namespace {

template <typename F>
void for_runs(int64_t n, int64_t run, F&& body) {
  // Runs of `run` elements; ~16K elements per task amortise the scheduling.
  const int64_t runs = n / run;
  const int64_t grain = std::max<int64_t>(1, 16384 / run);
  at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r, r * run);
  });
}

}  // namespace

at::Tensor bias_act_fwd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& b, double slope, double gain,
                            double clamp) {
  check_bias_act_inputs("bias_act (cpu)", x, b, gain);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "bias_act (cpu): x must be on the CPU");
  const at::Tensor src = bias_act_dense(x);
  at::Tensor out = at::empty_like(src);
  const int64_t n = src.numel();
  if (n == 0) return out;
  const BiasActLayout L = bias_act_layout(src);
  // No bias: a zero one, so that every layout takes the same two loops.
  const at::Tensor bias = (b.has_value() && b->defined())
                              ? b->contiguous()
                              : at::zeros({L.C}, src.options().dtype(src.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "bias_act_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xs = src.data_ptr<scalar_t>();
    scalar_t* ys = out.data_ptr<scalar_t>();
    const acc_t* bs = bias.data_ptr<acc_t>();
    const acc_t s = acc_t(slope), g = acc_t(gain), c = acc_t(clamp);
    const auto f = [&](int64_t i, acc_t bias_i) {
      ys[i] = static_cast<scalar_t>(bias_act::forward<acc_t>(static_cast<acc_t>(xs[i]), bias_i, s, g, c));
    };
    if (L.inner > 1) {  // runs of one channel: contiguous [N, C, ...] rows, one bias each
      for_runs(n, L.inner, [&](int64_t r, int64_t i0) {
        const acc_t bias_r = bs[r % L.C];
        for (int64_t k = 0; k < L.inner; ++k) f(i0 + k, bias_r);
      });
    } else {  // channels-last (or [N, C]): each run holds every channel once
      for_runs(n, L.C, [&](int64_t, int64_t i0) {
        for (int64_t k = 0; k < L.C; ++k) f(i0 + k, bs[k]);
      });
    }
  });
  return out;
}

at::Tensor bias_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& y, double slope, double gain, double clamp) {
  const BiasActBackwardOperands ops = bias_act_backward_operands("bias_act backward (cpu)", grad, y, gain);
  const at::Tensor &ys = ops.y, &gs = ops.grad;
  TORCH_CHECK_VALUE(ys.device().is_cpu(), "bias_act backward (cpu): tensors must be on the CPU");
  at::Tensor dx = at::empty_like(ys);
  const int64_t n = ys.numel();
  if (n == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ys.scalar_type(), "bias_act_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* yp = ys.data_ptr<scalar_t>();
    const scalar_t* gp = gs.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const acc_t s = acc_t(slope), g = acc_t(gain), c = acc_t(clamp);
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        dp[i] = static_cast<scalar_t>(
            bias_act::backward<acc_t>(static_cast<acc_t>(gp[i]), static_cast<acc_t>(yp[i]), s, g, c));
    });
  });
  return dx;
}

}  // namespace talk3d
