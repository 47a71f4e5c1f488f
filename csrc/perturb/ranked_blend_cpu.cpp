#include "perturb/ranked_blend.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/parallel.h"
#include "perturb/blend_cpu.h"

namespace whymatch {
namespace {

// One (pair, step) at a time: the per-pixel choice (rank < count) is computed once into an
// all-ones / all-zeros mask of the element width, then every channel plane is a flat bitwise
// select (exact for any value, NaN included), streamed to memory when the output is large.
// U: the unsigned integer of T's width.
template <typename T, typename U>
void ranked_blend_impl(const RankedBlendParams& p, int num_threads) {
  static_assert(sizeof(T) == sizeof(U), "U must have T's width");
  const U* first = static_cast<const U*>(p.first);
  const U* second = static_cast<const U*>(p.second);
  U* out = static_cast<U*>(p.out);
  const bool stream = blend::use_stream(p.B * p.T * p.C * p.HW * static_cast<int64_t>(sizeof(T)));
  const blend::SelectFn<U> select = blend::pick_select<U>();
  const blend::KeepFn<U> keep_of = blend::pick_keep<U>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.C * p.HW));  // ~32K elements a chunk
  parallel_for(p.B * p.T, num_threads, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<U> kept;  // kept between calls by the pool's persistent threads
    std::vector<U> local;
    std::vector<U>& buf = p.HW > (int64_t(1) << 21) / int64_t(sizeof(U)) ? local : kept;  // 2 MiB at most kept
    if (static_cast<int64_t>(buf.size()) < p.HW) buf.resize(static_cast<size_t>(p.HW));
    U* keep = buf.data();
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / p.T, t = bt % p.T;
      keep_of(keep, p.rank + b * p.HW, p.counts[t], p.HW);
      for (int64_t c = 0; c < p.C; ++c) {
        const int64_t src = (b * p.C + c) * p.HW;
        select(out + (bt * p.C + c) * p.HW, keep, first + src, second + src, p.HW, stream);
      }
    }
    blend::fence(stream);
  });
}

}  // namespace

void ranked_blend_cpu(const RankedBlendParams& p, int num_threads) {
  check_ranked_blend(p);
  if (p.B * p.T * p.C * p.HW == 0) return;
  WM_DISPATCH_FLOAT_HOST(p.dtype, "ranked_blend", [&] {
    using U = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>;
    ranked_blend_impl<scalar_t, U>(p, num_threads);
  });
}

}  // namespace whymatch
