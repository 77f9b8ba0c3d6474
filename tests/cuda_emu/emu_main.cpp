// CPU emulation of the CUDA kernels in kernels/triplane_field/triplane_field.cu, so their logic
// (indexing, shared-memory tiling, barriers, the fallback configurations) is checked against the
// reference on machines without a GPU. One std::thread per CUDA thread; blocks run one after
// another (so one shared-memory buffer suffices, poisoned with NaN before each block);
// __syncthreads is a std::barrier; atomics take a mutex. The CUDA runtime calls the launchers make
// are mocked, with the SM count, per-SM occupancy and shared-memory opt-in limit set per case.
// tests/test_cuda_emulation.py builds this with g++ after rewriting `k<<<grid, block, smem, s>>>(...)`
// launches into emu_launch(...) calls, and compares the outputs with the PyTorch reference.
// Usage: emu CASE_DIR   (CASE_DIR holds meta.txt and the input .bin files; outputs are written there)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <fstream>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __launch_bounds__(...)
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* g_bar = nullptr;
inline void __syncthreads() { g_bar->arrive_and_wait(); }
// Warp-level primitives of the tensor-core forward's fallback product (field_mma.cuh): a barrier per
// warp of the running block, and one exchange slot per lane.
std::vector<std::unique_ptr<std::barrier<>>> g_warp_bars;
std::vector<uint64_t> g_warp_slots;
inline void __syncwarp(unsigned = 0xffffffffu) { g_warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  static_assert(sizeof(T) <= 8, "a register");
  const int w = threadIdx.x / 32;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  g_warp_slots[w * 32 + threadIdx.x % 32] = bits;
  __syncwarp();
  const uint64_t got = g_warp_slots[w * 32 + (src & 31)];
  __syncwarp();  // every lane has read before any writes again
  T out;
  memcpy(&out, &got, sizeof(T));
  return out;
}
std::mutex g_mu;
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> l(g_mu); float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { std::lock_guard<std::mutex> l(g_mu); double o = *p; *p = o + v; return o; }

int g_sms = 2, g_optin = 232448, g_per_sm = 1, g_cc_major = 9;
size_t g_last_bytes = 0; int g_last_T = 0, g_last_blocks = 0;
extern "C" {
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr a, int) {
  if (a == cudaDevAttrMultiProcessorCount) *v = g_sms;
  else if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = g_optin;
  else if (a == cudaDevAttrComputeCapabilityMajor) *v = g_cc_major;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int v) {
  if (v > g_optin) return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = g_per_sm; return cudaSuccess;
}
cudaError_t CUDARTAPI cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  memset(attr, 0, sizeof(*attr));
  attr->ptxVersion = attr->binaryVersion = 10 * g_cc_major;  // as if built for the device itself
  return cudaSuccess;
}
}

template <class T> cudaError_t cudaFuncSetAttribute(T* f, cudaFuncAttribute a, int v) { return cudaFuncSetAttribute((const void*)f, a, v); }
template <class T> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T* f, int b, size_t s) { return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, (const void*)f, b, s); }
namespace talk3d { namespace cuda { namespace { alignas(16) unsigned char t3d_field_smem[4 << 20]; } } }

template <class K, class... A>
void emu_launch(K kernel, int blocks, int T, size_t bytes, const A&... args) {
  if (bytes > sizeof(talk3d::cuda::t3d_field_smem) || int(bytes) > g_optin) { fprintf(stderr, "smem too big\n"); exit(3); }
  g_last_bytes = bytes; g_last_T = T; g_last_blocks = blocks;
  blockDim = dim3(T, 1, 1);
  gridDim = dim3(blocks, 1, 1);
  for (int b = 0; b < blocks; ++b) {
    // poison shared memory: the kernel must not read what it did not write
    std::vector<unsigned char> poison(bytes, 0xFF);  // 0xFF.. is a NaN for float and double
    if (bytes > 0) memcpy(talk3d::cuda::t3d_field_smem, poison.data(), bytes);
    std::barrier<> bar(T);
    g_bar = &bar;
    g_warp_bars.clear();
    for (int w = 0; w * 32 < T; ++w) g_warp_bars.push_back(std::make_unique<std::barrier<>>(std::min(32, T - 32 * w)));
    g_warp_slots.assign(size_t((T + 31) / 32) * 32, 0);
    std::vector<std::thread> th;
    for (int t = 0; t < T; ++t)
      th.emplace_back([&, t, b] { threadIdx = make_uint3(t, 0, 0); blockIdx = make_uint3(b, 0, 0); kernel(args...); });
    for (auto& x : th) x.join();
  }
}

