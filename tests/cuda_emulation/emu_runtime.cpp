// emu_runtime.cpp: the scheduler behind emu_cuda.h, and the CUDA runtime API subset that the
// project's host code calls (host memory stands in for device memory; streams are synchronous).
//
// One grid runs at a time in the process (a mutex), one block at a time in the grid. Before each
// block the dynamic shared memory and every static __shared__ variable (the section
// registered by register_shared) are filled with 0xFF. Back ends:
//  - fibers (default): every CUDA thread is a ucontext fiber on the calling OS thread. Between two
//    barriers the fibers run one after the other, in the order WHYMATCH_EMU_SCHEDULE gives:
//    forward (thread 0 first), reverse, or random:SEED (a new permutation per round). A race between
//    threads shows as a result that depends on the schedule. Deterministic for a given schedule.
//  - OS threads (-DEMU_OS_THREADS): one std::thread per CUDA thread, real barriers; for
//    ThreadSanitizer / AddressSanitizer runs. A barrier that waits longer than
//    WHYMATCH_EMU_TIMEOUT_S seconds (default 60) is reported as a deadlock.
// Checked at every launch: block and grid limits, dynamic shared memory above 48 KiB without a
// cudaFuncSetAttribute opt-in (an error from cudaGetLastError, as on a device). Checked while a
// block runs (a C++ exception, which the bindings turn into a Python RuntimeError): warp masks that
// leave out the caller or name a lane that does not exist or has exited, a __syncthreads or warp
// barrier that can never complete.
#include "emu_cuda.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#ifndef EMU_OS_THREADS
#include <ucontext.h>
#endif

namespace emu {
namespace {

constexpr size_t kSmemDefault = 48 * 1024;  // dynamic shared memory without the opt-in
constexpr size_t kSmemOptin = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kGuard = 256;  // poisoned bytes after the dynamic shared memory, checked after each block

thread_local cudaError_t t_last = cudaSuccess;
std::mutex g_launch_mu;  // one grid at a time
std::mutex g_attr_mu;
std::map<const void*, int> g_max_dyn;  // per kernel: cudaFuncAttributeMaxDynamicSharedMemorySize

// Counters for the tests (wm_emu_stats below).
unsigned long long g_launches = 0, g_blocks = 0, g_max_dyn_launched = 0;

std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}

std::string where() {
  std::ostringstream o;
  if (g_blk) o << " (block " << g_blk->bid.x << "," << g_blk->bid.y << "," << g_blk->bid.z;
  if (g_blk && g_thr) o << ", thread " << g_thr->linear;
  if (g_blk) o << ")";
  return o.str();
}

std::mutex g_static_mu;
struct StaticSmem {
  unsigned char* p;
  size_t bytes, used;
  const char* name;
};
std::vector<StaticSmem> g_static_smem;  // every static __shared__ array seen so far

void poison_shared(size_t dyn_bytes) {
  std::memset(g_dyn_smem, kPoison, dyn_bytes + kGuard);
  std::lock_guard<std::mutex> lk(g_static_mu);
  for (const auto& v : g_static_smem) std::memset(v.p, kPoison, v.bytes);
}

// A write past the end of the dynamic shared memory (a device would fault or corrupt a neighbour).
void check_guard(size_t dyn_bytes) {
  for (size_t i = 0; i < kGuard; ++i)
    if (g_dyn_smem[dyn_bytes + i] != kPoison)
      fail("a thread wrote " + std::to_string(i) + " bytes past the end of the " + std::to_string(dyn_bytes) +
           " bytes of dynamic shared memory" + where());
  std::lock_guard<std::mutex> lk(g_static_mu);
  for (const auto& v : g_static_smem)
    for (size_t i = v.used; i < v.bytes; ++i)
      if (v.p[i] != kPoison)
        fail("a thread wrote " + std::to_string(i - v.used) + " bytes past the end of __shared__ " + v.name + " (" +
             std::to_string(v.used) + " bytes)" + where());
}

// A warp mask must include the caller and name only lanes that exist.
void check_mask(unsigned mask, unsigned nthreads) {
  const unsigned lane = g_thr->lane, base = g_thr->warp * 32;
  if (!(mask >> lane & 1u)) fail("warp mask " + hex(mask) + " leaves out the calling lane " + std::to_string(lane) + where());
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && base + l >= nthreads)
      fail("warp mask " + hex(mask) + " names lane " + std::to_string(l) + ", which does not exist (a block of " +
           std::to_string(nthreads) + " threads ends in a partial warp)" + where());
}

