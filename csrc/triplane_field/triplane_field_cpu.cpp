// C++ CPU back end of the fused triplane field: thin loops around triplane_field_math.h.
//
// Forward: points are independent; at::parallel_for over them. The training forward
// (triplane_field_fwd_train) also keeps each point's decoder input f and pre-activations, [C + HID]
// per point, so that the backward does not sample and decode every point a second time (that
// recompute was half of the backward's phase A; the GPU recomputes instead, where memory is dearer).
// Backward, per chunk of points, in two parallel phases:
//   A. over tiles of kTile points: recompute (or read) the forward, back-propagate through the
//      decoder, write each point's feature gradient df into a chunk buffer, and add the tile's
//      weight gradients as outer-product sums (rows kept in registers, so the accumulators are
//      read and written once per tile instead of once per point); one set of weight sums per
//      task. At the EG3D size in float the decoder and these sums run in decoder_cpu.h.
//   B. the taps, per (batch element, plane, band of kBandRows rows): the plane gradient is a
//      scatter. Instead of atomics (a locked CAS per channel per tap costs more than the whole
//      forward) or a private copy of d_planes per task (zeroing, faulting in and summing tens of MB
//      per call), each unit owns a band of rows and adds the taps of the chunk's points that fall
//      in it, listed beforehand by a counting sort of the points by their tap rows (BandBuckets),
//      in point order, so the plane and coordinate gradients come out the same bits whatever the
//      thread count (the weight gradients do not: phase A's per-task partial sums depend on it).
//      The sums go to a band buffer that stays in L2 ([8, W, C]: 256 KB at the EG3D size), then
//      are written out once: as they are into channels-last d_planes, or transposed into the API
//      layout [B, 3, C, H, W] when the planes came in that layout (no separate layout pass over
//      the gradient; API-layout field forward + backward at the CPU size 22-26 -> 20-21 ms, 2-core
//      Zen 5 VM). The same pass reads the plane's taps for the point's share of the coordinate
//      gradient (in the band holding its first tap row), with the taps and df it already has: done
//      in phase A, the gather and the taps were a second time, 4.7 of the 17.5-ms backward at the
//      CPU size. A last loop adds the planes' shares.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "decoder_cpu.h"
#include "layout/layout.h"
#include "layout/transpose_block.h"
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

// Backward: points per tile of phase A (their decoder intermediates, ~1 KB a point at the EG3D
// size, stay in L1/L2 for the weight-gradient sums) ...
constexpr int kTile = 64;
// ... and points per chunk: the chunk's buffers (df [chunk, C], the coordinate shares, the bucket
// lists) bound the backward's memory. Every chunk after the first adds its bands into d_planes, a
// pass over all of it, so chunks are large: as many points as kChunkBytes of df holds (2^18 at
// the EG3D size in float, a CPU training step's field call in one chunk; by arithmetic, df 32 MB,
// the coordinate shares 6 MB and the bucket lists 12 MB), at least 2^14, at most 2^18.
constexpr int64_t kChunkBytes = int64_t(32) << 20;
constexpr int64_t kMinChunk = int64_t(1) << 14, kMaxChunk = int64_t(1) << 18;
// The environment variable TALK3D_CPU_FIELD_CHUNK, when set to a positive number (at most 2^30: the
// bucket lists index points with int32), replaces that size (the tests cover several chunks on
// few points with it); read once per backward call.
int64_t chunk_points(int64_t C, int64_t elem_size) {
  const char* env = std::getenv("TALK3D_CPU_FIELD_CHUNK");
  const long long v = env != nullptr ? std::atoll(env) : 0;
  if (v > 0) return std::min<int64_t>(v, int64_t(1) << 30);
  return std::clamp(kChunkBytes / (std::max<int64_t>(C, 1) * elem_size), kMinChunk, kMaxChunk);
}
// Rows of a band of phase B: a band of d_planes ([8, 256, 32] floats, 256 KB) and the rows of the
// plane its taps read stay in L2 while the band's points are added.
constexpr int kBandRows = 8;
// Points per parallel_for grain in the forward.
constexpr int64_t kForwardGrain = 256;
// Points the forward samples before it decodes any of them. The taps' loads mostly miss the cache
// (consecutive samples of a ray are texels apart); with nothing but loads and FMAs between them,
// the core overlaps the misses of several points, which the decoder's ~300 instructions per point
// kept apart. Field forward + backward at the CPU size, interleaved A/B on the Zen 5 VM, medians of
// 21: 19.9 -> 19.1 ms (channels-last planes), 23.1 -> 22.6 ms (API planes); groups of 4 to 64 alike.
constexpr int64_t kSampleGroup = 16;

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

// The EG3D size in float runs the vector-register decoder of decoder_cpu.h; the rest the shared one.
template <typename Dims, typename scalar_t>
constexpr bool kVectorDecoder = std::is_same_v<Dims, EG3DDims> && std::is_same_v<scalar_t, float>;

