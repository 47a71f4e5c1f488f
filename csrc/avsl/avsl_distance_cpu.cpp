// CPU kernels of the AVSL rectified distance (see avsl/avsl_distance.h).
//
// Work unit: one query against a block of kB gallery items. The gallery is first copied into
// block-major, node-major tiles (geT[b][r][jj], rgT[b][c][jj]) so that every inner loop runs over
// the kB pairs of a block contiguously: the sparse product hat_{l-1} @ link* broadcasts one link
// value onto kB hats at a time (one or two SIMD registers), and the hats of a block live in two
// small node-major buffers (R_max x kB). The hot per-block functions are compiled three times, for
// AVX-512, AVX2+FMA and baseline x86-64 (GCC target attributes), and the first call picks the
// copy that the CPU supports: the wheel itself is built for baseline x86-64.
#include <algorithm>
#include <cstring>
#include <new>
#include <vector>

#include "avsl/avsl_distance.h"
#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "common/vec_math.h"

// The vector helpers below are always inlined into their callers, which share one target: no
// vector crosses a call boundary, so GCC's ABI note about AVX-512 vector returns does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace whymatch {

namespace {

constexpr int kB = 16;  // gallery items per block

// std::vector storage aligned to a cache line: a block row of kB floats is one 64-byte line, and
// a misaligned row would make every vector load of it touch two lines (about twice the cost).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U> LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* q, size_t) { ::operator delete(q, std::align_val_t(64)); }
  template <typename U> bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U> bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using AVec = std::vector<T, LineAligned<T>>;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WM_AVSL_X86 1
#define WM_AVSL_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define WM_AVSL_AVX2 __attribute__((target("avx2,fma")))
#define WM_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define WM_AVSL_X86 0
#define WM_ALWAYS_INLINE inline
#endif

// The instruction set of the hot loops, chosen once from what the CPU supports (common/cpu_isa.h).
using Isa = CpuIsa;
inline Isa isa() { return WM_AVSL_X86 ? cpu_isa() : Isa::kBase; }

template <typename T>
struct Ctx {
  const AvslParams* p;
  int L;
  int64_t S, S1, R0, Rmax, nb;
  int64_t R[kAvslMaxLevels], off[kAvslMaxLevels];
  const T* qe;
  const T* rq;
  const T* values;
  const T* row_values;
  const int64_t* col_ptr;
  const int32_t* row_idx;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  AVec<T> geT, rgT;  // [nb][S][kB], [nb][S1][kB], zero-padded
  std::vector<T> bq;        // gamma * bias, (S1)
  T gamma;

  Ctx(const AvslParams& pp, int num_threads) : p(&pp), L(pp.L) {
    S = pp.S(); S1 = pp.S1(); R0 = pp.R[0]; Rmax = pp.Rmax();
    nb = (pp.G + kB - 1) / kB;
    for (int l = 0; l < L; ++l) { R[l] = pp.R[l]; off[l] = pp.off(l); }
    qe = static_cast<const T*>(pp.qe);
    rq = static_cast<const T*>(pp.rq);
    values = static_cast<const T*>(pp.values);
    row_values = static_cast<const T*>(pp.row_values);
    col_ptr = pp.col_ptr; row_idx = pp.row_idx; row_ptr = pp.row_ptr; col_idx = pp.col_idx;
    gamma = static_cast<T>(pp.gamma);
    geT.assign(static_cast<size_t>(nb * S * kB), T(0));
    rgT.assign(static_cast<size_t>(nb * S1 * kB), T(0));
    bq.resize(static_cast<size_t>(S1));
    const T* bias = static_cast<const T*>(pp.bias);
    for (int64_t c = 0; c < S1; ++c) bq[c] = gamma * bias[c];
    const T* ge = static_cast<const T*>(pp.ge);
    const T* rg = static_cast<const T*>(pp.rg);
    parallel_for(nb, num_threads, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = std::min<int64_t>(kB, pp.G - b * kB);
        T* gt = geT.data() + b * S * kB;
        T* rt = rgT.data() + b * S1 * kB;
        for (int64_t jj = 0; jj < n; ++jj) {
          const T* gr = ge + (b * kB + jj) * S;
          for (int64_t r = 0; r < S; ++r) gt[r * kB + jj] = gr[r];
          if (S1) {
            const T* rr = rg + (b * kB + jj) * S1;
            for (int64_t c = 0; c < S1; ++c) rt[c * kB + jj] = rr[c];
          }
        }
      }
    });
  }

  // gamma * coef * rq[i], (S1): the query's factor of z.
  void query_weights(int64_t i, T* wq) const {
    const T* coef = static_cast<const T*>(p->coef);
    const T* r = rq + i * S1;
    for (int64_t c = 0; c < S1; ++c) wq[c] = gamma * coef[c] * r[c];
  }
};

