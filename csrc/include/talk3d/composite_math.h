// Per-ray math of EG3D's compositing (MipRayMarcher2), shared by the CPU and CUDA kernels.
//
// A ray holds n samples at sorted depths t_0..t_{n-1} with raw densities s_j and features f_j. It
// is integrated over its n-1 intervals i = [t_i, t_{i+1}]:
//   delta_i = t_{i+1} - t_i,  x_i = softplus((s_i + s_{i+1}) / 2 - 1) * delta_i,
//   alpha_i = 1 - exp(-x_i),  q_i = (1 - alpha_i) + 1e-10,  T_i = q_0 ... q_{i-1},  w_i = alpha_i T_i,
//   C = sum_i w_i (f_i + f_{i+1}) / 2,  Dnum = sum_i w_i (t_i + t_{i+1}) / 2,  W = sum_i w_i,
// and returns feat = 2 C - 1, depth = Dnum / W, weight_sum = W.
//
// Feature sums are taken per sample, C = sum_j f_j (w_{j-1} + w_j) / 2, so every feature row is read
// once and no previous row is kept; only scalars look one sample ahead. Since that sum does not
// depend on the samples' order, composite_weights hands out omega_j = (w_{j-1} + w_j) / 2 itself:
// a renderer that merges two sets of samples by depth can then sort only t and sigma and sum each
// set's features in its own order, instead of gathering every feature row into merged order.
//
// Backward (no per-sample buffers, no division by 1 - alpha). With upstream gradients folded into
// one scalar per interval, v_i = gC . (f_i + f_{i+1}) / 2 + gDnum ((t_i + t_{i+1}) / 2 - depth) + gW,
// where gDnum = g_depth / W carries depth = Dnum / W and gW = g_wsum, the loss is L = sum_i w_i v_i
// (its depth terms sum to gDnum (Dnum - depth W) = 0) and
//   dL/dx_i = e_i T_i v_i - (e_i / q_i) (L - P_i),  e_i = exp(-x_i),  P_i = sum_{k<=i} w_k v_k.
// L comes from the saved forward outputs, so one forward-order pass recomputes T_i and P_i. The ratio
// e_i / q_i lies in [0, 1] (q_i >= 1 - alpha_i as computed), so nothing blows up when alpha_i -> 1;
// the form dL/dalpha_i = T_i v_i - (L - P_i) / q_i would divide by ~1e-10 there.
#pragma once

#include "talk3d/common.h"

