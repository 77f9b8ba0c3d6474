// Grid sizing of the grid-stride kernels (composite, occupancy marching, binomial filter, bias_act)
// and their index type. Torch-free, like every kernel here.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <tuple>

namespace talk3d {
namespace cuda {

// Launch queries, answered once per device (and kernel): a rendered frame makes dozens of launches,
// and at one 128² frame (a few hundred microseconds of GPU work) a few microseconds of runtime
// queries before each is not negligible. Device attributes and occupancies cannot change while the
// process runs (torch never resets a device), so a mutex-guarded map is the whole cache; the lock
// is uncontended. The shared-memory opt-in is different: it is the kernel's (on a device), the last
// value set wins, and launches of one kernel may need different amounts, so it is raised whenever a
// launch needs more than any before and never lowered.
namespace launch_cache {

struct Key {
  const void* kernel;  // null for a device attribute
  int device, a, b;    // attribute: (attr, 0); occupancy: (threads, bytes); opt-in: (-1, 0); PTX version: (-2, 0)
  bool operator<(const Key& o) const {
    return std::tie(kernel, device, a, b) < std::tie(o.kernel, o.device, o.a, o.b);
  }
};

inline std::mutex& mutex() {
  static std::mutex m;
  return m;
}
inline std::map<Key, int>& values() {
  static std::map<Key, int> v;
  return v;
}

// `query()` (which sets `value`) on the first call for `key`, the remembered value afterwards. A
// failed query is not remembered. The caller holds the lock.
template <typename Query>
cudaError_t lookup_locked(const Key& key, int& value, Query&& query) {
  auto it = values().find(key);
  if (it != values().end()) {
    value = it->second;
    return cudaSuccess;
  }
  const cudaError_t err = query(value);
  if (err == cudaSuccess) values().emplace(key, value);
  return err;
}

template <typename Query>
cudaError_t lookup(const Key& key, int& value, Query&& query) {
  std::lock_guard<std::mutex> lock(mutex());
  return lookup_locked(key, value, query);
}

}  // namespace launch_cache

// `attr` of the current device (returned in `device` too).
inline cudaError_t device_attribute(cudaDeviceAttr attr, int& device, int& value) {
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int dev = device;
  return launch_cache::lookup({nullptr, dev, int(attr), 0}, value,
                              [&](int& v) { return cudaDeviceGetAttribute(&v, attr, dev); });
}

// Resident blocks per SM of `kernel` at `threads` threads and `bytes` of dynamic shared memory on the
// current device. Above the default 48 KB the kernel is first opted in to at least `bytes` (raised
// when this launch needs more than the kernel's largest opt-in so far on this device).
inline cudaError_t blocks_per_sm(const void* kernel, int threads, size_t bytes, int& per_sm) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(launch_cache::mutex());
  if (bytes > 48 * 1024) {
    auto& opted = launch_cache::values()[{kernel, device, -1, 0}];  // 0 until the first opt-in
    if (int(bytes) > opted) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
      if (err != cudaSuccess) return err;
      opted = int(bytes);
    }
  }
  return launch_cache::lookup_locked({kernel, device, threads, int(bytes)}, per_sm, [&](int& v) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, bytes);
  });
}

// Enough blocks of `threads` to cover `work` items once, at most `blocks_per_sm` per SM of the current
// device; a grid-stride loop in the kernel takes the items beyond that.
inline cudaError_t grid_stride_blocks(int64_t work, int threads, int blocks_per_sm, int& blocks) {
  int dev = 0, sms = 0;
  const cudaError_t err = device_attribute(cudaDevAttrMultiProcessorCount, dev, sms);
  if (err != cudaSuccess) return err;
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = int64_t(sms > 0 ? sms : 1) * blocks_per_sm;
  blocks = int(needed < cap ? needed : cap);
  return cudaSuccess;
}

// The largest index a kernel indexed in int32 may reach. The CPU emulator's tests lower it (to 0) to
// run the int64-indexed kernels on small tensors: no test machine holds 2^31 elements.
#ifndef TALK3D_NARROW_INDEX_LIMIT
#define TALK3D_NARROW_INDEX_LIMIT INT32_MAX
#endif

// `launch(int32_t{})` when every index a kernel forms stays at or below `biggest` and int32 holds it,
// else `launch(int64_t{})`: 64-bit index arithmetic costs several instructions per operation (tens
// for a division or modulo) on a GPU.
template <typename Launch>
cudaError_t with_index_type(int64_t biggest, Launch&& launch) {
  return biggest <= int64_t(TALK3D_NARROW_INDEX_LIMIT) ? launch(int32_t{}) : launch(int64_t{});
}

}  // namespace cuda
}  // namespace talk3d
