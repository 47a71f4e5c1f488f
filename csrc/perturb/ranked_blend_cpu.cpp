#include "perturb/ranked_blend.h"

#include <algorithm>

#include "common/parallel.h"

namespace whymatch {
namespace {

template <typename T>
void ranked_blend_impl(const RankedBlendParams& p, int num_threads) {
  const T* first = static_cast<const T*>(p.first);
  const T* second = static_cast<const T*>(p.second);
  T* out = static_cast<T*>(p.out);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.c * p.hw));  // ~32K elements a chunk
  parallel_for(p.b * p.t, num_threads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.t, t = bt % p.t;
      const int64_t cnt = p.counts[t];
      const int64_t* rank = p.rank + b * p.hw;
      for (int64_t c = 0; c < p.c; ++c) {
        const T* f = first + (b * p.c + c) * p.hw;
        const T* s = second + (b * p.c + c) * p.hw;
        T* o = out + (bt * p.c + c) * p.hw;
        for (int64_t i = 0; i < p.hw; ++i) o[i] = rank[i] < cnt ? f[i] : s[i];
      }
    }
  });
}

}  // namespace

void ranked_blend_cpu(const RankedBlendParams& p, int num_threads) {
  check_ranked_blend(p);
  if (p.b * p.t * p.c * p.hw == 0) return;
  WM_DISPATCH_FLOAT_HOST(p.dtype, "ranked_blend", [&] { ranked_blend_impl<scalar_t>(p, num_threads); });
}

}  // namespace whymatch
