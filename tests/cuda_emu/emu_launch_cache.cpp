// Checks kernels/common/grid.cuh's launch cache on the CPU: each runtime query is made once per
// device (and kernel, threads, bytes), a failed query is asked again, and the >48 KB shared-memory
// opt-in happens with the first occupancy query. The CUDA runtime calls are mocked and counted.
// Built and run by tests/test_launch_cache.py; prints "ok" or the first failed check.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

int g_device = 0, g_attr_calls = 0, g_occ_calls = 0, g_set_calls = 0, g_fail_next = 0;
int g_opt_in[4] = {0, 0, 0, 0};  // the shared-memory opt-in of kernel_b per device, as the runtime keeps it
extern "C" {
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = g_device; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr a, int dev) {
  ++g_attr_calls;
  if (g_fail_next) { g_fail_next = 0; return cudaErrorInvalidDevice; }
  *v = 100 * (dev + 1) + int(a == cudaDevAttrMultiProcessorCount);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int v) {
  ++g_set_calls;
  g_opt_in[g_device] = v;  // the last value set wins
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int threads, size_t) {
  ++g_occ_calls;
  *n = 2048 / threads;
  return cudaSuccess;
}
}

#include "common/grid.cuh"

#define CHECK(c) do { if (!(c)) { printf("failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

int main() {
  using namespace talk3d::cuda;
  int blocks = 0, dev = 0, v = 0, per_sm = 0;
  // SM count: asked once per device.
  CHECK(grid_stride_blocks(1 << 20, 128, 4, blocks) == cudaSuccess && blocks == 101 * 4);
  CHECK(grid_stride_blocks(10, 128, 4, blocks) == cudaSuccess && blocks == 1);
  CHECK(g_attr_calls == 1);
  g_device = 1;
  CHECK(grid_stride_blocks(1 << 20, 128, 4, blocks) == cudaSuccess && blocks == 201 * 4 && g_attr_calls == 2);
  // Another attribute of a device is its own entry.
  CHECK(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, v) == cudaSuccess && dev == 1 && v == 200);
  CHECK(g_attr_calls == 3);
  // A failed query is not remembered.
  g_device = 2;
  g_fail_next = 1;
  CHECK(grid_stride_blocks(1, 128, 4, blocks) == cudaErrorInvalidDevice && g_attr_calls == 4);
  CHECK(grid_stride_blocks(1 << 20, 128, 4, blocks) == cudaSuccess && blocks == 301 * 4 && g_attr_calls == 5);
  // Occupancy: per kernel, threads and bytes; the opt-in only above 48 KB, once.
  static const int kernel_a = 0, kernel_b = 0;
  CHECK(blocks_per_sm(&kernel_a, 128, 1024, per_sm) == cudaSuccess && per_sm == 16);
  CHECK(blocks_per_sm(&kernel_a, 128, 1024, per_sm) == cudaSuccess && g_occ_calls == 1 && g_set_calls == 0);
  CHECK(blocks_per_sm(&kernel_a, 256, 1024, per_sm) == cudaSuccess && per_sm == 8 && g_occ_calls == 2);
  CHECK(blocks_per_sm(&kernel_b, 128, 64 * 1024, per_sm) == cudaSuccess && g_occ_calls == 3 && g_set_calls == 1);
  CHECK(blocks_per_sm(&kernel_b, 128, 64 * 1024, per_sm) == cudaSuccess && g_occ_calls == 3 && g_set_calls == 1);
  g_device = 0;  // the opt-in is per device
  CHECK(blocks_per_sm(&kernel_b, 128, 64 * 1024, per_sm) == cudaSuccess && g_occ_calls == 4 && g_set_calls == 2);
  // One kernel launched with more, then less, then more again (the fp64 backward with and without
  // weight gradients): the opt-in must cover every launch, so it is raised, never lowered.
  CHECK(blocks_per_sm(&kernel_b, 64, 200 * 1024, per_sm) == cudaSuccess && g_opt_in[0] >= 200 * 1024);
  CHECK(blocks_per_sm(&kernel_b, 128, 67 * 1024, per_sm) == cudaSuccess && g_opt_in[0] >= 200 * 1024);
  CHECK(blocks_per_sm(&kernel_b, 64, 200 * 1024, per_sm) == cudaSuccess && g_opt_in[0] >= 200 * 1024);
  CHECK(g_set_calls == 3);
  printf("ok\n");
  return 0;
}
