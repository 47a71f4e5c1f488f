// The persistent CPU thread pool behind parallel_for (see common/parallel.h for the contract).
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "common/parallel.h"

namespace whymatch {
namespace pool {

namespace {

struct Job {
  ChunkFn fn;
  void* ctx;
  int64_t n, chunk, nchunks;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::exception_ptr err;
  int max_helpers = 0;  // under Pool::mu_
  int joined = 0;        // under Pool::mu_
  std::atomic<int> active{0};  // changed under Pool::mu_, read by the caller without it
};

// Claim and run chunks until none is left (or one has failed).
void work(Job& j) {
  for (;;) {
    if (j.failed.load(std::memory_order_relaxed)) return;
    const int64_t c = j.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.nchunks) return;
    const int64_t b = c * j.chunk;
    const int64_t e = std::min(j.n, b + j.chunk);
    try {
      j.fn(j.ctx, b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(j.err_mu);
      if (!j.err) j.err = std::current_exception();
      j.failed.store(true, std::memory_order_relaxed);
    }
  }
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

thread_local bool tl_inside_job = false;  // a pool thread, or a caller while its job runs

std::atomic<int> g_threads_started{0};
std::atomic<int64_t> g_jobs_run{0};

class Pool {
 public:
  void run(Job& j, int helpers) {
    std::unique_lock<std::mutex> submit(submit_mu_, std::try_to_lock);
    if (!submit.owns_lock()) {  // another thread's job holds the pool: this one runs on its caller
      work(j);
      return;
    }
    start_threads(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      j.max_helpers = helpers;
      job_ = &j;
      ++generation_;
    }
    if (helpers >= static_cast<int>(threads_.size())) {
      cv_work_.notify_all();
    } else {
      for (int i = 0; i < helpers; ++i) cv_work_.notify_one();
    }
    g_jobs_run.fetch_add(1, std::memory_order_relaxed);
    tl_inside_job = true;
    work(j);
    tl_inside_job = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = nullptr;  // no late joiner: a helper that wakes from now on finds nothing to do
    }
    // The helpers' last chunks are short: spin a little (no sched_yield, which on a busy machine
    // hands the core to another process for a whole time slice) before sleeping on the condition.
    for (int spin = 0; spin < 2048 && j.active.load(std::memory_order_acquire) != 0; ++spin) {
      cpu_relax();
    }
    if (j.active.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_done_.wait(lk, [&] { return j.active.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  void start_threads(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      threads_.emplace_back([this] { loop(); });
      g_threads_started.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void loop() {
    tl_inside_job = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_work_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      Job* j = job_;
      // a late helper joins only while chunks are left: it must not make the caller wait for nothing
      if (j == nullptr || j->joined >= j->max_helpers ||
          j->next.load(std::memory_order_relaxed) >= j->nchunks) {
        continue;
      }
      ++j->joined;
      j->active.fetch_add(1, std::memory_order_relaxed);
      lk.unlock();
      work(*j);
      lk.lock();
      // the decrement is this thread's last touch of *j: the caller may return as soon as it reads 0
      if (j->active.fetch_sub(1, std::memory_order_release) == 1) cv_done_.notify_all();
    }
  }

  std::mutex submit_mu_;  // one job on the pool at a time
  std::vector<std::thread> threads_;  // under submit_mu_; never joined (the pool lives until exit)
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  Job* job_ = nullptr;
  uint64_t generation_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};

// In a forked child the parent's pool threads are gone and its locks may be held by them: drop the
// pool (leaked on purpose: destroying it would wait on those locks) and start a fresh one on demand.
void after_fork_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  g_threads_started.store(0, std::memory_order_relaxed);
  g_jobs_run.store(0, std::memory_order_relaxed);
  tl_inside_job = false;
}

Pool& the_pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  static std::atomic<bool> fork_handler{false};
  if (!fork_handler.exchange(true)) pthread_atfork(nullptr, nullptr, after_fork_in_child);
  Pool* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;  // another thread installed one first
  return *p;
}

}  // namespace

void run(int64_t n, int64_t chunk, int helpers, ChunkFn fn, void* ctx) {
  if (n <= 0) return;
  Job j;
  j.fn = fn;
  j.ctx = ctx;
  j.n = n;
  j.chunk = std::max<int64_t>(1, chunk);
  j.nchunks = (n + j.chunk - 1) / j.chunk;
  if (helpers <= 0 || j.nchunks <= 1 || tl_inside_job) {
    work(j);  // nested in a chunk, or nothing to share: all on this thread
  } else {
    the_pool().run(j, static_cast<int>(std::min<int64_t>(helpers, j.nchunks - 1)));
  }
  if (j.err) std::rethrow_exception(j.err);
}

int threads_started() { return g_threads_started.load(std::memory_order_relaxed); }
int64_t jobs_run() { return g_jobs_run.load(std::memory_order_relaxed); }

}  // namespace pool
}  // namespace whymatch