namespace talk3d {
namespace composite {

// EG3D's transmittance guard, added to 1 - alpha.
constexpr double kTransmittanceEps = 1e-10;

template <typename acc_t>
struct Interval {
  acc_t alpha, q;     // opacity and transmittance factor (1 - alpha) + eps
  acc_t e;            // exp(-x) = d alpha / d x
  acc_t density;      // softplus(s_mid - 1)
  acc_t ddensity;     // sigmoid(s_mid - 1) = d density / d s_mid
  acc_t delta, t_mid;
};

template <typename acc_t>
T3D_HD Interval<acc_t> make_interval(acc_t s0, acc_t s1, acc_t t0, acc_t t1) {
  Interval<acc_t> iv;
  const acc_t pre = (s0 + s1) * acc_t(0.5) - acc_t(1);
  iv.density = t3d_softplus(pre);
  iv.ddensity = t3d_sigmoid(pre);
  iv.delta = t1 - t0;
  iv.t_mid = (t0 + t1) * acc_t(0.5);
  const acc_t x = iv.density * iv.delta;
  iv.e = t3d_exp(-x);
  iv.alpha = acc_t(1) - iv.e;  // as EG3D computes it (not -expm1), so T matches bit for bit more often
  iv.q = (acc_t(1) - iv.alpha) + acc_t(kTransmittanceEps);
  return iv;
}

// Samples of one ray: element j of sigma/t at sigma[j], t[j]; its features at feat[j * F + c].
template <typename T>
struct RayView {
  const T* sigma;
  const T* t;
  const T* feat;
  int64_t n;
};

template <typename acc_t, typename T>
T3D_HD acc_t load(const T* p, int64_t i) { return static_cast<acc_t>(p[i]); }

// The two scans below visit a ray's samples in depth order and hand each sample's weight
// omega_j = (w_{j-1} + w_j) / 2 to a per-sample policy: the compositing op's policies sum and
// differentiate feature rows (C = sum_j omega_j f_j), composite_weights' write omega_j out and read
// its gradient back, for callers that sum the features themselves (in any sample order).

// Forward scan of one ray: wsum = W, dnum = Dnum; sink(j, omega_j) for every sample j.
template <typename acc_t, typename T, typename Sink>
T3D_HD void forward_scan(const T* sigma, const T* t, int64_t n, Sink& sink, acc_t& wsum, acc_t& dnum) {
  wsum = acc_t(0);
  dnum = acc_t(0);
  if (n <= 0) return;
  acc_t trans = acc_t(1), w_prev = acc_t(0);
  acc_t s_cur = load<acc_t>(sigma, 0), t_cur = load<acc_t>(t, 0);
  for (int64_t j = 0; j < n; ++j) {
    acc_t w = acc_t(0);
    if (j + 1 < n) {
      const acc_t s_next = load<acc_t>(sigma, j + 1), t_next = load<acc_t>(t, j + 1);
      const Interval<acc_t> iv = make_interval(s_cur, s_next, t_cur, t_next);
      w = iv.alpha * trans;
      trans *= iv.q;
      wsum += w;
      dnum = t3d_fma(w, iv.t_mid, dnum);  // one rounding on every code path (see t3d_fma)
      s_cur = s_next;
      t_cur = t_next;
    }
    sink(j, (w_prev + w) * acc_t(0.5));
    w_prev = w;
  }
}

// Feature sums of the compositing op: acc[c] += omega_j f_j[c]. kF > 0 fixes the feature count at
// compile time (registers on the GPU); kF == 0 takes F at run time, up to kMaxF.
template <int kF, int kMaxF, typename acc_t, typename T>
struct FeatureSums {
  const T* feat;  // [n, F]
  int F;
  acc_t* acc;     // [F]
  T3D_HD void operator()(int64_t j, acc_t omega) {
    const T* f = feat + j * F;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < (kF > 0 ? kF : kMaxF); ++c) {
      if (kF == 0 && c >= F) break;
      acc[c] += omega * load<acc_t>(f, c);
    }
  }
};

// Forward of one ray. acc[] must hold F zeros on entry; on return it holds C.
template <int kF, int kMaxF, typename acc_t, typename T>
T3D_HD void forward_ray(const RayView<T>& r, int F_rt, acc_t* acc, acc_t& wsum, acc_t& dnum) {
  FeatureSums<kF, kMaxF, acc_t, T> sums{r.feat, kF > 0 ? kF : F_rt, acc};
  forward_scan(r.sigma, r.t, r.n, sums, wsum, dnum);
}

// Upstream gradients of one ray, folded with its saved outputs into the scalars the pass needs.
template <typename acc_t>
struct RayGrad {
  acc_t g_dnum, g_w;  // g_depth / W and g_wsum: an interval's depth share is g_dnum (t_mid - depth)
  acc_t depth;        // the saved depth (0 for a ray without weight)
  acc_t total;        // L = gC . C + g_w W (composite_weights: sum_j omega_j p_j + g_w W)
};

// The depth and weight-sum part of RayGrad.
// Why t_mid - depth and not g_dnum t_mid - g_depth depth / W: for a ray of tiny weight both of those
// terms are of order t / W and cancel in float32 (W = 3.9e-5, samples 2.1e-5 apart: dt was 2.9e-3
// off, now 4e-8; tests/test_composite.py, docs/log.md thirteenth session), while t_mid - depth is
// exact for nearby values and small.
template <typename acc_t>
T3D_HD RayGrad<acc_t> fold_depth_grad(acc_t depth, acc_t wsum, acc_t g_depth, acc_t g_wsum) {
  RayGrad<acc_t> g;
  g.g_dnum = acc_t(0);
  g.g_w = g_wsum;
  g.depth = acc_t(0);
  // depth = Dnum / W; a ray with W == 0 has depth NaN (0/0) and gets no depth gradient.
  if (wsum > acc_t(0) && depth == depth) {
    g.g_dnum = g_depth / wsum;
    g.depth = depth;
  }
  g.total = g.g_w * wsum;
  return g;
}

// gC[c] = 2 * grad_feat[c] (feat = 2C - 1) must be filled by the caller, and saved_feat is feat.
template <int kF, int kMaxF, typename acc_t, typename T>
T3D_HD RayGrad<acc_t> fold_ray_grad(const acc_t* gC, const T* saved_feat, acc_t depth, acc_t wsum,
                                    acc_t g_depth, acc_t g_wsum, int F_rt) {
  const int F = kF > 0 ? kF : F_rt;
  RayGrad<acc_t> g = fold_depth_grad(depth, wsum, g_depth, g_wsum);
  acc_t total = g.total;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int c = 0; c < (kF > 0 ? kF : kMaxF); ++c) {
    if (kF == 0 && c >= F) break;
    total += gC[c] * (load<acc_t>(saved_feat, c) + acc_t(1)) * acc_t(0.5);
  }
  g.total = total;
  return g;
}

