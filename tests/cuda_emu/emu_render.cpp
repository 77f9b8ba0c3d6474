// CPU emulation of the rendering CUDA kernels (kernels/composite/composite.cu and
// kernels/occupancy/occupancy.cu) and of the super-resolution's FIR and bias_act (kernels/binomial_filter,
// kernels/bias_act), so their indexing, layouts, grid-stride loops, storage types and
// null-output handling are checked against the CPU ops on machines without a GPU.
//
// Like emu_main.cpp (the field kernels): one std::thread per CUDA thread, blocks one after another,
// and the CUDA runtime calls the launchers make are mocked (the SM count is set per case, so a case
// can force the grid-stride loop). These kernels use neither shared memory nor barriers; a launch
// asking for shared memory fails the run. tests/test_cuda_emulation_render.py builds this with g++
// after rewriting `k<<<grid, block, smem, s>>>(...)` launches into emu_launch(...) calls.
//
// Usage: emu_render composite|weights|occupancy|fir|bias_act CASE_DIR
//   CASE_DIR holds meta.txt and the input .bin files; the outputs are written there.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __forceinline__ inline

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim, gridDim;

int g_sms = 2;
int g_last_blocks = 0, g_last_T = 0;
extern "C" {
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr a, int) {
  if (a != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = g_sms;
  return cudaSuccess;
}
}

template <class K, class... A>
void emu_launch(K kernel, int blocks, int T, size_t smem_bytes, const A&... args) {
  if (smem_bytes != 0) { fprintf(stderr, "unexpected shared memory request\n"); exit(3); }
  if (blocks < 1 || T < 1) { fprintf(stderr, "empty launch: %d x %d\n", blocks, T); exit(3); }
  g_last_blocks = blocks;
  g_last_T = T;
  blockDim = dim3(T, 1, 1);
  gridDim = dim3(blocks, 1, 1);
  for (int b = 0; b < blocks; ++b) {
    std::vector<std::thread> th;
    for (int t = 0; t < T; ++t)
      th.emplace_back([&, t, b] { threadIdx = make_uint3(t, 0, 0); blockIdx = make_uint3(b, 0, 0); kernel(args...); });
    for (auto& x : th) x.join();
  }
}

// meta.txt's `wide` flag sets this to 0, so the launchers pick the int64-index kernels
// (with_index_type, common/grid.cuh; defined before the kernels include it).
int64_t g_narrow_limit = INT32_MAX;
#define TALK3D_NARROW_INDEX_LIMIT g_narrow_limit
#include "composite_emu.cu"
#include "occupancy_emu.cu"
#include "fir_emu.cu"
#include "bias_act_emu.cu"

using namespace talk3d::cuda;

namespace {

std::vector<unsigned char> readb(const std::string& path) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) return {};
  const size_t n = f.tellg();
  f.seekg(0);
  std::vector<unsigned char> v(n);
  f.read(reinterpret_cast<char*>(v.data()), n);
  return v;
}

void writeb(const std::string& path, const std::vector<unsigned char>& v) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), v.size());
}

const void* ptr_or_null(const std::vector<unsigned char>& v) { return v.empty() ? nullptr : v.data(); }

