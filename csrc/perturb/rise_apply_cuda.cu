#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/rise_apply.h"
#include "perturb/rise_grid.h"

namespace whymatch {
namespace {

// One thread per output pixel (n, y, x); the mask value is computed once and
// blended into every channel.
template <typename T>
__global__ void rise_apply_kernel(RiseApplyParams p, int64_t cell_h, int64_t cell_w, int64_t total) {
  const int64_t up_h = (p.s + 1) * cell_h, up_w = (p.s + 1) * cell_w;
  const int64_t hw = p.h * p.w;
  T* out = static_cast<T*>(p.out);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t n = i / hw, pix = i % hw;
    const int64_t y = pix / p.w, x = pix % p.w;
    const int64_t dy = p.shifts[2 * n], dx = p.shifts[2 * n + 1];
    const Lerp ly = rise_lerp(y + dy, up_h, p.s);
    const Lerp lx = rise_lerp(x + dx, up_w, p.s);
    const float m = rise_sample(p.grids + n * p.s * p.s, p.s, ly, lx);
    if (p.channels_last) {
      T* o = out + (n * hw + pix) * p.c;
      for (int64_t c = 0; c < p.c; ++c)
        o[c] = from_f32<T>(m * __ldg(p.image + c * hw + pix) + (1.f - m) * __ldg(p.baseline + c * hw + pix));
    } else {
      T* o = out + n * p.c * hw + pix;
      for (int64_t c = 0; c < p.c; ++c)
        o[c * hw] = from_f32<T>(m * __ldg(p.image + c * hw + pix) + (1.f - m) * __ldg(p.baseline + c * hw + pix));
    }
  }
}

}  // namespace

void rise_apply_cuda(const RiseApplyParams& p, void* stream) {
  check_rise_apply(p);
  const int64_t total = p.n * p.h * p.w;
  if (total == 0 || p.c == 0) return;
  const int64_t cell_h = ceil_div64(p.h, p.s), cell_w = ceil_div64(p.w, p.s);
  const int threads = 256;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>((total + threads - 1) / threads, 65535LL * 32));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("rise_apply");
  WM_DISPATCH_FLOAT_CUDA(p.out_dtype, "rise_apply", [&] {
    rise_apply_kernel<scalar_t><<<blocks, threads, 0, st>>>(p, cell_h, cell_w, total);
  });
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