// Per-point scratch: the forward's intermediates, kept on the stack.
template <typename Dims, typename acc_t>
struct PointState {
  acc_t q[3];
  acc_t f[Dims::kMaxC];
  alignas(64) acc_t pre[Dims::kMaxHid];  // aligned: the per-unit loops over them need no peeling
  alignas(64) acc_t h[Dims::kMaxHid];
  acc_t o[Dims::kMaxOut];
};

// f [C] -> s.pre, s.h, s.o.
template <typename Dims, typename scalar_t>
void decode(const Dims& d, const DecoderWeights<scalar_t>& w, const scalar_t* f,
            PointState<Dims, scalar_t>& s) {
  if constexpr (kVectorDecoder<Dims, scalar_t>)
    cpu_decoder::mlp_forward(w.w1t.data(), w.b1, w.w2, w.w2t.data(), w.b2, f, s.pre, s.h, s.o);
  else
    field::mlp_forward<Dims, scalar_t>(d, w.w1t.data(), w.b1, w.w2t.data(), w.b2, f, s.pre, s.h,
                                       s.o);
}

template <typename Dims, typename scalar_t>
void eval_point(const Dims& d, const DecoderWeights<scalar_t>& w, const scalar_t* planes,
                const PlaneGeom& g, int axes, const scalar_t* xyz, scalar_t inv_half_box,
                PointState<Dims, scalar_t>& s) {
  field::scale_point(xyz, inv_half_box, s.q);
  field::sample_mean(d, planes, g, axes, s.q, s.f);
  decode(d, w, s.f, s);
}

// saved: [B * N, C + HID] (f, then pre per point) or nullptr.
template <typename scalar_t, typename Dims>
void forward_impl(const Dims d, const FieldInputs& in, scalar_t* sigma, scalar_t* feat,
                  scalar_t* saved) {
  const DecoderWeights<scalar_t> w(in);
  const scalar_t* planes = in.planes_cl.data_ptr<scalar_t>();
  const scalar_t* xyz = in.xyz.data_ptr<scalar_t>();
  const PlaneGeom g = plane_geom(in.planes_cl);
  const int64_t s_batch = in.planes_cl.stride(0);
  const scalar_t inv_half_box = scalar_t(2.0 / in.box_warp);
  const int64_t N = in.N, F = in.OUT - 1;
  at::parallel_for(0, in.B * N, kForwardGrain, [&](int64_t begin, int64_t end) {
    PointState<Dims, scalar_t> s;
    alignas(64) scalar_t fs[kSampleGroup][Dims::kMaxC];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = (i - begin) % kSampleGroup;
      if (slot == 0) {  // sample the next group's points before decoding any of them
        const int64_t gend = std::min(end, i + kSampleGroup);
        for (int64_t k = i; k < gend; ++k) {
          scalar_t q[3];
          field::scale_point(xyz + 3 * k, inv_half_box, q);
          field::sample_mean(d, planes + (k / N) * s_batch, g, in.axes, q, fs[k - i]);
        }
      }
      const scalar_t* f = fs[slot];
      decode(d, w, f, s);
      sigma[i] = s.o[0];
      for (int64_t k = 0; k < F; ++k) feat[i * F + k] = field::feature_activation(s.o[1 + k]);
      if (saved != nullptr) {
        scalar_t* row = saved + i * (d.c() + d.hid());
        for (int c = 0; c < d.c(); ++c) row[c] = f[c];
        for (int j = 0; j < d.hid(); ++j) row[d.c() + j] = s.pre[j];
      }
    }
  });
}

struct Needs {
  bool planes, xyz, w1, b1, w2, b2;
  bool upstream_of_w2() const { return planes || xyz || w1 || b1; }
};

// acc[m * N + n] += sum over t < rows of a[t * lda + m] * b[t * ldb + n]: the weight gradients of
// a tile as sums of outer products. Four rows of acc are summed at a time in local arrays (N <= kMaxN,
// compile-time for the EG3D sizes), which the compiler keeps in vector registers.
template <int kMaxN, typename T>
void add_outer_products(int rows, int M, int N, const T* __restrict__ a, int lda,
                        const T* __restrict__ b, int ldb, T* __restrict__ acc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) {
    T r0[kMaxN], r1[kMaxN], r2[kMaxN], r3[kMaxN];
    for (int n = 0; n < N; ++n) r0[n] = r1[n] = r2[n] = r3[n] = T(0);
    for (int t = 0; t < rows; ++t) {
      const T a0 = a[t * lda + m], a1 = a[t * lda + m + 1], a2 = a[t * lda + m + 2],
              a3 = a[t * lda + m + 3];
      const T* bt = b + t * ldb;
      for (int n = 0; n < N; ++n) {
        r0[n] += a0 * bt[n];
        r1[n] += a1 * bt[n];
        r2[n] += a2 * bt[n];
        r3[n] += a3 * bt[n];
      }
    }
    for (int n = 0; n < N; ++n) {
      acc[(m + 0) * N + n] += r0[n];
      acc[(m + 1) * N + n] += r1[n];
      acc[(m + 2) * N + n] += r2[n];
      acc[(m + 3) * N + n] += r3[n];
    }
  }
  for (; m < M; ++m) {
    T r0[kMaxN];
    for (int n = 0; n < N; ++n) r0[n] = T(0);
    for (int t = 0; t < rows; ++t) {
      const T a0 = a[t * lda + m];
      const T* bt = b + t * ldb;
      for (int n = 0; n < N; ++n) r0[n] += a0 * bt[n];
    }
    for (int n = 0; n < N; ++n) acc[m * N + n] += r0[n];
  }
}

