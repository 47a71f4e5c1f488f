// parallel_for over [0, n) on one persistent CPU thread pool (csrc/common/thread_pool_cpu.cpp).
//
// - The work is cut into many small chunks (about kChunksPerThread per thread, never smaller than
//   min_grain) that the threads claim one at a time from an atomic counter, so a thread that the OS
//   deschedules (another process busy on its core) delays at most the chunk it holds; the others
//   take the rest.
// - The caller's thread works too; up to num_threads - 1 pool threads help. The caller passes the
//   thread count (the Python side: torch.get_num_threads() at call time, or whymatch.ops.set_num_threads),
//   so the kernels share the process's thread budget without a second OpenMP runtime beside torch's.
// - Calls from several threads at once are safe: one job holds the pool at a time and a caller that
//   finds it busy (or a call from inside a chunk) runs its whole range on its own thread.
// - After fork() the child gets a fresh pool on its first call (the parent's threads do not exist
//   there); nothing the parent's threads held is waited for.
// - An exception thrown by a chunk stops the claiming of further chunks and is rethrown to the caller
//   once every chunk already started has finished.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace whymatch {

namespace pool {

// The type-erased body of a job: fn(ctx, begin, end).
using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);

// Runs fn over [0, n) in chunks of `chunk` (the last may be shorter) on the caller's thread and up to
// `helpers` pool threads. Defined in thread_pool_cpu.cpp.
void run(int64_t n, int64_t chunk, int helpers, ChunkFn fn, void* ctx);

// How many chunks a parallel_for cuts per thread taking part.
constexpr int64_t kChunksPerThread = 16;

// For tests and diagnostics: the pool threads started in this process so far (0 before the first
// parallel call, and again in a forked child before its first one), and the jobs run on the pool.
int threads_started();
int64_t jobs_run();

}  // namespace pool

template <typename F>
void parallel_for(int64_t n, int num_threads, int64_t min_grain, F&& fn) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, min_grain);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, max_chunks));
  if (threads == 1) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t want_chunks = std::min<int64_t>(max_chunks, threads * pool::kChunksPerThread);
  const int64_t chunk = (n + want_chunks - 1) / want_chunks;
  using Fn = std::remove_reference_t<F>;
  pool::run(n, chunk, static_cast<int>(threads - 1),
            [](void* ctx, int64_t b, int64_t e) { (*static_cast<Fn*>(ctx))(b, e); },
            const_cast<void*>(static_cast<const void*>(&fn)));
}

}  // namespace whymatch
