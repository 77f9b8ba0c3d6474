// Per-ray math of occupancy-grid marching, shared by the CPU and CUDA kernels.
//
// The grid covers the scene cube [-box/2, box/2]^3 with res^3 cells, one bit each: cell (x, y, z)
// (x along world x) is bit (z * res + y) * res + x of a byte array, least significant bit first.
// Space outside the cube is one more "cell": the triplane reads zero features there, so the field
// is a constant, occupied or not as a whole (`outside_occupied`).
//
// A ray's occupied span is the smallest [first, last] within [t_lo, t_hi] that contains every point
// of the ray in an occupied cell. It is found by walking the cells the ray crosses (Amanatides-Woo),
// so no occupied cell is missed however thin the ray's path through it.
#pragma once

#include "talk3d/common.h"

namespace talk3d {
namespace occupancy {

T3D_HD bool cell_bit(const uint8_t* bits, int res, int x, int y, int z) {
  const int64_t idx = (int64_t(z) * res + y) * res + x;
  return (bits[idx >> 3] >> (idx & 7)) & 1;
}

// Whether a cell the ray touches at walk position idx is occupied: on each axis, the cells
// idx + lo .. idx + hi. Both are 0 on the axes the ray crosses; on an axis it runs parallel to
// (d = 0) they take in the neighbour whose closed slab also holds the ray, when the ray lies on the
// face between the two (the cells are closed boxes: such a ray runs through both).
T3D_HD bool touched_occupied(const uint8_t* bits, int res, const int idx[3], const int lo[3],
                             const int hi[3]) {
  for (int z = idx[2] + lo[2]; z <= idx[2] + hi[2]; ++z)
    for (int y = idx[1] + lo[1]; y <= idx[1] + hi[1]; ++y)
      for (int x = idx[0] + lo[0]; x <= idx[0] + hi[0]; ++x)
        if (cell_bit(bits, res, x, y, z)) return true;
  return false;
}

template <typename acc_t>
struct Span {
  acc_t first, last;
  bool any;
  T3D_HD void add(acc_t a, acc_t b) {
    if (!any) {
      first = a;
      last = b;
      any = true;
    } else {
      first = a < first ? a : first;
      last = b > last ? b : last;
    }
  }
};

// Entry and exit depths of the ray o + t d through the cube [-half, half]^3; empty when t0 >= t1.
template <typename acc_t>
T3D_HD void cube_limits(const acc_t* o, const acc_t* d, acc_t half, acc_t& t0, acc_t& t1) {
  t0 = -INFINITY;
  t1 = INFINITY;
  for (int a = 0; a < 3; ++a) {
    if (d[a] == acc_t(0)) {
      if (o[a] < -half || o[a] > half) {  // parallel to the slab and outside it
        t0 = INFINITY;
        t1 = -INFINITY;
      }
      continue;
    }
    const acc_t inv = acc_t(1) / d[a];
    acc_t ta = (-half - o[a]) * inv, tb = (half - o[a]) * inv;
    if (ta > tb) {
      const acc_t tmp = ta;
      ta = tb;
      tb = tmp;
    }
    t0 = ta > t0 ? ta : t0;
    t1 = tb < t1 ? tb : t1;
  }
}

// Occupied span of the segment [t_lo, t_hi] of the ray o + t d.
template <typename acc_t>
T3D_HD Span<acc_t> occupied_span(const acc_t* o, const acc_t* d, acc_t t_lo, acc_t t_hi,
                                 const uint8_t* bits, int res, acc_t box, bool outside_occupied) {
  Span<acc_t> span{acc_t(0), acc_t(0), false};
  if (!(t_lo <= t_hi)) return span;
  const acc_t half = box * acc_t(0.5);
  acc_t tb0, tb1;
  cube_limits(o, d, half, tb0, tb1);
  const bool hits = tb0 < tb1;
  if (outside_occupied) {
    if (!hits || t_lo < tb0) span.add(t_lo, hits ? (tb0 < t_hi ? tb0 : t_hi) : t_hi);
    if (hits && t_hi > tb1) span.add(tb1 > t_lo ? tb1 : t_lo, t_hi);
  }
  acc_t t = t_lo > tb0 ? t_lo : tb0;
  const acc_t t_end = t_hi < tb1 ? t_hi : tb1;
  if (!hits || !(t < t_end)) return span;
  const acc_t cell = box / acc_t(res);
  int idx[3], step[3], lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0};
  acc_t t_next[3], t_delta[3];
  // The cell holding the segment's midpoint-side start: evaluate a hair inside to stay off faces.
  const acc_t t_probe = t + (t_end - t) * acc_t(1e-6);
  for (int a = 0; a < 3; ++a) {
    const acc_t g = (o[a] + d[a] * t_probe + half) / cell;
    int i = static_cast<int>(t3d_floor(g));
    i = i < 0 ? 0 : (i >= res ? res - 1 : i);
    idx[a] = i;
    if (d[a] > acc_t(0)) {
      step[a] = 1;
      t_next[a] = ((i + 1) * cell - half - o[a]) / d[a];
      t_delta[a] = cell / d[a];
    } else if (d[a] < acc_t(0)) {
      step[a] = -1;
      t_next[a] = (i * cell - half - o[a]) / d[a];
      t_delta[a] = -cell / d[a];
    } else {
      step[a] = 0;
      t_next[a] = INFINITY;
      t_delta[a] = INFINITY;
      // Parallel to this axis: the ray may lie on a face plane between two cells (o exactly on a
      // cell boundary), and then touches the neighbour too. The slabs as the reference bounds them.
      const acc_t below = (i - 1) * cell - half, above = (i + 1) * cell - half;
      if (i > 0 && o[a] >= below && o[a] <= below + cell) lo[a] = -1;
      if (i + 1 < res && o[a] >= above && o[a] <= above + cell) hi[a] = 1;
    }
  }
  // Almost every ray touches one cell at a time: the neighbours' loop only for those on a face.
  const bool on_face = (lo[0] | lo[1] | lo[2] | hi[0] | hi[1] | hi[2]) != 0;
  // Each step leaves one cell through one face: at most 3 * res steps inside the cube.
  for (int it = 0; it < 3 * res + 3 && t < t_end; ++it) {
    const int a = t_next[0] <= t_next[1] ? (t_next[0] <= t_next[2] ? 0 : 2)
                                         : (t_next[1] <= t_next[2] ? 1 : 2);
    const acc_t t_exit = t_next[a] < t_end ? t_next[a] : t_end;
    const bool occupied = on_face ? touched_occupied(bits, res, idx, lo, hi)
                                  : cell_bit(bits, res, idx[0], idx[1], idx[2]);
    if (occupied) span.add(t, t_exit);
    t = t_exit;
    idx[a] += step[a];
    if (idx[a] < 0 || idx[a] >= res) break;
    t_next[a] += t_delta[a];
  }
  return span;
}

// Intervals [t_i, t_{i+1}] (i in [0, n - 2]) of a ray's sorted samples that overlap its occupied
// span: k0..k1 inclusive, or k0 = k1 = -1 when none does.
template <typename acc_t, typename T>
T3D_HD void live_intervals(const T* t, int64_t n, const Span<acc_t>& span, int& k0, int& k1) {
  k0 = -1;
  k1 = -1;
  if (!span.any || n < 2) return;
  for (int64_t i = 0; i + 1 < n; ++i) {
    if (acc_t(t[i + 1]) >= span.first) {
      k0 = static_cast<int>(i);
      break;
    }
  }
  for (int64_t i = n - 2; i >= 0; --i) {
    if (acc_t(t[i]) <= span.last) {
      k1 = static_cast<int>(i);
      break;
    }
  }
  if (k0 < 0 || k1 < 0 || k0 > k1) k0 = k1 = -1;
}

}  // namespace occupancy
}  // namespace talk3d