// Backward scan of one ray: writes dsigma[j], dt[j] (either may be null). source(j, omega_j)
// returns p_j = dL/domega_j (and may write sample j's own gradients).
template <typename acc_t, typename T, typename Source>
T3D_HD void backward_scan(const T* sigma, const T* t, int64_t n, Source& source, const RayGrad<acc_t>& g,
                          T* dsigma, T* dt) {
  if (n <= 0) return;
  acc_t trans = acc_t(1), prefix = acc_t(0), w_prev = acc_t(0), p_prev = acc_t(0);
  acc_t ds_carry = acc_t(0), dt_carry = acc_t(0);  // sample j's gradient from interval j-1
  Interval<acc_t> prev{};                           // interval j-1
  acc_t trans_prev = acc_t(1);                      // T_{j-1}
  acc_t s_cur = load<acc_t>(sigma, 0), t_cur = load<acc_t>(t, 0);
  for (int64_t j = 0; j < n; ++j) {
    // Interval j's scalars (its weight is needed for sample j's own gradient).
    Interval<acc_t> iv{};
    acc_t w = acc_t(0);
    const acc_t trans_j = trans;
    if (j + 1 < n) {
      const acc_t s_next = load<acc_t>(sigma, j + 1), t_next = load<acc_t>(t, j + 1);
      iv = make_interval(s_cur, s_next, t_cur, t_next);
      w = iv.alpha * trans;
      trans *= iv.q;
      s_cur = s_next;
      t_cur = t_next;
    }
    const acc_t p = source(j, (w_prev + w) * acc_t(0.5));
    // Interval j-1 is now complete: its value v needs p_{j-1} and p_j.
    acc_t ds_j = acc_t(0), dt_j = acc_t(0);
    if (j >= 1) {
      const acc_t v = (p_prev + p) * acc_t(0.5) + g.g_dnum * (prev.t_mid - g.depth) + g.g_w;
      prefix += w_prev * v;
      const acc_t gx = prev.e * trans_prev * v - (prev.e / prev.q) * (g.total - prefix);
      const acc_t gs_mid = gx * prev.delta * prev.ddensity * acc_t(0.5);
      const acc_t gdelta = gx * prev.density;
      const acc_t gt_mid = w_prev * g.g_dnum * acc_t(0.5);
      if (dsigma) dsigma[j - 1] = static_cast<T>(ds_carry + gs_mid);
      if (dt) dt[j - 1] = static_cast<T>(dt_carry - gdelta + gt_mid);
      ds_j = gs_mid;
      dt_j = gdelta + gt_mid;
    }
    ds_carry = ds_j;
    dt_carry = dt_j;
    prev = iv;
    trans_prev = trans_j;
    w_prev = w;
    p_prev = p;
  }
  if (dsigma) dsigma[n - 1] = static_cast<T>(ds_carry);
  if (dt) dt[n - 1] = static_cast<T>(dt_carry);
}

