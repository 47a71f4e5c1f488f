#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_grid.h"
#include "perturb/rise_saliency.h"

namespace whymatch {
namespace {

constexpr int kRefsPerThread = 8;

// One thread per output pixel and tile of up to kRefsPerThread references:
// it walks all N masks, computing each mask value once and accumulating it
// into its references in registers. Grid values and scores are the same for
// every thread of a block at a given n, so their loads are broadcasts.
__global__ void rise_saliency_kernel(RiseSaliencyParams p, int64_t cell_h, int64_t cell_w) {
  const int64_t hw = p.h * p.w;
  const int64_t pix = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  const int64_t k0 = (int64_t)blockIdx.y * kRefsPerThread;
  if (pix >= hw) return;
  const int kc = static_cast<int>(p.k - k0 < kRefsPerThread ? p.k - k0 : kRefsPerThread);
  const int64_t up_h = (p.s + 1) * cell_h, up_w = (p.s + 1) * cell_w;
  const int64_t y = pix / p.w, x = pix % p.w;
  float acc[kRefsPerThread];
#pragma unroll
  for (int j = 0; j < kRefsPerThread; ++j) acc[j] = 0.f;
  for (int64_t n = 0; n < p.n; ++n) {
    const int64_t dy = __ldg(p.shifts + 2 * n), dx = __ldg(p.shifts + 2 * n + 1);
    const Lerp ly = rise_lerp(y + dy, up_h, p.s);
    const Lerp lx = rise_lerp(x + dx, up_w, p.s);
    const float m = rise_sample(p.grids + n * p.s * p.s, p.s, ly, lx);
    const float* sc = p.scores + n * p.k + k0;
#pragma unroll
    for (int j = 0; j < kRefsPerThread; ++j)
      if (j < kc) acc[j] += __ldg(sc + j) * m;
  }
#pragma unroll
  for (int j = 0; j < kRefsPerThread; ++j)
    if (j < kc) p.out[(k0 + j) * hw + pix] = acc[j];
}

}  // namespace

void rise_saliency_cuda(const RiseSaliencyParams& p, void* stream) {
  check_rise_saliency(p);
  const int64_t hw = p.h * p.w;
  if (p.k * hw == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_saliency");
  if (p.n == 0) {
    WM_CUDA_CHECK(cudaMemsetAsync(p.out, 0, sizeof(float) * p.k * hw, st));
    return;
  }
  const int64_t cell_h = ceil_div64(p.h, p.s), cell_w = ceil_div64(p.w, p.s);
  const int threads = 256;
  const int64_t ktiles = (p.k + kRefsPerThread - 1) / kRefsPerThread;
  WM_CHECK(ktiles <= 65535, "rise_saliency: at most " << 65535 * kRefsPerThread << " references per call, got " << p.k);
  dim3 grid(ceil_div(hw, threads), static_cast<unsigned int>(ktiles));
  rise_saliency_kernel<<<grid, threads, 0, st>>>(p, cell_h, cell_w);
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