void check_src(unsigned mask, int src) {
  if (src >= 0 && !(mask >> src & 1u))
    fail("shuffle reads lane " + std::to_string(src) + ", which is not in the mask " + hex(mask) + where());
}

// Every block of the grid in launch order, on either back end: shared memory poisoned before
// ``run_block()``, its guard bytes checked after.
template <typename RunBlock>
void for_each_block(dim3 grid, size_t smem, RunBlock&& run_block) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_blk->bid = make_uint3(x, y, z);
        poison_shared(smem);
        ++g_blocks;
        run_block();
        check_guard(smem);
      }
}

uint3 thread_index(unsigned i, dim3 bd) { return make_uint3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)); }

#ifndef EMU_OS_THREADS
// ------------------------------------------------------------------------------------------
// Fibers
// ------------------------------------------------------------------------------------------
enum class St { Ready, AtBlockBarrier, AtWarpBarrier, Exited };

struct Fiber {
  ucontext_t ctx;
  St st = St::Ready;
  unsigned wmask = 0;
  ThreadCtx tc;
};

struct Block {
  unsigned n = 0;
  std::vector<Fiber> f;
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  unsigned cur = 0;
  std::vector<std::array<unsigned char, 16>> slots;  // warp exchange, one per thread
  std::string error;
};

Block* g_b = nullptr;

// Fiber stacks, reused across launches (grow-only; only touched pages take memory).
struct Stacks {
  size_t bytes = 0;
  std::vector<std::unique_ptr<char[]>> v;
  char* get(unsigned i) { return v[i].get(); }
  void ensure(unsigned n) {
    size_t want = 256 * 1024;
    if (const char* e = std::getenv("WHYMATCH_EMU_STACK_KB")) want = std::strtoul(e, nullptr, 10) * 1024;
    if (want != bytes) { v.clear(); bytes = want; }
    while (v.size() < n) v.emplace_back(new char[bytes]);
  }
} g_stacks;

void trampoline() {
  Block* b = g_b;
  const unsigned i = b->cur;
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  b->f[i].st = St::Exited;  // uc_link returns to the scheduler
}

void yield_to_scheduler() { swapcontext(&g_b->f[g_b->cur].ctx, &g_b->sched); }

struct Schedule {
  enum Kind { Forward, Reverse, Random } kind = Forward;
  std::mt19937 rng{0};
  Schedule() {
    const char* e = std::getenv("WHYMATCH_EMU_SCHEDULE");
    if (!e || !*e || !std::strcmp(e, "forward")) return;
    if (!std::strcmp(e, "reverse")) { kind = Reverse; return; }
    if (!std::strncmp(e, "random:", 7) && e[7]) {
      char* end = nullptr;
      const unsigned long seed = std::strtoul(e + 7, &end, 10);
      if (*end == '\0') { kind = Random; rng.seed(static_cast<unsigned>(seed)); return; }
    }
    fail(std::string("WHYMATCH_EMU_SCHEDULE must be forward, reverse or random:SEED, got '") + e + "'");
  }
};

std::string deadlock_report(const Block& b, unsigned exited, unsigned at_bar) {
  std::ostringstream o;
  o << "deadlock in block " << g_blk->bid.x << "," << g_blk->bid.y << "," << g_blk->bid.z << " of " << b.n
    << " threads: " << exited << " exited, " << at_bar << " wait at __syncthreads";
  for (unsigned i = 0; i < b.n; ++i) {
    if (b.f[i].st != St::AtWarpBarrier) continue;
    const unsigned m = b.f[i].wmask, base = i / 32 * 32;
    o << "; thread " << i << " waits at a warp barrier with mask " << hex(m);
    for (unsigned l = 0; l < 32; ++l)
      if ((m >> l & 1u) && base + l < b.n && b.f[base + l].st != St::AtWarpBarrier)
        o << " (lane " << l << (b.f[base + l].st == St::Exited ? " exited)" : " waits elsewhere)");
    break;
  }
  return o.str();
}

