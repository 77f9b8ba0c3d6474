// Input checks and the C++ CPU kernel of binomial_filter2d: a loop over output rows around
// talk3d/binomial_filter_math.h, parallel over (plane, row).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "binomial_filter.h"
#include "talk3d/binomial_filter_math.h"

namespace talk3d {

void check_binomial_filter_inputs(const char* who, const at::Tensor& x, int64_t out_h, int64_t out_w) {
  TORCH_CHECK_VALUE(x.dim() == 4, who, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, who,
                   ": x must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(out_h >= 1 && out_w >= 1, who, ": the output must be at least 1 x 1, got ", out_h,
                    " x ", out_w, " (the padding crops away the whole ", x.size(2), " x ", x.size(3),
                    " input)");
}

at::Tensor binomial_filter_dense_input(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous();
}

bool binomial_filter_nhwc(const at::Tensor& src) { return !src.is_contiguous(); }

at::Tensor binomial_filter_output(const at::Tensor& src, int64_t out_h, int64_t out_w) {
  const auto format = binomial_filter_nhwc(src) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return at::empty({src.size(0), src.size(1), out_h, out_w}, src.options().memory_format(format));
}

at::Tensor binomial_filter2d_cpu(const at::Tensor& x, int64_t top, int64_t left, int64_t out_h,
                                 int64_t out_w, double gain) {
  check_binomial_filter_inputs("binomial_filter2d (cpu)", x, out_h, out_w);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "binomial_filter2d (cpu): x must be on the CPU");
  const at::Tensor src = binomial_filter_dense_input(x);
  const bool nhwc = binomial_filter_nhwc(src);
  const int64_t N = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  at::Tensor out = binomial_filter_output(src, out_h, out_w);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "binomial_filter2d_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xs = src.data_ptr<scalar_t>();
    scalar_t* ys = out.data_ptr<scalar_t>();
    // ~16 rows of a 256-wide plane per task: enough work to amortise the scheduling.
    const int64_t grain = std::max<int64_t>(1, 4096 / (out_w * (nhwc ? C : 1)));
    if (nhwc) {
      // A task is an output row; each output pixel sums its 4 x 4 input pixels a whole channel
      // vector at a time (the same association as filter_strip: row_taps, then k_a, then the
      // gain), so the channel loop vectorises. Columns outside the image read a row of zeros.
      const std::vector<scalar_t> zeros(C, scalar_t(0));
      at::parallel_for(0, N * out_h, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> acc(C);
        for (int64_t ni = begin; ni < end; ++ni) {
          const int64_t n = ni / out_h, i = ni - n * out_h;
          const scalar_t* image = xs + n * H * W * C;
          scalar_t* row = ys + ni * out_w * C;
          for (int64_t j = 0; j < out_w; ++j) {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int a = 0; a < fir::kTaps; ++a) {
              const int64_t r = i - top + a;
              if (r < 0 || r >= H) continue;
              const scalar_t* p[fir::kTaps];
              for (int b = 0; b < fir::kTaps; ++b) {
                const int64_t col = j - left + b;
                p[b] = (col >= 0 && col < W) ? image + (r * W + col) * C : zeros.data();
              }
              const acc_t ka = fir::tap<acc_t>(a);
              for (int64_t c = 0; c < C; ++c)
                acc[c] += ka * fir::row_taps<acc_t>(static_cast<acc_t>(p[0][c]), static_cast<acc_t>(p[1][c]),
                                                    static_cast<acc_t>(p[2][c]), static_cast<acc_t>(p[3][c]));
            }
            scalar_t* o = row + j * C;
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc_t(gain) * acc[c]);
          }
        }
      });
    } else {  // NCHW: a task is a run of output rows of channel planes, a strip at a time
      at::parallel_for(0, N * C * out_h, grain, [&](int64_t begin, int64_t end) {
        for (int64_t pr = begin; pr < end; ++pr) {
          const int64_t p = pr / out_h, i = pr - p * out_h;
          const scalar_t* plane = xs + p * H * W;
          const auto load = [plane, W](int64_t r, int64_t col) { return static_cast<acc_t>(plane[r * W + col]); };
          scalar_t* row = ys + pr * out_w;
          acc_t v[fir::kStrip];
          for (int64_t j = 0; j < out_w; j += fir::kStrip) {
            fir::filter_strip<acc_t>(load, H, W, i - top, j - left, acc_t(gain), v);
            const int n = static_cast<int>(std::min<int64_t>(fir::kStrip, out_w - j));
            for (int s = 0; s < n; ++s) row[j + s] = static_cast<scalar_t>(v[s]);
          }
        }
      });
    }
  });
  return out;
}

}  // namespace talk3d
