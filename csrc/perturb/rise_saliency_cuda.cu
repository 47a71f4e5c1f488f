#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_grid_cuda.cuh"
#include "perturb/rise_saliency.h"

namespace whymatch {
namespace {

constexpr int kRefsPerThread = 8;
constexpr int kPixels = 32;  // pixels per block: one per lane
constexpr int kGroups = 8;   // warps per block: warp g walks the masks n = g, g + kGroups, ...
static_assert(kGroups == kRefsPerThread, "the final sum gives warp j reference j of the tile");

// A block = 32 consecutive pixels x a tile of up to kRefsPerThread references. The N masks are
// split over the block's 8 warps: each thread computes each of its masks' value once and
// accumulates it into the tile's references in registers; then the 8 partial sums of a (pixel,
// reference) are added in warp order through shared memory (a fixed order: deterministic). Grid
// values and scores are the same for every lane of a warp at a given n: broadcasts. At 224^2 with
// K <= 8 that is 1,568 blocks of 256 threads (one thread per pixel over all N: 196 blocks).
__global__ void __launch_bounds__(kPixels * kGroups) rise_saliency_kernel(RiseSaliencyParams p, RiseGeom32 g) {
  __shared__ float part[kGroups][kRefsPerThread][kPixels];
  const int lane = static_cast<int>(threadIdx.x) & 31, grp = static_cast<int>(threadIdx.x) >> 5;
  const unsigned int upix = blockIdx.x * kPixels + lane;
  const bool valid = upix < static_cast<unsigned int>(g.hw);
  const int pix = valid ? static_cast<int>(upix) : 0;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kRefsPerThread;
  const int kc = static_cast<int>(p.K - k0 < kRefsPerThread ? p.K - k0 : kRefsPerThread);
  const int y = pix / g.w, x = pix - y * g.w;
  float acc[kRefsPerThread];
#pragma unroll
  for (int j = 0; j < kRefsPerThread; ++j) acc[j] = 0.f;
  if (valid) {
    for (int64_t n = grp; n < p.N; n += kGroups) {
      const float m = rise_mask32(p.grids, p.shifts, n, y, x, g);
      const float* sc = p.scores + n * p.K + k0;
#pragma unroll
      for (int j = 0; j < kRefsPerThread; ++j)
        if (j < kc) acc[j] += __ldg(sc + j) * m;
    }
  }
#pragma unroll
  for (int j = 0; j < kRefsPerThread; ++j) part[grp][j][lane] = acc[j];
  __syncthreads();
  if (valid && grp < kc) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < kGroups; ++q) s += part[q][grp][lane];
    p.out[(k0 + grp) * g.hw + pix] = s;
  }
}

}  // namespace

void rise_saliency_cuda(const RiseSaliencyParams& p, void* stream) {
  check_rise_saliency(p);
  const int64_t hw = p.H * p.W;
  if (p.K * hw == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_saliency");
  if (p.N == 0) {
    WM_CUDA_CHECK(cudaMemsetAsync(p.out, 0, sizeof(float) * p.K * hw, st));
    return;
  }
  const RiseGeom32 g = rise_geom32("rise_saliency", 1, p.H, p.W, p.S);
  const int64_t ktiles = (p.K + kRefsPerThread - 1) / kRefsPerThread;
  WM_CHECK(ktiles <= 65535, "rise_saliency: at most " << 65535 * kRefsPerThread << " references per call, got " << p.K);
  dim3 grid(ceil_div(hw, kPixels), static_cast<unsigned int>(ktiles));
  rise_saliency_kernel<<<grid, kPixels * kGroups, 0, st>>>(p, g);
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