// meta.txt: dtype R S F N packed sms mask. dtype is CompositeDType; S is the dense samples per ray;
// mask bit 0/1/2 asks for dsigma/dfeat/dt. Forward outputs start as 0xFF bytes (NaN in every float
// type), so any output the kernel leaves unwritten shows; so do dense gradients. Packed gradients
// start at zero: the launcher's contract is that the caller zero-fills them.
int run_composite(const std::string& dir) {
  std::ifstream m(dir + "/meta.txt");
  int dtype, F, packed, mask;
  long long R, S, N;
  m >> dtype >> R >> S >> F >> N >> packed >> g_sms >> mask;
  const size_t es = dtype == 0 ? 4 : (dtype == 3 ? 8 : 2);
  const auto sigma = readb(dir + "/sigma.bin"), t = readb(dir + "/t.bin"), feat = readb(dir + "/feat.bin");
  const auto pinfo = readb(dir + "/packed_info.bin");
  const auto gfeat = readb(dir + "/gfeat.bin"), gdepth = readb(dir + "/gdepth.bin"), gwsum = readb(dir + "/gwsum.bin");
  CompositeProblem p;
  p.dtype = CompositeDType(dtype);
  p.sigma = ptr_or_null(sigma);
  p.t = ptr_or_null(t);
  p.feat = ptr_or_null(feat);
  p.packed_info = packed ? reinterpret_cast<const int64_t*>(pinfo.data()) : nullptr;
  p.N = N;
  p.R = R;
  p.S = S;
  p.F = F;
  std::vector<unsigned char> of(size_t(R) * F * es, 0xFF), od(size_t(R) * es, 0xFF), ow(size_t(R) * es, 0xFF);
  g_last_blocks = g_last_T = 0;
  cudaError_t e = composite_forward(p, of.data(), od.data(), ow.data(), nullptr);
  printf("forward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out_feat.bin", of);
  writeb(dir + "/out_depth.bin", od);
  writeb(dir + "/out_wsum.bin", ow);
  if (e != cudaSuccess) return 0;
  const unsigned char fill = packed ? 0x00 : 0xFF;
  std::vector<unsigned char> ds(size_t(N) * es, fill), df(size_t(N) * F * es, fill), dt(size_t(N) * es, fill);
  g_last_blocks = g_last_T = 0;
  // The forward's own outputs are the saved outputs, as in autograd.
  e = composite_backward(p, gfeat.data(), gdepth.data(), gwsum.data(), of.data(), od.data(), ow.data(),
                         (mask & 1) ? ds.data() : nullptr, (mask & 2) ? df.data() : nullptr,
                         (mask & 4) ? dt.data() : nullptr, nullptr);
  printf("backward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out_dsigma.bin", ds);
  writeb(dir + "/out_dfeat.bin", df);
  writeb(dir + "/out_dt.bin", dt);
  return 0;
}

// composite_weights. meta.txt: dtype R S sms mask (bit 0/1: dsigma/dt). Outputs start as 0xFF bytes.
int run_weights(const std::string& dir) {
  std::ifstream m(dir + "/meta.txt");
  int dtype, mask;
  long long R, S;
  m >> dtype >> R >> S >> g_sms >> mask;
  const size_t es = dtype == 0 ? 4 : (dtype == 3 ? 8 : 2);
  const auto sigma = readb(dir + "/sigma.bin"), t = readb(dir + "/t.bin");
  const auto gomega = readb(dir + "/gomega.bin"), gdepth = readb(dir + "/gdepth.bin"), gwsum = readb(dir + "/gwsum.bin");
  const WeightsProblem p{CompositeDType(dtype), ptr_or_null(sigma), ptr_or_null(t), R, S};
  std::vector<unsigned char> om(size_t(R * S) * es, 0xFF), od(size_t(R) * es, 0xFF), ow(size_t(R) * es, 0xFF);
  g_last_blocks = g_last_T = 0;
  cudaError_t e = composite_weights_forward(p, om.data(), od.data(), ow.data(), nullptr);
  printf("forward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out_omega.bin", om);
  writeb(dir + "/out_depth.bin", od);
  writeb(dir + "/out_wsum.bin", ow);
  if (e != cudaSuccess) return 0;
  std::vector<unsigned char> ds(size_t(R * S) * es, 0xFF), dt(size_t(R * S) * es, 0xFF);
  g_last_blocks = g_last_T = 0;
  e = composite_weights_backward(p, gomega.data(), gdepth.data(), gwsum.data(), om.data(), od.data(), ow.data(),
                                 (mask & 1) ? ds.data() : nullptr, (mask & 2) ? dt.data() : nullptr, nullptr);
  printf("backward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out_dsigma.bin", ds);
  writeb(dir + "/out_dt.bin", dt);
  return 0;
}