void run_block(Block& b, unsigned n, const std::function<void()>& body, Schedule& sch) {
  b.n = n;
  b.body = &body;
  b.error.clear();
  b.f.assign(n, Fiber{});
  b.slots.assign(n, {});
  const dim3 bd = g_blk->bdim;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& fb = b.f[i];
    fb.tc.tid = thread_index(i, bd);
    fb.tc.linear = i;
    fb.tc.lane = i % 32;
    fb.tc.warp = i / 32;
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = g_stacks.get(i);
    fb.ctx.uc_stack.ss_size = g_stacks.bytes;
    fb.ctx.uc_link = &b.sched;
    makecontext(&fb.ctx, trampoline, 0);
  }
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = sch.kind == Schedule::Reverse ? n - 1 - i : i;
  // Releases the warp barrier that thread i waits at when all lanes of its mask have arrived.
  const auto release_warp = [&b](unsigned i) {
    const unsigned m = b.f[i].wmask, base = i / 32 * 32;
    for (unsigned l = 0; l < 32; ++l)
      if ((m >> l & 1u) && !(b.f[base + l].st == St::AtWarpBarrier && b.f[base + l].wmask == m)) return false;
    for (unsigned l = 0; l < 32; ++l)
      if (m >> l & 1u) b.f[base + l].st = St::Ready;
    return true;
  };
  for (;;) {
    if (sch.kind == Schedule::Random) std::shuffle(order.begin(), order.end(), sch.rng);
    // Run the threads in the schedule's order; a warp whose barrier completes runs on at once (the
    // scan restarts), so the warp first in the order reaches the next __syncthreads before the
    // next warp starts: warps run as far apart as a block barrier allows, which exposes a missing
    // barrier between warps; lanes of a warp interleave only at warp barriers and shuffles.
    for (unsigned idx = 0; idx < n; ++idx) {
      const unsigned i = order[idx];
      if (b.f[i].st != St::Ready) continue;
      b.cur = i;
      g_thr = &b.f[i].tc;
      swapcontext(&b.sched, &b.f[i].ctx);
      g_thr = nullptr;
      if (!b.error.empty()) fail(b.error);
      if (b.f[i].st == St::AtWarpBarrier && release_warp(i)) idx = static_cast<unsigned>(-1);  // restart the scan
    }
    unsigned exited = 0, at_bar = 0;
    for (const auto& fb : b.f) {
      exited += fb.st == St::Exited;
      at_bar += fb.st == St::AtBlockBarrier;
    }
    if (exited == n) return;
    bool released = false;  // (the scan releases every completed warp barrier; a safety net)
    for (unsigned i = 0; i < n && !released; ++i)
      if (b.f[i].st == St::AtWarpBarrier) released = release_warp(i);
    if (released) continue;
    if (at_bar > 0 && at_bar + exited == n) {  // exited threads do not hold a __syncthreads back (sm_70+)
      for (auto& fb : b.f)
        if (fb.st == St::AtBlockBarrier) fb.st = St::Ready;
      continue;
    }
    fail(deadlock_report(b, exited, at_bar));
  }
}

void run_blocks(dim3 grid, unsigned n, const std::function<void()>& body, size_t smem) {
  Block b;
  g_stacks.ensure(n);
  Schedule sch;
  g_b = &b;
  try {
    for_each_block(grid, smem, [&] { run_block(b, n, body, sch); });
  } catch (...) {
    g_b = nullptr;
    throw;
  }
  g_b = nullptr;
}

}  // namespace

void syncthreads() {
  g_b->f[g_b->cur].st = St::AtBlockBarrier;
  yield_to_scheduler();
}

void syncwarp(unsigned mask) {
  check_mask(mask, g_b->n);
  const unsigned base = g_thr->warp * 32;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && g_b->f[base + l].st == St::Exited)
      fail("warp mask " + hex(mask) + " names lane " + std::to_string(l) + ", which has exited" + where());
  Fiber& me = g_b->f[g_b->cur];
  me.st = St::AtWarpBarrier;
  me.wmask = mask;
  yield_to_scheduler();
}

void warp_exchange(unsigned mask, const void* in, void* out, size_t nbytes, int src) {
  check_mask(mask, g_b->n);
  check_src(mask, src);
  std::memcpy(g_b->slots[g_thr->linear].data(), in, nbytes);
  syncwarp(mask);  // every lane has deposited
  const void* from = src < 0 ? in : g_b->slots[g_thr->warp * 32 + static_cast<unsigned>(src)].data();
  std::memcpy(out, from, nbytes);
  syncwarp(mask);  // every lane has read before the slots are reused
}