// Sample j's features in the backward: dL/df_j = gC omega_j (written when dfeat is not null);
// returns p_j = gC . f_j.
template <int kF, int kMaxF, typename acc_t, typename T>
struct FeatureGrads {
  const T* feat;  // [n, F]
  int F;
  const acc_t* gC;
  T* dfeat;       // [n, F] or null
  T3D_HD acc_t operator()(int64_t j, acc_t omega) {
    const T* f = feat + j * F;
    acc_t p = acc_t(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int c = 0; c < (kF > 0 ? kF : kMaxF); ++c) {
      if (kF == 0 && c >= F) break;
      p += gC[c] * load<acc_t>(f, c);
      if (dfeat) dfeat[j * F + c] = static_cast<T>(gC[c] * omega);
    }
    return p;
  }
};

// Backward of one ray: writes dsigma[j], dt[j] (n each) and dfeat[j * F + c] (n * F), in the
// storage type. Any output pointer may be null when that gradient is not wanted.
template <int kF, int kMaxF, typename acc_t, typename T>
T3D_HD void backward_ray(const RayView<T>& r, int F_rt, const acc_t* gC, const RayGrad<acc_t>& g,
                         T* dsigma, T* dt, T* dfeat) {
  FeatureGrads<kF, kMaxF, acc_t, T> grads{r.feat, kF > 0 ? kF : F_rt, gC, dfeat};
  backward_scan(r.sigma, r.t, r.n, grads, g, dsigma, dt);
}

// ---- composite_weights: the per-sample weights omega_j instead of summed features -------------

template <typename acc_t, typename T>
struct WriteWeights {
  T* omega;  // [n]
  T3D_HD void operator()(int64_t j, acc_t w) { omega[j] = static_cast<T>(w); }
};

// Forward of one ray: omega[j] = omega_j (n values), wsum = W, dnum = Dnum.
template <typename acc_t, typename T>
T3D_HD void weights_forward_ray(const T* sigma, const T* t, int64_t n, T* omega, acc_t& wsum, acc_t& dnum) {
  WriteWeights<acc_t, T> sink{omega};
  forward_scan(sigma, t, n, sink, wsum, dnum);
}

template <typename acc_t, typename T>
struct ReadWeightGrads {
  const T* g_omega;  // [n]
  T3D_HD acc_t operator()(int64_t j, acc_t) { return load<acc_t>(g_omega, j); }
};

// RayGrad of one ray of composite_weights: L = sum_j omega_j g_omega_j + g_w W, from the saved
// omega [n] and the upstream g_omega [n].
template <typename acc_t, typename T>
T3D_HD RayGrad<acc_t> fold_weights_grad(const T* omega, const T* g_omega, int64_t n, acc_t depth, acc_t wsum,
                                        acc_t g_depth, acc_t g_wsum) {
  RayGrad<acc_t> g = fold_depth_grad(depth, wsum, g_depth, g_wsum);
  for (int64_t j = 0; j < n; ++j) g.total += load<acc_t>(omega, j) * load<acc_t>(g_omega, j);
  return g;
}

// Backward of one ray of composite_weights: dsigma[j], dt[j] (either may be null).
template <typename acc_t, typename T>
T3D_HD void weights_backward_ray(const T* sigma, const T* t, int64_t n, const T* g_omega, const RayGrad<acc_t>& g,
                                 T* dsigma, T* dt) {
  ReadWeightGrads<acc_t, T> source{g_omega};
  backward_scan(sigma, t, n, source, g, dsigma, dt);
}

}  // namespace composite
}  // namespace talk3d