// meta.txt: dtype M S res box outside sms. dtype is MarchDType. Outputs start as 0x7F bytes.
int run_occupancy(const std::string& dir) {
  std::ifstream m(dir + "/meta.txt");
  int dtype, res, outside;
  long long M, S;
  double box;
  m >> dtype >> M >> S >> res >> box >> outside >> g_sms;
  const auto o = readb(dir + "/origins.bin"), d = readb(dir + "/dirs.bin"), t = readb(dir + "/t.bin");
  const auto bits = readb(dir + "/bits.bin");
  MarchProblem p;
  p.dtype = MarchDType(dtype);
  p.origins = o.data();
  p.dirs = d.data();
  p.t = t.data();
  p.M = M;
  p.S = S;
  p.bits = bits.data();
  p.res = res;
  p.box = box;
  p.outside_occupied = outside != 0;
  std::vector<unsigned char> out(size_t(M) * 2 * sizeof(int32_t), 0x7F);
  g_last_blocks = g_last_T = 0;
  const cudaError_t e = occupied_intervals(p, reinterpret_cast<int32_t*>(out.data()), nullptr);
  printf("occupancy: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out.bin", out);
  return 0;
}

// binomial_filter2d. meta.txt: dtype N C H W out_h out_w top left channels_last gain sms; dtype is
// FirDType. The output starts as 0xFF bytes (NaN in every float type).
int run_fir(const std::string& dir) {
  std::ifstream m(dir + "/meta.txt");
  int dtype, channels_last, wide;
  FirProblem p;
  m >> dtype >> p.N >> p.C >> p.H >> p.W >> p.out_h >> p.out_w >> p.top >> p.left >> channels_last >> p.gain >> g_sms >> wide;
  if (!m) { fprintf(stderr, "bad meta.txt\n"); return 2; }
  g_narrow_limit = wide ? 0 : INT32_MAX;
  const size_t es = dtype == 0 ? 4 : (dtype == 3 ? 8 : 2);
  const auto x = readb(dir + "/x.bin");
  std::vector<unsigned char> y(size_t(p.N * p.C * p.out_h * p.out_w) * es, 0xFF);
  p.dtype = FirDType(dtype);
  p.channels_last = channels_last != 0;
  p.x = x.data();
  p.y = y.data();
  g_last_blocks = g_last_T = 0;
  const cudaError_t e = binomial_filter2d(p, nullptr);
  printf("fir: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/out.bin", y);
  return 0;
}

// bias_act. meta.txt: dtype n C inner slope gain clamp has_bias sms wide; dtype is BiasActDType and
// wide=1 forces the int64-index kernels. x.bin,
// b.bin (float, double for f64), dy.bin; y.bin and dx.bin come out, starting as 0xFF bytes.
int run_bias_act(const std::string& dir) {
  std::ifstream m(dir + "/meta.txt");
  int dtype, has_bias, wide;
  BiasActProblem p;
  m >> dtype >> p.n >> p.C >> p.inner >> p.slope >> p.gain >> p.clamp >> has_bias >> g_sms >> wide;
  if (!m) { fprintf(stderr, "bad meta.txt\n"); return 2; }
  g_narrow_limit = wide ? 0 : INT32_MAX;
  p.dtype = BiasActDType(dtype);
  const size_t es = dtype == 0 ? 4 : (dtype == 3 ? 8 : 2);
  const auto x = readb(dir + "/x.bin"), b = readb(dir + "/b.bin"), dy = readb(dir + "/dy.bin");
  std::vector<unsigned char> y(size_t(p.n) * es, 0xFF), dx(size_t(p.n) * es, 0xFF);
  g_last_blocks = g_last_T = 0;
  cudaError_t e = bias_act_forward(p, x.data(), has_bias ? b.data() : nullptr, y.data(), nullptr);
  printf("forward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/y.bin", y);
  if (e != cudaSuccess) return 0;
  e = bias_act_backward(p, dy.data(), y.data(), dx.data(), nullptr);
  printf("backward: err=%d blocks=%d T=%d\n", int(e), g_last_blocks, g_last_T);
  writeb(dir + "/dx.bin", dx);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s composite|weights|occupancy|fir|bias_act CASE_DIR\n", argv[0]);
    return 2;
  }
  const std::string mode = argv[1];
  if (mode == "composite") return run_composite(argv[2]);
  if (mode == "weights") return run_weights(argv[2]);
  if (mode == "occupancy") return run_occupancy(argv[2]);
  if (mode == "fir") return run_fir(argv[2]);
  if (mode == "bias_act") return run_bias_act(argv[2]);
  fprintf(stderr, "unknown mode %s\n", mode.c_str());
  return 2;
}