#else
// ------------------------------------------------------------------------------------------
// OS threads
// ------------------------------------------------------------------------------------------
struct Warp {
  unsigned arrived = 0;
  unsigned long long gen = 0;
};

struct Block {
  std::mutex mu;
  std::condition_variable cv;
  unsigned n = 0, alive = 0, arrived = 0;
  unsigned long long gen = 0;
  std::vector<Warp> warps;
  std::vector<char> exited;
  std::vector<std::array<unsigned char, 16>> slots;
  std::string error;
  bool abort = false;
};

Block* g_b = nullptr;

int timeout_s() {
  const char* e = std::getenv("WHYMATCH_EMU_TIMEOUT_S");
  return e && *e ? std::atoi(e) : 60;
}

// What the other threads of a block throw once one thread failed: never the block's reported error
// while the failing thread's own message can be had (they may reach the lock first).
const char* const kAborted = "emu: aborted (another thread of the block failed)";

template <typename Pred>
void wait_or_fail(std::unique_lock<std::mutex>& lk, Block& b, Pred done, const char* what) {
  if (!b.cv.wait_for(lk, std::chrono::seconds(timeout_s()), [&] { return b.abort || done(); })) {
    b.abort = true;
    b.cv.notify_all();
    throw std::runtime_error("emu: deadlock: a thread waited " + std::to_string(timeout_s()) + " s at " + what +
                             where());
  }
  if (b.abort && !done()) throw std::runtime_error(kAborted);
}

void release_if_complete(Block& b) {
  if (b.arrived > 0 && b.arrived == b.alive) {
    b.arrived = 0;
    ++b.gen;
    b.cv.notify_all();
  }
}

void run_blocks(dim3 grid, unsigned n, const std::function<void()>& body, size_t smem) {
  const dim3 bd = g_blk->bdim;
  for_each_block(grid, smem, [&] {
    Block b;
    b.n = b.alive = n;
    b.warps.resize((n + 31) / 32);
    b.exited.assign(n, 0);
    b.slots.assign(n, {});
    g_b = &b;
    std::vector<std::thread> ts;
    ts.reserve(n);
    for (unsigned i = 0; i < n; ++i)
      ts.emplace_back([&, i] {
        ThreadCtx tc;
        tc.tid = thread_index(i, bd);
        tc.linear = i;
        tc.lane = i % 32;
        tc.warp = i / 32;
        g_thr = &tc;
        try {
          body();
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lk(b.mu);
          const bool secondary = std::string(e.what()) == kAborted;
          if (b.error.empty() || (b.error == kAborted && !secondary)) b.error = e.what();
          b.abort = true;
        }
        std::lock_guard<std::mutex> lk(b.mu);
        b.exited[i] = 1;
        --b.alive;
        release_if_complete(b);
        b.cv.notify_all();
      });
    for (auto& t : ts) t.join();
    g_b = nullptr;
    if (!b.error.empty()) fail(b.error);
  });
}

}  // namespace

void syncthreads() {
  Block& b = *g_b;
  std::unique_lock<std::mutex> lk(b.mu);
  const auto g = b.gen;
  ++b.arrived;
  release_if_complete(b);
  wait_or_fail(lk, b, [&] { return b.gen != g; }, "__syncthreads");
}

void syncwarp(unsigned mask) {
  Block& b = *g_b;
  check_mask(mask, b.n);
  std::unique_lock<std::mutex> lk(b.mu);
  const unsigned base = g_thr->warp * 32;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && b.exited[base + l])
      fail("warp mask " + hex(mask) + " names lane " + std::to_string(l) + ", which has exited" + where());
  Warp& w = b.warps[g_thr->warp];
  const auto g = w.gen;
  if (++w.arrived == static_cast<unsigned>(__builtin_popcount(mask))) {
    w.arrived = 0;
    ++w.gen;
    b.cv.notify_all();
  }
  wait_or_fail(lk, b, [&] { return w.gen != g; }, "a warp barrier");
}

void warp_exchange(unsigned mask, const void* in, void* out, size_t nbytes, int src) {
  Block& b = *g_b;
  check_mask(mask, b.n);
  check_src(mask, src);
  std::memcpy(b.slots[g_thr->linear].data(), in, nbytes);
  syncwarp(mask);
  const void* from = src < 0 ? in : b.slots[g_thr->warp * 32 + static_cast<unsigned>(src)].data();
  std::memcpy(out, from, nbytes);
  syncwarp(mask);
}
#endif