// acc[m] += sum over t < rows of a[t * lda + m].
template <typename T>
void add_column_sums(int rows, int M, const T* __restrict__ a, int lda, T* __restrict__ acc) {
  for (int t = 0; t < rows; ++t)
    for (int m = 0; m < M; ++m) acc[m] += a[t * lda + m];
}

// Phase B's bucket lists: for each work unit, the chunk's points (offsets from the chunk's first)
// that may have taps in it, in point order (so every gradient element sums its points in the same
// order whatever the thread count). A point is listed under at most two units per plane (the
// caller's key function names them; the band pass decides what each does). Built by a counting
// sort, parallel over the points: each task counts its share, the offsets are laid out unit by
// unit and task by task within a unit, and each task writes its share in order.
class BandBuckets {
 public:
  // max_points: the most points a chunk holds (0: no phase B, nothing allocated).
  BandBuckets(int64_t units, int64_t tasks, int64_t max_points)
      : units_(units), tasks_(tasks), count_(max_points > 0 ? size_t(tasks * units) : 0),
        start_(max_points > 0 ? size_t(units + 1) : 0),
        keys_(new int32_t[size_t(max_points) * 6]),  // uninitialised: filled before any read
        idx_(new int32_t[size_t(max_points) * 6]) {}

  // key_fn(i, keys[6]) writes point i's units, two per plane (the second -1 when only one).
  template <typename KeyFn>
  void fill(int64_t c0, int64_t c1, const KeyFn& key_fn) {
    const int64_t n = c1 - c0;
    std::fill(count_.begin(), count_.end(), 0);
    at::parallel_for(0, tasks_, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        int64_t* cnt = count_.data() + task * units_;
        for (int64_t p = n * task / tasks_; p < n * (task + 1) / tasks_; ++p) {
          int32_t* k = keys_.get() + p * 6;
          key_fn(c0 + p, k);
          for (int e = 0; e < 6; ++e)
            if (k[e] >= 0) ++cnt[k[e]];
        }
      }
    });
    // Offsets: unit-major, task-minor; count_ becomes each (task, unit)'s write cursor.
    int64_t at = 0;
    for (int64_t u = 0; u < units_; ++u) {
      start_[u] = at;
      for (int64_t task = 0; task < tasks_; ++task) {
        const int64_t c = count_[task * units_ + u];
        count_[task * units_ + u] = at;
        at += c;
      }
    }
    start_[units_] = at;
    at::parallel_for(0, tasks_, 1, [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        int64_t* cur = count_.data() + task * units_;
        for (int64_t p = n * task / tasks_; p < n * (task + 1) / tasks_; ++p) {
          const int32_t* k = keys_.get() + p * 6;
          for (int e = 0; e < 6; ++e)
            if (k[e] >= 0) idx_[cur[k[e]]++] = int32_t(p);
        }
      }
    });
  }
  const int32_t* begin(int64_t unit) const { return idx_.get() + start_[unit]; }
  const int32_t* end(int64_t unit) const { return idx_.get() + start_[unit + 1]; }

 private:
  int64_t units_, tasks_;
  std::vector<int64_t> count_, start_;
  std::unique_ptr<int32_t[]> keys_;  // [max_points * 6]: each point's units, two per plane
  std::unique_ptr<int32_t[]> idx_;   // [max_points * 6]: the lists, unit after unit
};

// Phase A's per-task buffers: one tile's decoder intermediates, row t for point t of the tile.
template <typename Dims, typename scalar_t>
struct TileBuffers {
  std::vector<scalar_t> f, h, dpre, dout;
  explicit TileBuffers(const Dims& d)
      : f(kTile * d.c()), h(kTile * d.hid()), dpre(kTile * d.hid()), dout(kTile * d.out()) {}
};

// The forward's saved activations and outputs, when the training forward ran (else nullptrs).
template <typename scalar_t>
struct SavedForward {
  const scalar_t* acts = nullptr;  // [B * N, C + HID]: f, pre
  const scalar_t* feat = nullptr;  // [B * N, F]: the feature output
};