// Per-thread buffers.
template <typename T>
struct Scratch {
  AVec<T> h0, h1, wq, A, P, u0, u1;
  Scratch(const Ctx<T>& cx, bool backward)
      : h0(cx.Rmax * kB), h1(cx.Rmax * kB), wq(std::max<int64_t>(1, cx.S1)) {
    if (backward) {
      A.resize(std::max<int64_t>(1, cx.S1) * kB);
      P.resize(std::max<int64_t>(1, cx.S1) * kB);
      u0.resize(cx.Rmax * kB);
      u1.resize(cx.Rmax * kB);
    }
  }
};

// kB values of T as one GCC vector: AVX-512 holds it in one (float) or two (double) registers,
// narrower ISAs split it. Loads and stores go through memcpy (no alignment assumed).
template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(sizeof(float) * kB))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(sizeof(double) * kB))); };

template <typename T>
WM_ALWAYS_INLINE typename VecOf<T>::type vload(const T* p) {
  typename VecOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename V>
WM_ALWAYS_INLINE void vstore(T* p, const V& v) { std::memcpy(p, &v, sizeof(v)); }

// Level 0 of a block: hat_0[r][jj] = (a[r] - b_jj[r])^2.
template <typename T>
WM_ALWAYS_INLINE void level0(const T* __restrict__ a, const T* __restrict__ gt, int64_t R0, T* __restrict__ h) {
  for (int64_t r = 0; r < R0; ++r) {
    const auto t = a[r] - vload(gt + r * kB);
    vstore(h + r * kB, t * t);
  }
}

// sum_{k in [kb, ke)} val[k] * prev[idx[k]][0..kB), accumulated in native NB-byte registers: GCC
// lowers arithmetic on vectors wider than the target's registers through the stack (AVX2 ran
// this loop 3x slower than the baseline path before), so each row of kB values is P parts.
template <int NB, typename T>
WM_ALWAYS_INLINE typename VecOf<T>::type sparse_dot(const int32_t* __restrict__ idx, const T* __restrict__ val,
                                                    int64_t kb, int64_t ke, const T* __restrict__ prev) {
  using N = typename vec::Native<T, NB>::V;
  constexpr int P = static_cast<int>(sizeof(typename VecOf<T>::type) / NB);  // parts per row
  constexpr int C = P >= 4 ? 2 : 4;  // independent chains: C * P accumulators stay in registers
  constexpr int L = NB / static_cast<int>(sizeof(T));  // lanes per part
  N acc[C][P] = {};
  int64_t k = kb;
  for (; k + C - 1 < ke; k += C) {
    for (int c = 0; c < C; ++c) {
      const T v = val[k + c];
      const T* row = prev + static_cast<int64_t>(idx[k + c]) * kB;
      for (int q = 0; q < P; ++q) {
        N x;
        std::memcpy(&x, row + q * L, NB);
        acc[c][q] += v * x;
      }
    }
  }
  for (; k < ke; ++k) {
    const T v = val[k];
    const T* row = prev + static_cast<int64_t>(idx[k]) * kB;
    for (int q = 0; q < P; ++q) {
      N x;
      std::memcpy(&x, row + q * L, NB);
      acc[0][q] += v * x;
    }
  }
  typename VecOf<T>::type out;
  for (int q = 0; q < P; ++q) {
    N t = acc[0][q];
    for (int c = 1; c < C; ++c) t += acc[c][q];
    std::memcpy(reinterpret_cast<char*>(&out) + q * NB, &t, NB);
  }
  return out;
}

// Forward of query i against gallery block b: d[jj] for the kB pairs (padded items compute on
// zeros and are ignored by the caller). With A, P non-null, A_l and p_l of levels >= 1 are
// stored at [(off_l - R0) * kB ...] for the backward. NB: the ISA's vector register in bytes.
template <int NB, typename T>
WM_ALWAYS_INLINE void forward_block_impl(const Ctx<T>& cx, Scratch<T>& sc, int64_t i, int64_t b, T* __restrict__ d,
                                         T* __restrict__ A, T* __restrict__ P) {
  using V = typename VecOf<T>::type;
  const T* a = cx.qe + i * cx.S;
  const T* gt = cx.geT.data() + b * cx.S * kB;
  const T* rt = cx.rgT.data() + b * cx.S1 * kB;
  T* prev = sc.h0.data();
  T* cur = sc.h1.data();
  level0(a, gt, cx.R0, prev);
  V dsum = {};
  if (cx.L == 1) {
    for (int64_t r = 0; r < cx.R0; ++r) dsum += vload(prev + r * kB);
    vstore(d, dsum);
    return;
  }
  const T* wq = sc.wq.data();
  for (int l = 1; l < cx.L; ++l) {
    const int64_t R = cx.R[l], o = cx.off[l], o1 = o - cx.R0;
    const bool last = l == cx.L - 1;
    const int64_t* cp = cx.col_ptr + o1 + (l - 1);
    for (int64_t c = 0; c < R; ++c) {
      const V acc = sparse_dot<NB>(cx.row_idx, cx.values, cp[c], cp[c + 1], prev);
      const V t = a[o + c] - vload(gt + (o + c) * kB);
      // p = sigmoid(z) = keep(-z), in the block's ISA (common/vec_math.h)
      const V z = wq[o1 + c] * vload(rt + (o1 + c) * kB) + cx.bq[o1 + c];
      const V pp = vec::keep<T, NB>(-z);
      const V h = t * t * pp + acc * (T(1) - pp);
      if (last) dsum += h; else vstore(cur + c * kB, h);
      if (A) {
        vstore(A + (o1 + c) * kB, acc);
        vstore(P + (o1 + c) * kB, pp);
      }
    }
    std::swap(prev, cur);
  }
  vstore(d, dsum);
}

// Backward of query i against block b (g: the block's kB upstream gradients, 0 for padding):
// adds each level's sum over the block to gbias / gcoef (S1, double).
template <int NB, typename T>
WM_ALWAYS_INLINE void backward_block_impl(const Ctx<T>& cx, Scratch<T>& sc, int64_t i, int64_t b,
                                          const T* __restrict__ g, double* __restrict__ gbias,
                                          double* __restrict__ gcoef) {
  using V = typename VecOf<T>::type;
  T d[kB];
  forward_block_impl<NB>(cx, sc, i, b, d, sc.A.data(), sc.P.data());
  const T* a = cx.qe + i * cx.S;
  const T* rqi = cx.rq + i * cx.S1;
  const T* gt = cx.geT.data() + b * cx.S * kB;
  const T* rt = cx.rgT.data() + b * cx.S1 * kB;
  T* u = sc.u0.data();
  T* un = sc.u1.data();
  const int top = cx.L - 1;
  const V gv = vload(g);
  for (int64_t c = 0; c < cx.R[top]; ++c) vstore(u + c * kB, gv);
  for (int l = top; l >= 1; --l) {
    const int64_t R = cx.R[l], o = cx.off[l], o1 = o - cx.R0;
    for (int64_t c = 0; c < R; ++c) {
      const V t = a[o + c] - vload(gt + (o + c) * kB);
      const V pj = vload(sc.P.data() + (o1 + c) * kB), q = T(1) - pj;
      const V uc = vload(u + c * kB);
      const V s = uc * (t * t - vload(sc.A.data() + (o1 + c) * kB)) * pj * q;
      const V sr = s * vload(rt + (o1 + c) * kB);
      vstore(u + c * kB, uc * q);  // w = u * (1 - p), the input of the next level down
      T sb = T(0), scf = T(0);
      for (int jj = 0; jj < kB; ++jj) {
        sb += s[jj];
        scf += sr[jj];
      }
      gbias[o1 + c] += static_cast<double>(cx.gamma * sb);
      gcoef[o1 + c] += static_cast<double>(cx.gamma * rqi[o1 + c] * scf);
    }
    if (l > 1) {  // u_{l-1}[r] = sum_c link_{l-1}[r, c] w[c]  (compressed rows of link_{l-1})
      const int64_t* rp = cx.row_ptr + cx.off[l - 1] + (l - 1);
      for (int64_t r = 0; r < cx.R[l - 1]; ++r)
        vstore(un + r * kB, sparse_dot<NB>(cx.col_idx, cx.row_values, rp[r], rp[r + 1], u));
      std::swap(u, un);
    }
  }
}

// One entry point per compute type, dispatching to a copy of the block compiled for the CPU's ISA.
#if WM_AVSL_X86
#define WM_AVSL_VARIANTS(NAME, IMPL, SIG, ARGS)              \
  WM_AVSL_AVX512 void NAME##_avx512 SIG { IMPL<64> ARGS; }   \
  WM_AVSL_AVX2 void NAME##_avx2 SIG { IMPL<32> ARGS; }       \
  void NAME##_base SIG { IMPL<16> ARGS; }                    \
  void NAME SIG {                                        \
    switch (isa()) {                                     \
      case Isa::kAvx512: NAME##_avx512 ARGS; return;     \
      case Isa::kAvx2: NAME##_avx2 ARGS; return;         \
      default: NAME##_base ARGS; return;                 \
    }                                                    \
  }
#else
#define WM_AVSL_VARIANTS(NAME, IMPL, SIG, ARGS) void NAME SIG { IMPL<16> ARGS; }
#endif

WM_AVSL_VARIANTS(forward_block, forward_block_impl,
                 (const Ctx<float>& cx, Scratch<float>& sc, int64_t i, int64_t b, float* d, float* A, float* P),
                 (cx, sc, i, b, d, A, P))
WM_AVSL_VARIANTS(forward_block, forward_block_impl,
                 (const Ctx<double>& cx, Scratch<double>& sc, int64_t i, int64_t b, double* d, double* A, double* P),
                 (cx, sc, i, b, d, A, P))

WM_AVSL_VARIANTS(backward_block, backward_block_impl,
                 (const Ctx<float>& cx, Scratch<float>& sc, int64_t i, int64_t b, const float* g, double* gbias,
                  double* gcoef),
                 (cx, sc, i, b, g, gbias, gcoef))
WM_AVSL_VARIANTS(backward_block, backward_block_impl,
                 (const Ctx<double>& cx, Scratch<double>& sc, int64_t i, int64_t b, const double* g, double* gbias,
                  double* gcoef),
                 (cx, sc, i, b, g, gbias, gcoef))

template <typename T>
void forward_impl(const AvslParams& p, int num_threads) {
  Ctx<T> cx(p, num_threads);
  T* out = static_cast<T*>(p.out);
  const int64_t tasks = p.Q * cx.nb;
  parallel_for(tasks, num_threads, 4, [&](int64_t t0, int64_t t1) {
    Scratch<T> sc(cx, false);
    T d[kB];
    for (int64_t t = t0; t < t1; ++t) {
      // gallery-block-major: a block's tiles (about 160 KB at S = 1536) stay in L2 while the
      // queries pass over them; a query's rows are 10 KB. The query's weights (S1 products) are
      // recomputed per block: under 1% of the block's sparse products, cheaper than keeping them.
      const int64_t b = t / p.Q, i = t % p.Q;
      cx.query_weights(i, sc.wq.data());
      forward_block(cx, sc, i, b, d, nullptr, nullptr);
      const int64_t n = std::min<int64_t>(kB, p.G - b * kB);
      std::memcpy(out + i * p.G + b * kB, d, sizeof(T) * n);
    }
  });
}

template <typename T>
void backward_impl(const AvslParams& p, int num_threads) {
  const int64_t S1 = p.S1();
  T* gc_out = static_cast<T*>(p.grad_coef);
  T* gb_out = static_cast<T*>(p.grad_bias);
  if (S1 == 0) return;
  std::fill_n(gc_out, S1, T(0));
  std::fill_n(gb_out, S1, T(0));
  if (p.Q * p.G == 0) return;
  Ctx<T> cx(p, num_threads);
  const T* g = static_cast<const T*>(p.grad_out);
  const int64_t tasks = p.Q * cx.nb;
  // A fixed number of chunks, each with its own partial sums, reduced in chunk order: the result
  // does not depend on the thread count.
  const int64_t chunks = std::min<int64_t>(tasks, 64);
  std::vector<double> part(static_cast<size_t>(chunks * 2 * S1), 0.0);
  parallel_for(chunks, num_threads, 1, [&](int64_t c0, int64_t c1) {
    Scratch<T> sc(cx, true);
    T gb[kB];
    for (int64_t ch = c0; ch < c1; ++ch) {
      double* pb = part.data() + ch * 2 * S1;
      double* pc = pb + S1;
      const int64_t t0 = tasks * ch / chunks, t1 = tasks * (ch + 1) / chunks;
      int64_t cur_i = -1;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / cx.nb, b = t % cx.nb;
        if (i != cur_i) { cx.query_weights(i, sc.wq.data()); cur_i = i; }
        const int64_t n = std::min<int64_t>(kB, p.G - b * kB);
        for (int jj = 0; jj < kB; ++jj) gb[jj] = jj < n ? g[i * p.G + b * kB + jj] : T(0);
        backward_block(cx, sc, i, b, gb, pb, pc);
      }
    }
  });
  for (int64_t c = 0; c < S1; ++c) {
    double sb = 0.0, scf = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      sb += part[ch * 2 * S1 + c];
      scf += part[ch * 2 * S1 + S1 + c];
    }
    gb_out[c] = static_cast<T>(sb);
    gc_out[c] = static_cast<T>(scf);
  }
}