bool register_shared(void* p, size_t bytes, size_t used, const char* name) {
  std::lock_guard<std::mutex> lk(g_static_mu);
  g_static_smem.push_back({static_cast<unsigned char*>(p), bytes, used, name});
  std::memset(p, kPoison, bytes);  // the first block of the first launch: it is running already
  return true;
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error(what.compare(0, 5, "emu: ") == 0 ? what : "emu: " + what);
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  std::lock_guard<std::mutex> one_grid(g_launch_mu);
  const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    t_last = cudaErrorInvalidConfiguration;
    return;
  }
  size_t max_dyn = kSmemDefault;
  {
    std::lock_guard<std::mutex> lk(g_attr_mu);
    const auto it = g_max_dyn.find(kernel);
    if (it != g_max_dyn.end()) max_dyn = static_cast<size_t>(it->second);
  }
  if (smem > max_dyn) {  // a device refuses the launch: too much dynamic shared memory for this kernel
    t_last = cudaErrorInvalidValue;
    return;
  }
  ++g_launches;
  g_max_dyn_launched = std::max<unsigned long long>(g_max_dyn_launched, smem);
  std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem + kGuard + 128]);  // 128-byte aligned below (WMMA needs 32)
  BlockCtx blk;
  blk.bdim = block;
  blk.gdim = grid;
  g_blk = &blk;
  g_dyn_smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn.get()) + 127) & ~uintptr_t(127));
  try {
    run_blocks(grid, static_cast<unsigned>(nthreads), body, smem);
  } catch (...) {
    g_blk = nullptr;
    g_dyn_smem = nullptr;
    throw;
  }
  g_blk = nullptr;
  g_dyn_smem = nullptr;
}

}  // namespace emu

// --------------------------------------------------------------------------------------------
// The CUDA runtime API subset
// --------------------------------------------------------------------------------------------
extern "C" {

// For the tests (ctypes): launches and blocks run so far, and the largest dynamic shared memory of
// a launch; reset with wm_emu_reset_stats.
__attribute__((visibility("default"))) void wm_emu_stats(unsigned long long* out3) {
  out3[0] = emu::g_launches;
  out3[1] = emu::g_blocks;
  out3[2] = emu::g_max_dyn_launched;
}
__attribute__((visibility("default"))) void wm_emu_reset_stats() {
  emu::g_launches = emu::g_blocks = emu::g_max_dyn_launched = 0;
}

// For the tests (ctypes): the calling thread's pending "last error", to set one as another library's
// failed call would (tests/test_emulated_findings.py: an op must report it and leave it pending).
__attribute__((visibility("default"))) int wm_emu_peek_last_error() { return static_cast<int>(emu::t_last); }
__attribute__((visibility("default"))) void wm_emu_set_last_error(int e) { emu::t_last = static_cast<cudaError_t>(e); }

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::t_last;
  emu::t_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::t_last; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unknown error";
  }
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t count) { return cudaMemsetAsync(p, value, count, nullptr); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > emu::kSmemOptin) return emu::t_last = cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lk(emu::g_attr_mu);
    emu::g_max_dyn[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes* a, const void* func) {
  std::memset(a, 0, sizeof *a);
  a->maxThreadsPerBlock = 1024;
  std::lock_guard<std::mutex> lk(emu::g_attr_mu);
  const auto it = emu::g_max_dyn.find(func);
  a->maxDynamicSharedSizeBytes = it == emu::g_max_dyn.end() ? static_cast<int>(emu::kSmemDefault) : it->second;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : (emu::t_last = cudaErrorInvalidDevice); }

cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return emu::t_last = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(emu::kSmemOptin); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = static_cast<int>(emu::kSmemDefault); break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    default: *v = 0;
  }
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* c) {
  *c = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* p, int device) {
  if (device != 0) return emu::t_last = cudaErrorInvalidDevice;
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "whymatch host emulation");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->maxThreadsPerBlock = 1024;
  p->sharedMemPerBlock = emu::kSmemDefault;
  p->sharedMemPerBlockOptin = emu::kSmemOptin;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}

}  // extern "C"
