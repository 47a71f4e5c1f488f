// A minimal parallel-for over [0, n) with std::thread. The caller passes the
// thread count (the Python side uses torch.get_num_threads()), so the kernels
// share the process's thread budget without linking a second OpenMP runtime.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace whymatch {

template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_grain, F&& fn) {
  if (n <= 0) return;
  int64_t grain = std::max<int64_t>(1, min_grain);
  int64_t max_chunks = (n + grain - 1) / grain;
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, max_chunks));
  if (workers == 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> threads;
  std::exception_ptr err;
  std::mutex err_mu;
  int64_t chunk = (n + workers - 1) / workers;
  for (int64_t t = 0; t < workers; ++t) {
    int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    threads.emplace_back([&, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (!err) err = std::current_exception();
      }
    });
  }
  for (auto& th : threads) th.join();
  if (err) std::rethrow_exception(err);
}

}  // namespace whymatch