template <typename scalar_t, typename Dims>
void backward_impl(const Dims d, const FieldInputs& in, const scalar_t* gsigma,
                   const scalar_t* gfeat, const SavedForward<scalar_t> fwd, const Needs need,
                   int64_t chunk, scalar_t* d_planes, bool d_planes_api, scalar_t* d_xyz,
                   scalar_t* d_w1, scalar_t* d_b1, scalar_t* d_w2, scalar_t* d_b2) {
  const DecoderWeights<scalar_t> w(in);
  const scalar_t* planes = in.planes_cl.data_ptr<scalar_t>();
  const scalar_t* xyz = in.xyz.data_ptr<scalar_t>();
  const PlaneGeom g = plane_geom(in.planes_cl);
  const int64_t s_batch = in.planes_cl.stride(0);
  // d_planes is contiguous, [B, 3, H, W, C] or, when d_planes_api (one chunk only), [B, 3, C, H, W]:
  // its own geometry, which may differ from the input's.
  const PlaneGeom dg{g.H, g.W, int64_t(g.H) * g.W * in.C, int64_t(g.W) * in.C, in.C};
  const int64_t d_batch = 3 * dg.s_plane;
  const scalar_t inv_half_box = scalar_t(2.0 / in.box_warp);
  const scalar_t third = scalar_t(1) / scalar_t(3);
  const int64_t N = in.N, P = in.B * N, F = in.OUT - 1;
  const int C = d.c(), HID = d.hid(), OUT = d.out();
  const int64_t nw1 = int64_t(HID) * C, nw2 = int64_t(OUT) * HID;
  const bool want_df = need.planes || need.xyz;
  TORCH_CHECK(!d_planes_api || P <= chunk, "triplane_field (cpu): API-layout bands need one chunk");

  // Weight gradient sums per task of phase A: [w1 | b1 | w2 | b2]. Allocated through ATen so the
  // memory shows in torch's allocator statistics (and the benchmarks' peak memory).
  const auto opts = in.planes_cl.options();
  const int64_t tasks = std::max<int64_t>(1, at::get_num_threads());
  const int64_t nwt = nw1 + HID + nw2 + OUT;
  at::Tensor wsum_t = at::zeros({tasks * nwt}, opts);
  scalar_t* wsum = wsum_t.data_ptr<scalar_t>();
  at::Tensor df_t = at::empty({want_df ? std::min(P, chunk) * C : 0}, opts);
  scalar_t* df_buf = df_t.data_ptr<scalar_t>();
  // Phase B's coordinate gradient shares: (gx, gy) per plane per point of the chunk.
  at::Tensor gq_t = at::empty({need.xyz ? 3 * std::min(P, chunk) * 2 : 0}, opts);
  scalar_t* gq_buf = gq_t.data_ptr<scalar_t>();
  // Phase B's work units: (batch element, plane, band of kBandRows rows), each point of the chunk
  // listed in the units its taps' rows fall in (bucket lists, in point order).
  const int64_t bands = (g.H + kBandRows - 1) / kBandRows;
  const int64_t units = in.B * 3 * bands;
  BandBuckets buckets(units, tasks, want_df ? std::min(P, chunk) : 0);

  for (int64_t c0 = 0; c0 < P; c0 += chunk) {
    const int64_t c1 = std::min(P, c0 + chunk);
    const int64_t tiles = (c1 - c0 + kTile - 1) / kTile;
    // ---- phase A: decoder backward, d_xyz, df, weight gradients
    const int64_t parts = std::min(tasks, tiles);
    at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
      PointState<Dims, scalar_t> s;
      TileBuffers<Dims, scalar_t> tb(d);
      scalar_t df[Dims::kMaxC];
      for (int64_t part = pbegin; part < pend; ++part) {
        scalar_t* acc = wsum + part * nwt;
        scalar_t* aw1 = acc;
        scalar_t* ab1 = aw1 + nw1;
        scalar_t* aw2 = ab1 + HID;
        scalar_t* ab2 = aw2 + nw2;
        for (int64_t tile = tiles * part / parts; tile < tiles * (part + 1) / parts; ++tile) {
          const int64_t first = c0 + tile * kTile, last = std::min(c1, first + kTile);
          const int rows = int(last - first);
          for (int t = 0; t < rows; ++t) {
            const int64_t i = first + t;
            const int64_t b = i / N;
            const scalar_t* pl = planes + b * s_batch;
            scalar_t* dout = tb.dout.data() + t * OUT;
            dout[0] = gsigma[i];
            // The tile's rows: the decoder input (for W1's gradient), and the pre-activations,
            // which the decoder backward turns into their gradient in place.
            scalar_t* f_row = tb.f.data() + t * C;
            scalar_t* dpre = tb.dpre.data() + t * HID;
            const bool upstream = need.upstream_of_w2();
            if (fwd.acts != nullptr) {  // read the forward's f and pre; h only for W2's gradient
              const scalar_t* row = fwd.acts + i * (C + HID);
              // Through the local arrays: reading the store and writing tb.h directly, the compiler
              // must assume they alias and leaves the softplus scalar (W2-only backward 4.7 -> 13 ms).
              // From s.pre into s.h (one object, 64-byte aligned members): written straight into tb.h
              // GCC peeled scalar iterations to align the stores, and that scalar softplus was the
              // hottest loop of the backward on an AVX2 core.
              for (int j = 0; j < HID; ++j) s.pre[j] = row[C + j];
              if (need.w2) {
                if constexpr (kVectorDecoder<Dims, scalar_t>)
                  cpu_decoder::softplus_row(s.pre, s.h);
                else
                  for (int j = 0; j < HID; ++j) s.h[j] = field::softplus(s.pre[j]);
                std::memcpy(tb.h.data() + t * HID, s.h, HID * sizeof(scalar_t));
              }
              for (int64_t k = 0; k < F; ++k)
                dout[1 + k] = field::feature_activation_grad_from_output(fwd.feat[i * F + k],
                                                                         gfeat[i * F + k]);
              if (upstream) {
                for (int c = 0; c < C; ++c) f_row[c] = row[c];
                for (int j = 0; j < HID; ++j) dpre[j] = s.pre[j];
              }
            } else {
              eval_point(d, w, pl, g, in.axes, xyz + 3 * i, inv_half_box, s);
              for (int64_t k = 0; k < F; ++k)
                dout[1 + k] = field::feature_activation_grad(s.o[1 + k], gfeat[i * F + k]);
              for (int j = 0; j < HID; ++j) tb.h[t * HID + j] = s.h[j];
              if (upstream) {
                for (int c = 0; c < C; ++c) f_row[c] = s.f[c];
                for (int j = 0; j < HID; ++j) dpre[j] = s.pre[j];
              }
            }
            if (!upstream) continue;
            if constexpr (kVectorDecoder<Dims, scalar_t>)
              cpu_decoder::mlp_backward(w.w1, w.w2, dout, dpre, df);
            else
              field::mlp_backward<Dims, scalar_t>(d, w.w1, w.w2, dout, dpre, df);
            if (want_df)
              for (int c = 0; c < C; ++c) df_buf[(i - c0) * C + c] = df[c];
          }
          if constexpr (kVectorDecoder<Dims, scalar_t>) {
            if (need.w2)
              cpu_decoder::add_outer_products<cpu_decoder::kHid / cpu_decoder::kLanes>(
                  rows, OUT, tb.dout.data(), OUT, tb.h.data(), HID, aw2);
            if (need.w1)
              cpu_decoder::add_outer_products<cpu_decoder::kC / cpu_decoder::kLanes>(
                  rows, HID, tb.dpre.data(), HID, tb.f.data(), C, aw1);
          } else {
            if (need.w2)
              add_outer_products<Dims::kMaxHid>(rows, OUT, HID, tb.dout.data(), OUT, tb.h.data(),
                                                HID, aw2);
            if (need.w1)
              add_outer_products<Dims::kMaxC>(rows, HID, C, tb.dpre.data(), HID, tb.f.data(), C,
                                              aw1);
          }
          if (need.b2) add_column_sums(rows, OUT, tb.dout.data(), OUT, ab2);
          if (need.b1) add_column_sums(rows, HID, tb.dpre.data(), HID, ab1);
        }
      }
    });
    if (!want_df) continue;
    // ---- phase B: per (batch element, plane, band of rows), scatter df / 3 onto the band's taps
    // and take the plane's coordinate-gradient share of the points whose first tap row is in it
    buckets.fill(c0, c1, [&](int64_t i, int32_t* keys) {
      scalar_t q[3];
      field::scale_point(xyz + 3 * i, inv_half_box, q);
      for (int plane = 0; plane < 3; ++plane) {
        int iu, iv;
        field::plane_axes(in.axes, plane, iu, iv);
        // The rows the band pass will take from make_taps: y0 = floor(iy) and y0 + 1, and the
        // owner row (the coordinate share's) y0 clamped into the plane, so that a point whose taps
        // all miss the plane still gets its zero share written, once. The band pass decides all of
        // them from its own make_taps; this pass lists the point under the bands of rows y0 - 1 to
        // y0 + 2 (clamped; one band or two), so that a y0 one off from the band pass's (iy a hair
        // from a whole number, rounded otherwise: one contraction into an FMA here and not there)
        // still finds the point listed wherever its rows are.
        const int y0 = int(t3d_floor(field::pixel_coord(q[iv], g.H)));
        const int lo = std::min(std::max(y0 - 1, 0), g.H - 1) / kBandRows;
        const int hi = std::min(std::max(y0 + 2, 0), g.H - 1) / kBandRows;
        const int32_t base = int32_t(((i / N) * 3 + plane) * bands);
        keys[2 * plane] = base + lo;
        keys[2 * plane + 1] = hi != lo ? base + hi : -1;
      }
    });
    std::atomic<int64_t> next_unit{0};
    at::parallel_for(0, tasks, 1, [&](int64_t tbegin, int64_t tend) {
      if (tbegin >= tend) return;
      std::vector<scalar_t> band_buf(need.planes ? size_t(kBandRows) * g.W * C : 0);
      for (int64_t unit; (unit = next_unit.fetch_add(1)) < units;) {
        const int64_t b = unit / (3 * bands);
        const int plane = int(unit / bands % 3);
        const int y_lo = int(unit % bands) * kBandRows, y_hi = std::min(g.H, y_lo + kBandRows);
        int iu, iv;
        field::plane_axes(in.axes, plane, iu, iv);
        // A later chunk with no point in the band leaves it as it is.
        if (c0 > 0 && buckets.begin(unit) == buckets.end(unit)) continue;
        const scalar_t* pl = planes + b * s_batch;
        scalar_t* buf = band_buf.data();  // [y_hi - y_lo, W, C] channels-last
        if (need.planes) std::fill_n(buf, size_t(y_hi - y_lo) * g.W * C, scalar_t(0));
        for (const int32_t* it = buckets.begin(unit); it != buckets.end(unit); ++it) {
          const int64_t i = c0 + *it;
          scalar_t q[3];
          field::scale_point(xyz + 3 * i, inv_half_box, q);
          const field::Taps<scalar_t> t = field::make_taps<scalar_t>(q[iu], q[iv], g, plane);
          const scalar_t* dfi = df_buf + (i - c0) * C;
          const int y_own = std::min(std::max(t.y0, 0), g.H - 1);
          if (need.xyz && y_own >= y_lo && y_own < y_hi) {
            scalar_t* gq = gq_buf + ((i - c0) * 3 + plane) * 2;
            if constexpr (kVectorDecoder<Dims, scalar_t>)
              cpu_decoder::tap_coord_grad(pl, t, dfi, gq[0], gq[1]);
            else
              field::tap_coord_grad(d, pl, t, dfi, gq[0], gq[1]);
          }
          if (!need.planes) continue;
          for (int k = 0; k < 4; ++k) {
            const int y = t.y0 + (k >> 1);
            if (t.off[k] < 0 || y < y_lo || y >= y_hi) continue;
            const scalar_t wk = t.w[k] * third;
            scalar_t* dst = buf + (int64_t(y - y_lo) * g.W + t.x0 + (k & 1)) * C;
            for (int c = 0; c < C; ++c) dst[c] += wk * dfi[c];
          }
        }
        if (!need.planes) continue;
        // The band into d_planes: written by the first chunk, added by the others; into the API
        // layout, C rows of (y_hi - y_lo) * W values each, transposed on the way.
        if (d_planes_api) {
          const int64_t hw = int64_t(g.H) * g.W, texels = int64_t(y_hi - y_lo) * g.W;
          scalar_t* dst = d_planes + b * d_batch + plane * dg.s_plane + int64_t(y_lo) * g.W;
          layout::transpose_block(buf, C, dst, hw, 0, texels, 0, C, true);
          continue;
        }
        scalar_t* dst = d_planes + b * d_batch + plane * dg.s_plane + y_lo * dg.s_y;
        const int64_t n = int64_t(y_hi - y_lo) * dg.s_y;
        if (c0 == 0)
          std::copy_n(buf, n, dst);
        else
          for (int64_t e = 0; e < n; ++e) dst[e] += buf[e];
      }
    });
    if (!need.xyz) continue;
    // ---- the coordinate gradient: the three planes' shares, in plane order
    at::parallel_for(c0, c1, kForwardGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t dq[3] = {0, 0, 0};
        for (int plane = 0; plane < 3; ++plane) {
          int iu, iv;
          field::plane_axes(in.axes, plane, iu, iv);
          const scalar_t* gq = gq_buf + ((i - c0) * 3 + plane) * 2;
          field::add_coord_grad(g, iu, iv, gq[0], gq[1], dq);
        }
        for (int k = 0; k < 3; ++k) d_xyz[3 * i + k] = dq[k] * inv_half_box;
      }
    });
  }

  // Sum the tasks' weight gradients into the outputs.
  scalar_t* outs[4] = {d_w1, d_b1, d_w2, d_b2};
  const int64_t sizes[4] = {nw1, HID, nw2, OUT};
  int64_t at_ = 0;
  for (int t = 0; t < 4; ++t) {
    if (outs[t] != nullptr)
      for (int64_t e = 0; e < sizes[t]; ++e) {
        scalar_t sum = 0;
        for (int64_t p = 0; p < tasks; ++p) sum += wsum[p * nwt + at_ + e];
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

namespace {

// The forward, keeping the activations the backward reads when `save`; with them planes_cl, the
// channels-last copy it made of planes whose channels are not contiguous (an empty tensor when it
// made none).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double box_warp, int64_t axes, bool save) {
  const FieldInputs in = prepare_field_inputs(planes, xyz, w1, b1, w2, b2, box_warp, axes);
  check_cpu(in);
  // The copy prepare_field_inputs made, [B, 3, H, W, C] contiguous, for the backward to read.
  const at::Tensor planes_cl = planes_copied(planes) ? in.planes_cl : at::empty({0}, planes.options());
  at::Tensor sigma = at::empty({in.B, in.N, 1}, planes.options());
  at::Tensor feat = at::empty({in.B, in.N, in.OUT - 1}, planes.options());
  at::Tensor saved = at::empty({in.B, in.N, save ? in.C + in.HID : 0}, planes.options());
  if (in.B * in.N == 0) return {sigma, feat, saved, planes_cl};
  AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_field_fwd_cpu", [&] {
    dispatch_dims(in, [&](auto d) {
      forward_impl<scalar_t>(d, in, sigma.data_ptr<scalar_t>(), feat.data_ptr<scalar_t>(),
                             save ? saved.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {sigma, feat, saved, planes_cl};
}

// The backward; `saved` / `feat_out` are the training forward's outputs, or undefined tensors.
FieldGrads backward_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                        const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1,
                        const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                        const at::Tensor& saved, const at::Tensor& feat_out,
                        const at::Tensor& planes_cl, double box_warp, int64_t axes,
                        std::array<bool, 6> needs) {
  const bool have_cl = planes_cl.defined() && planes_cl.numel() > 0;
  if (have_cl)
    TORCH_CHECK_VALUE(planes_cl.dim() == 5 && planes.dim() == 5 &&
                          planes_cl.sizes() == at::IntArrayRef({planes.size(0), planes.size(1),
                                                                planes.size(3), planes.size(4),
                                                                planes.size(2)}) &&
                          planes_cl.is_contiguous(),
                      "triplane_field backward: planes_cl must be the forward's contiguous "
                      "[B, 3, H, W, C] copy of planes ", planes.sizes(), ", got ", planes_cl.sizes());
  const FieldInputs in = prepare_field_inputs(have_cl ? planes_cl.permute({0, 1, 4, 2, 3}) : planes,
                                              xyz, w1, b1, w2, b2, box_warp, axes);
  check_cpu(in);
  TORCH_CHECK_VALUE(grad_sigma.sizes() == at::IntArrayRef({in.B, in.N, 1}),
                    "triplane_field backward: grad_sigma must be [B, N, 1], got ", grad_sigma.sizes());
  TORCH_CHECK_VALUE(grad_feat.sizes() == at::IntArrayRef({in.B, in.N, in.OUT - 1}),
                    "triplane_field backward: grad_feat must be [B, N, F], got ", grad_feat.sizes());
  const bool from_saved = saved.defined();
  at::Tensor acts, fo;
  if (from_saved) {
    TORCH_CHECK_VALUE(saved.sizes() == at::IntArrayRef({in.B, in.N, in.C + in.HID}),
                      "triplane_field backward: saved must be [B, N, C + hidden] = [", in.B, ", ",
                      in.N, ", ", in.C + in.HID, "], got ", saved.sizes());
    TORCH_CHECK_VALUE(feat_out.sizes() == at::IntArrayRef({in.B, in.N, in.OUT - 1}),
                      "triplane_field backward: feat must be [B, N, F], got ", feat_out.sizes());
    TORCH_CHECK_TYPE(saved.scalar_type() == planes.scalar_type() &&
                         feat_out.scalar_type() == planes.scalar_type(),
                     "triplane_field backward: saved and feat must have the planes' dtype");
    acts = saved.contiguous();
    fo = feat_out.contiguous();
  }
  const Needs need{needs[0], needs[1], needs[2], needs[3], needs[4], needs[5]};
  const auto opts = planes.options();
  const at::Tensor gs = grad_sigma.to(planes.scalar_type()).contiguous();
  const at::Tensor gf = grad_feat.to(planes.scalar_type()).contiguous();
  // The plane gradient takes the planes' own layout: channels-last memory when they are (the model's
  // buffers; as the kernels want it), else the API's contiguous [B, 3, C, H, W]. Phase B writes
  // its bands straight into either; into the API layout only when the points are one chunk, else
  // into a channels-last buffer transposed at the end (a band would be read and written back
  // transposed once per chunk). Phase B writes every element (a separate zeroing pass over
  // d_planes cost ~2 ms at the CPU size).
  const bool empty = in.B * in.N == 0;
  // With the forward's copy, `planes` may be any stand-in of their shape (autograd keeps only the
  // copy); the copy says the planes' channels were not contiguous.
  const bool api_layout = have_cl || planes_copied(planes);
  const int64_t chunk = chunk_points(in.C, planes.element_size());
  const bool api_direct = api_layout && in.B * in.N <= chunk;
  at::Tensor d_planes;
  if (need.planes) {
    const auto shape = api_direct ? std::vector<int64_t>{in.B, 3, in.C, in.H, in.W}
                                  : std::vector<int64_t>{in.B, 3, in.H, in.W, in.C};
    d_planes = empty ? at::zeros(shape, opts) : at::empty(shape, opts);
  } else {
    d_planes = grad_placeholder(planes);
  }
  at::Tensor d_xyz = need.xyz ? at::empty({in.B, in.N, 3}, opts) : grad_placeholder(xyz);  // all written
  at::Tensor d_w1 = need.w1 ? at::zeros_like(in.w1) : grad_placeholder(w1);
  at::Tensor d_b1 = need.b1 ? at::zeros_like(in.b1) : grad_placeholder(b1);
  at::Tensor d_w2 = need.w2 ? at::zeros_like(in.w2) : grad_placeholder(w2);
  at::Tensor d_b2 = need.b2 ? at::zeros_like(in.b2) : grad_placeholder(b2);
  if (!empty) {
    AT_DISPATCH_FLOATING_TYPES(planes.scalar_type(), "triplane_field_bwd_cpu", [&] {
      auto ptr = [](at::Tensor& t, bool want) { return want ? t.data_ptr<scalar_t>() : nullptr; };
      SavedForward<scalar_t> fwd;
      if (from_saved) {
        fwd.acts = acts.data_ptr<scalar_t>();
        fwd.feat = fo.data_ptr<scalar_t>();
      }
      dispatch_dims(in, [&](auto d) {
        backward_impl<scalar_t>(d, in, gs.data_ptr<scalar_t>(), gf.data_ptr<scalar_t>(), fwd, need,
                                chunk, ptr(d_planes, need.planes), api_direct, ptr(d_xyz, need.xyz),
                                ptr(d_w1, need.w1), ptr(d_b1, need.b1), ptr(d_w2, need.w2),
                                ptr(d_b2, need.b2));
      });
    });
  }
  if (need.planes && !api_direct) {
    if (api_layout)  // several chunks: the channels-last sums transposed once
      d_planes = transpose_inner_cpu(d_planes.view({in.B * 3, in.H * in.W, in.C}))
                     .view({in.B, 3, in.C, in.H, in.W});
    else  // channels-last memory viewed [B, 3, C, H, W]
      d_planes = d_planes.permute({0, 1, 4, 2, 3});
  }
  return {d_planes, d_xyz, d_w1, d_b1, d_w2, d_b2};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> triplane_field_fwd_cpu(const at::Tensor& planes,
                                                          const at::Tensor& xyz,
                                                          const at::Tensor& w1,
                                                          const at::Tensor& b1,
                                                          const at::Tensor& w2,
                                                          const at::Tensor& b2, double box_warp,
                                                          int64_t axes) {
  auto [sigma, feat, saved, planes_cl] =
      forward_cpu(planes, xyz, w1, b1, w2, b2, box_warp, axes, false);
  return {sigma, feat};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplane_field_fwd_train_cpu(
    const at::Tensor& planes, const at::Tensor& xyz, const at::Tensor& w1, const at::Tensor& b1,
    const at::Tensor& w2, const at::Tensor& b2, double box_warp, int64_t axes) {
  return forward_cpu(planes, xyz, w1, b1, w2, b2, box_warp, axes, true);
}

FieldGrads triplane_field_bwd_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                                  const at::Tensor& planes, const at::Tensor& xyz,
                                  const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, double box_warp, int64_t axes,
                                  std::array<bool, 6> needs) {
  return backward_cpu(grad_sigma, grad_feat, planes, xyz, w1, b1, w2, b2, at::Tensor(),
                      at::Tensor(), at::Tensor(), box_warp, axes, needs);
}

FieldGrads triplane_field_bwd_saved_cpu(const at::Tensor& grad_sigma, const at::Tensor& grad_feat,
                                        const at::Tensor& planes, const at::Tensor& xyz,
                                        const at::Tensor& w1, const at::Tensor& b1,
                                        const at::Tensor& w2, const at::Tensor& b2,
                                        const at::Tensor& saved, const at::Tensor& feat,
                                        const at::Tensor& planes_cl, double box_warp, int64_t axes,
                                        std::array<bool, 6> needs) {
  return backward_cpu(grad_sigma, grad_feat, planes, xyz, w1, b1, w2, b2, saved, feat, planes_cl,
                      box_warp, axes, needs);
}

}  // namespace talk3d