#include "triplane_field_emu.cu"

using namespace talk3d::cuda;

template <class T>
std::vector<T> readf(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return {};
  size_t n = f.tellg(); f.seekg(0);
  std::vector<T> v(n / sizeof(T));
  f.read(reinterpret_cast<char*>(v.data()), n);
  return v;
}
template <class T>
void writef(const std::string& path, const std::vector<T>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// What csrc/triplane_field/triplane_field_cuda.cpp does with the streaming backward, the GEMMs as
// loops: chunks of `chunk` points (when weight gradients are wanted), rows with a stride wider than
// the chunk (poisoned with NaN before each chunk: every entry the GEMMs read must be written), and
// [dW1 | db1] = dpre [f | 1]^T, [dW2 | db2] = dout [h | 1]^T summed over the chunks.
cudaError_t streaming_backward(const FieldProblem& p, long long chunk, const void* gs, const void* gf, void* dpl,
                               void* dxyz, int mask, float* dw1, float* db1, float* dw2, float* db2) {
  using R = BackwardRows;
  const long long total = (long long)p.B * p.N;
  const bool want_w = mask & (4 | 8 | 16 | 32);
  if (want_w && chunk < 0) {  // the adapter's rule: whole waves of the kernel's resident threads
    int64_t wave = 0;
    cudaError_t e = field_backward_streaming_wave(p, wave);
    if (e != cudaSuccess) return e;
    printf("wave=%lld ", (long long)wave);
    chunk = -chunk / wave * wave;
  }
  if (!want_w || chunk <= 0 || chunk > total) chunk = total;
  const long long ld = chunk + 3;
  std::vector<float> rows(want_w ? size_t(R::count) * ld : 0);
  std::vector<double> g1(R::HID * (R::C + 1), 0.0), g2(R::OUT * (R::HID + 1), 0.0);
  for (long long begin = 0; begin < total; begin += chunk) {
    const long long n = std::min(chunk, total - begin);
    std::fill(rows.begin(), rows.end(), std::numeric_limits<float>::quiet_NaN());
    cudaError_t e = field_backward_streaming(p, begin, n, gs, gf, dpl, dxyz, want_w ? rows.data() : nullptr, ld, nullptr);
    if (e != cudaSuccess) return e;
    auto row = [&](int k) { return rows.data() + size_t(k) * ld; };
    for (int j = 0; j < R::HID && want_w; ++j)
      for (int c = 0; c <= R::C; ++c)
        for (long long r = 0; r < n; ++r) g1[j * (R::C + 1) + c] += double(row(R::dpre + j)[r]) * row(R::f + c)[r];
    for (int k = 0; k < R::OUT && want_w; ++k)
      for (int j = 0; j <= R::HID; ++j)
        for (long long r = 0; r < n; ++r) g2[k * (R::HID + 1) + j] += double(row(R::dout + k)[r]) * row(R::h + j)[r];
  }
  for (int j = 0; j < R::HID; ++j) {
    for (int c = 0; c < R::C && (mask & 4); ++c) dw1[j * R::C + c] = float(g1[j * (R::C + 1) + c]);
    if (mask & 8) db1[j] = float(g1[j * (R::C + 1) + R::C]);
  }
  for (int k = 0; k < R::OUT; ++k) {
    for (int j = 0; j < R::HID && (mask & 16); ++j) dw2[k * R::HID + j] = float(g2[k * (R::HID + 1) + j]);
    if (mask & 32) db2[k] = float(g2[k * (R::HID + 1) + R::HID]);
  }
  return cudaSuccess;
}

int main(int argc, char** argv) {
  std::string dir = argv[1];
  std::ifstream m(dir + "/meta.txt");
  int dtype, B, H, W, C, HID, OUT, axes, mask, gmask;
  long long N, sb, sp, sy, sx, chunk;
  double box;
  int omask;  // forward outputs wanted: 1 sigma, 2 feat (a null pointer for the other)
  int mlp;    // FieldProblem::mlp (1: the tensor-core forward, where it applies)
  m >> dtype >> B >> H >> W >> C >> N >> HID >> OUT >> axes >> box >> sb >> sp >> sy >> sx >> g_optin >> g_sms >> g_per_sm >> mask >> gmask >> chunk >> omask >> mlp >> g_cc_major;
  if (!m) { fprintf(stderr, "bad meta.txt\n"); return 2; }
  const size_t es = (dtype == 0) ? 4 : (dtype == 3 ? 8 : 2);   // storage size
  const size_t as = dtype == 3 ? 8 : 4;                        // accumulation size
  auto planes = readf<unsigned char>(dir + "/planes.bin");
  auto xyz = readf<unsigned char>(dir + "/xyz.bin");
  auto w1 = readf<unsigned char>(dir + "/w1.bin");
  auto b1 = readf<unsigned char>(dir + "/b1.bin");
  auto w2 = readf<unsigned char>(dir + "/w2.bin");
  auto b2 = readf<unsigned char>(dir + "/b2.bin");
  auto gs = readf<unsigned char>(dir + "/gsigma.bin");
  auto gf = readf<unsigned char>(dir + "/gfeat.bin");
  FieldProblem p;
  p.dtype = FieldDType(dtype);
  p.planes = planes.data(); p.s_batch = sb; p.s_plane = sp; p.s_y = sy; p.s_x = sx;
  p.B = B; p.H = H; p.W = W; p.C = C; p.xyz = xyz.data(); p.N = N;
  p.w1 = w1.data(); p.b1 = b1.data(); p.w2 = w2.data(); p.b2 = b2.data();
  p.HID = HID; p.OUT = OUT; p.box_warp = box; p.axes = axes; p.mlp = mlp;
  const size_t P = size_t(B) * N, F = OUT - 1;
  std::vector<unsigned char> sigma(P * es), feat(P * F * es);
  cudaError_t e = field_forward(p, (omask & 1) ? sigma.data() : nullptr, (omask & 2) ? feat.data() : nullptr, nullptr);
  printf("forward: err=%d T=%d blocks=%d smem=%zu\n", int(e), g_last_T, g_last_blocks, g_last_bytes);
  printf("forward smem bytes %zu (tensor cores: %zu)\n", g_last_bytes, size_t(MmaLayout::bytes));
  writef(dir + "/out_sigma.bin", sigma); writef(dir + "/out_feat.bin", feat);
  std::vector<unsigned char> dpl(size_t(B) * 3 * H * W * C * as, 0), dxyz(P * 3 * as, 0), dw1(size_t(HID) * C * as, 0),
      db1(HID * as, 0), dw2(size_t(OUT) * HID * as, 0), db2(OUT * as, 0);
  g_last_T = g_last_blocks = 0; g_last_bytes = 0;
  const void* gsp = (gmask & 1) ? gs.data() : nullptr;
  const void* gfp = (gmask & 2) ? gf.data() : nullptr;
  if (field_backward_streaming_applies(p)) {
    e = streaming_backward(p, chunk, gsp, gfp, (mask & 1) ? dpl.data() : nullptr, (mask & 2) ? dxyz.data() : nullptr,
                           mask, reinterpret_cast<float*>(dw1.data()), reinterpret_cast<float*>(db1.data()),
                           reinterpret_cast<float*>(dw2.data()), reinterpret_cast<float*>(db2.data()));
    printf("streaming ");
  } else {
    e = field_backward(p, gsp, gfp, (mask & 1) ? dpl.data() : nullptr, (mask & 2) ? dxyz.data() : nullptr,
                       (mask & 4) ? dw1.data() : nullptr, (mask & 8) ? db1.data() : nullptr,
                       (mask & 16) ? dw2.data() : nullptr, (mask & 32) ? db2.data() : nullptr, nullptr);
  }
  printf("backward: err=%d T=%d blocks=%d smem=%zu\n", int(e), g_last_T, g_last_blocks, g_last_bytes);
  writef(dir + "/out_dplanes.bin", dpl); writef(dir + "/out_dxyz.bin", dxyz);
  writef(dir + "/out_dw1.bin", dw1); writef(dir + "/out_db1.bin", db1);
  writef(dir + "/out_dw2.bin", dw2); writef(dir + "/out_db2.bin", db2);
  return 0;
}
