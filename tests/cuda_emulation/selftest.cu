// Planted bugs for the emulation's own tests (tests/test_emulated_checks.py): each case is a small
// kernel that is wrong in one way the emulation must report. Built with build.build_selftest()
// into a plain shared library; run_case() is called through ctypes.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

namespace {

__global__ void copy_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = in[i];
}

// Writes element 0 of a static shared array only, then every thread reads its own element.
__global__ void static_read_before_write(float* out) {
  __shared__ float buf[64];
  if (threadIdx.x == 0) buf[0] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// The second block reads what the first block left in static shared memory.
__global__ void static_stale_between_blocks(float* out) {
  __shared__ float buf[32];
  if (blockIdx.x == 0) buf[threadIdx.x] = 7.0f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[threadIdx.x];
}

__global__ void dynamic_read_before_write(float* out) {
  extern __shared__ float dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}

// A missing barrier: each thread reads the element another thread writes.
__global__ void racy_reverse(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

__global__ void correct_reverse(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

// A full-warp mask in a block of 48 threads: lanes 16..31 of warp 1 do not exist.
__global__ void full_mask_partial_warp(float* out) {
  float v = static_cast<float>(threadIdx.x);
  v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lane 5 exits before a full-warp shuffle.
__global__ void shuffle_with_exited_lane(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// The warp sum every reduction uses: correct, with two warps.
__global__ void warp_sum(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// Half a warp waits at __syncthreads, the other half at a full-warp __syncwarp: never completes.
__global__ void divergent_barrier(float* out) {
  if ((threadIdx.x & 31) < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1.0f;
}

// Writes one element past its dynamic shared memory.
__global__ void dynamic_overflow(float* out) {
  extern __shared__ float dyn2[];
  dyn2[threadIdx.x + 1] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = dyn2[threadIdx.x];
}

// Writes one element past a static shared array.
__global__ void static_overflow(float* out) {
  __shared__ float small[32];
  small[threadIdx.x + 1] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = small[threadIdx.x];
}

__global__ void big_dynamic(float* out) {
  extern __shared__ float dyn3[];
  dyn3[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = dyn3[threadIdx.x];
}

int run(const std::string& c, float* out) {
  if (c == "ok") { static float in[100]; for (int i = 0; i < 100; ++i) in[i] = i; copy_kernel<<<4, 32>>>(in, out, 100); }
  else if (c == "grid_y_over_limit") copy_kernel<<<dim3(1, 65536), 32>>>(out, out, 0);
  else if (c == "block_over_limit") copy_kernel<<<1, 1025>>>(out, out, 0);
  else if (c == "static_read_before_write") static_read_before_write<<<1, 64>>>(out);
  else if (c == "static_stale_between_blocks") static_stale_between_blocks<<<2, 32>>>(out);
  else if (c == "dynamic_read_before_write") dynamic_read_before_write<<<1, 32, 32 * sizeof(float)>>>(out);
  else if (c == "racy_reverse") racy_reverse<<<1, 64>>>(out);
  else if (c == "correct_reverse") correct_reverse<<<1, 64>>>(out);
  else if (c == "full_mask_partial_warp") full_mask_partial_warp<<<1, 48>>>(out);
  else if (c == "shuffle_with_exited_lane") shuffle_with_exited_lane<<<1, 32>>>(out);
  else if (c == "warp_sum") warp_sum<<<1, 64>>>(out);
  else if (c == "divergent_barrier") divergent_barrier<<<1, 64>>>(out);
  else if (c == "dynamic_overflow") dynamic_overflow<<<1, 32, 32 * sizeof(float)>>>(out);
  else if (c == "static_overflow") static_overflow<<<1, 32>>>(out);
  else if (c == "big_dynamic_without_optin") big_dynamic<<<1, 32, 64 * 1024>>>(out);
  else if (c == "big_dynamic_with_optin") {
    cudaFuncSetAttribute(big_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    big_dynamic<<<1, 32, 64 * 1024>>>(out);
  } else throw std::invalid_argument("no case " + c);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

// Returns the launch's cudaError_t (0: success), or -1 with the exception's message in err.
extern "C" __attribute__((visibility("default"))) int wm_emu_selftest(const char* name, float* out, char* err, int n) {
  err[0] = '\0';
  try {
    return run(name, out);
  } catch (const std::exception& e) {
    std::snprintf(err, static_cast<size_t>(n), "%s", e.what());
    return -1;
  }
}