template <typename T>
struct Cand {
  T d;
  int64_t j;
};

template <typename T>
bool cand_before(const Cand<T>& x, const Cand<T>& y) { return avsl_before(x.d, x.j, y.d, y.j); }

template <typename T>
void topk_impl(const AvslParams& p, int num_threads) {
  if (p.Q == 0) return;
  Ctx<T> cx(p, num_threads);
  const int64_t k = p.k;
  // Work unit: a chunk of kQChunk queries against a range of gallery blocks, gallery-block-major
  // (a block's tiles stay in cache while the chunk's queries pass over it, as in the forward).
  // Few chunks: split the gallery into segments so that every thread has work. Each (query,
  // segment) keeps a bounded max-heap of its k best in `lists`, merged per query at the end.
  constexpr int64_t kQChunk = 32;
  const int64_t nqc = (p.Q + kQChunk - 1) / kQChunk;
  int64_t nseg = 1;
  if (nqc < num_threads) nseg = std::min<int64_t>(cx.nb, (num_threads + nqc - 1) / nqc);
  nseg = std::max<int64_t>(1, nseg);
  std::vector<Cand<T>> lists(static_cast<size_t>(p.Q * nseg * k));
  std::vector<int64_t> counts(static_cast<size_t>(p.Q * nseg), 0);
  parallel_for(nqc * nseg, num_threads, 1, [&](int64_t t0, int64_t t1) {
    Scratch<T> sc(cx, false);
    T d[kB];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qc = t / nseg, seg = t % nseg;
      const int64_t i0 = qc * kQChunk, i1 = std::min<int64_t>(p.Q, i0 + kQChunk);
      const int64_t b0 = cx.nb * seg / nseg, b1 = cx.nb * (seg + 1) / nseg;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = std::min<int64_t>(kB, p.G - b * kB);
        for (int64_t i = i0; i < i1; ++i) {
          cx.query_weights(i, sc.wq.data());  // per block, as in the forward
          forward_block(cx, sc, i, b, d, nullptr, nullptr);
          Cand<T>* heap = lists.data() + (i * nseg + seg) * k;  // max-heap: the worst on top
          int64_t& size = counts[i * nseg + seg];
          for (int64_t jj = 0; jj < n; ++jj) {
            const int64_t j = b * kB + jj;
            if (p.exclude_self && j == i) continue;
            const Cand<T> c{d[jj], j};
            if (size < k) {
              heap[size++] = c;
              std::push_heap(heap, heap + size, cand_before<T>);
            } else if (cand_before(c, heap[0])) {
              std::pop_heap(heap, heap + k, cand_before<T>);
              heap[k - 1] = c;
              std::push_heap(heap, heap + k, cand_before<T>);
            }
          }
        }
      }
    }
  });
  T* vals = static_cast<T*>(p.topk_values);
  parallel_for(p.Q, num_threads, 64, [&](int64_t q0, int64_t q1) {
    std::vector<Cand<T>> all;
    for (int64_t i = q0; i < q1; ++i) {
      all.clear();
      for (int64_t s = 0; s < nseg; ++s) {
        const auto* src = lists.data() + (i * nseg + s) * k;
        all.insert(all.end(), src, src + counts[i * nseg + s]);
      }
      std::sort(all.begin(), all.end(), cand_before<T>);
      WM_CHECK(static_cast<int64_t>(all.size()) >= k, "avsl_topk: fewer than k candidates for query " << i);
      for (int64_t m = 0; m < k; ++m) {
        vals[i * k + m] = all[m].d;
        p.topk_indices[i * k + m] = all[m].j;
      }
    }
  });
}

}  // namespace

void avsl_distance_cpu(const AvslParams& p, int num_threads) {
  check_avsl(p, "avsl_distance", false, false);
  if (p.Q * p.G == 0) return;
  if (p.dtype == DType::F64) forward_impl<double>(p, num_threads); else forward_impl<float>(p, num_threads);
}

void avsl_distance_backward_cpu(const AvslParams& p, int num_threads) {
  check_avsl(p, "avsl_distance_backward", true, false);
  if (p.dtype == DType::F64) backward_impl<double>(p, num_threads); else backward_impl<float>(p, num_threads);
}

void avsl_topk_cpu(const AvslParams& p, int num_threads) {
  check_avsl(p, "avsl_topk", false, true);
  if (p.dtype == DType::F64) topk_impl<double>(p, num_threads); else topk_impl<float>(p, num_threads);
}

}  // namespace whymatch
