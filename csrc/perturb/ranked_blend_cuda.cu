#include <algorithm>

#include "common/cuda_utils.cuh"
#include "perturb/ranked_blend.h"

namespace whymatch {
namespace {

// One thread per (b, t, pixel); the rank is read once and every channel copied.
template <typename T>
__global__ void ranked_blend_kernel(RankedBlendParams p, int64_t total) {
  const T* first = static_cast<const T*>(p.first);
  const T* second = static_cast<const T*>(p.second);
  T* out = static_cast<T*>(p.out);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t bt = i / p.HW, pix = i % p.HW;
    const int64_t b = bt / p.T, t = bt % p.T;
    const bool take_first = __ldg(p.rank + b * p.HW + pix) < __ldg(p.counts + t);
    const T* src = (take_first ? first : second) + b * p.C * p.HW + pix;
    T* o = out + bt * p.C * p.HW + pix;
    for (int64_t c = 0; c < p.C; ++c) o[c * p.HW] = src[c * p.HW];
  }
}

}  // namespace

void ranked_blend_cuda(const RankedBlendParams& p, void* stream) {
  check_ranked_blend(p);
  const int64_t total = p.B * p.T * p.HW;
  if (total == 0 || p.C == 0) return;
  const int threads = 256;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>((total + threads - 1) / threads, 65535LL * 32));
  auto st = static_cast<cudaStream_t>(stream);
  WM_CUDA_CHECK_PENDING("ranked_blend");
  WM_DISPATCH_FLOAT_CUDA(p.dtype, "ranked_blend", [&] {
    ranked_blend_kernel<scalar_t><<<blocks, threads, 0, st>>>(p, total);
  });
  WM_CUDA_LAUNCH_CHECK();
}

}  // namespace whymatch
