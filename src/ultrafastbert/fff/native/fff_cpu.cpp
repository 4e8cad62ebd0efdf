// Native CPU inference for the fast feedforward (FFF) layer (docs/design.md §1.1).
//
//   logit_n = x . w_in[n] + b_in[n];  go right iff logit_n > 0 (exact 0 and NaN go left)
//   y = sum over trees, sum over visited n of GELU(logit_n) * w_out_row[n]   (exact erf GELU)
//
// Registered as torch ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT, so other
// parts of the package may add ops to the same namespace):
//   fff_cpu_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa) -> y
//   fff_cpu_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_cpu_isa() -> str   the best instruction set this CPU runs: "avx512", "avx2" or ""
// x (T, d) float32; w_in and w_out_rows (K*N, d) float32 or bfloat16 (bf16 is widened exactly to
// fp32 in registers; all arithmetic is fp32); b_in (K*N,) float32; isa 2 = AVX-512, 1 = AVX2.
//
// The kernel is written once (fff_cpu_walk.h) and compiled twice, for AVX-512 (F, BW, VL) and
// for AVX2 + FMA, with per-function target attributes; the CPU is checked at run time. Threads
// come from torch's own pool (at::parallel_for), never a second runtime: two spinning thread
// pools in one process stall each other on a 2-core machine.
//
// Headers are kept to the few needed so that the first-use build stays short.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <immintrin.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

// One call's data, as raw pointers (at::parallel_for bodies must not touch Tensors).
struct Problem {
  const float* x;      // (T, d)
  const void* w_in;    // (K*N, d) float or bf16 bits
  const float* b_in;   // (K*N,)
  const void* w_out;   // (K*N, d) output rows, float or bf16 bits
  float* y;            // (T, d)
  int64_t* nodes;      // (T, K, D+1) or null
  int64_t d, n_trees, depth;
  bool prefetch_out;   // prefetch each visited output row as soon as its node is known
};

// Tokens walked together. Their dot products are independent, so while one token's logit waits
// on its reduction the others keep the FMA units busy; this hides the level-to-level dependency
// (a token cannot load its next row before its current logit is known).
constexpr int kGroup = 4;

// From this many tokens in one call, the visited output rows are prefetched during the walk:
// a call that large touches most of the weights, so its rows have usually left the caches
// since their last use (measured: ~10% faster at 4,096 tokens, ~10% slower at 128 where the
// rows are still cached and the prefetches are wasted issue slots).
constexpr int64_t kPrefetchTokens = 1024;

// Deep levels walked bucket by bucket (see run_bucketed): a subtree of 5 levels is 31 nodes,
// 186 KB of fp32 input and output rows at d=768, small enough to stay in L2 while its bucket
// is processed.
constexpr int64_t kDeepLevels = 5;
// Tokens per top-level bucket below which bucketing does not pay for its second pass over x.
constexpr int64_t kTokensPerBucket = 8;

// Whether a task of `tokens` tokens is walked in two phases (run_bucketed): one tree (several
// trees would re-read x once per tree and phase), deep enough to have a subtree below the top
// levels, and enough tokens per bucket for the deep rows to be reused.
bool use_buckets(const Problem& pb, int64_t tokens) {
  const int64_t split = pb.depth + 1 - kDeepLevels;  // top levels walked in token order
  if (pb.n_trees != 1 || split < 1) return false;
  return tokens >= kTokensPerBucket * (int64_t{1} << split);
}

// Token indices [0, n) ordered by the node each token reached on level `split` (`local`: tree-
// local heap ids, all on that level), with a stable counting sort.
std::vector<int64_t> bucket_order(const std::vector<int64_t>& local, int64_t split) {
  const int64_t first = (int64_t{1} << split) - 1;  // first node of level `split`
  std::vector<int64_t> start((int64_t{1} << split) + 1, 0);
  for (const int64_t id : local) ++start[id - first + 1];
  for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
  std::vector<int64_t> order(local.size());
  for (size_t j = 0; j < local.size(); ++j) order[start[local[j] - first]++] = j;
  return order;
}

using RunFn = void (*)(const Problem&, int64_t, int64_t);

// Exact (erf) GELU on a scalar: only K*(D+1) of these per token, so no vector erf is needed.
inline float gelu(float z) { return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752440f)); }

}  // namespace

#define FFF_INLINE inline __attribute__((always_inline))

namespace avx512 {
#define FFF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// 16 floats per vector. bf16 loads widen the 16-bit patterns to fp32 (bf16 is the top half).
struct V {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int kAcc = 4;  // accumulators per dot product (32 registers to spare)
  FFF_TARGET FFF_INLINE static R zero() { return _mm512_setzero_ps(); }
  FFF_TARGET FFF_INLINE static R set1(float a) { return _mm512_set1_ps(a); }
  FFF_TARGET FFF_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
  FFF_TARGET FFF_INLINE static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  FFF_TARGET FFF_INLINE static float sum(R a) { return _mm512_reduce_add_ps(a); }
  FFF_TARGET FFF_INLINE static R load(const float* p) { return _mm512_loadu_ps(p); }
  FFF_TARGET FFF_INLINE static R load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  FFF_TARGET FFF_INLINE static __mmask16 mask(int n) {
    return static_cast<__mmask16>((1u << n) - 1u);
  }
  // The first n (< or = W) elements, zeros after; never reads past p + n.
  FFF_TARGET FFF_INLINE static R load_n(const float* p, int n) {
    return _mm512_maskz_loadu_ps(mask(n), p);
  }
  FFF_TARGET FFF_INLINE static R load_n(const uint16_t* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  FFF_TARGET FFF_INLINE static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  FFF_TARGET FFF_INLINE static void store_n(float* p, R a, int n) {
    _mm512_mask_storeu_ps(p, mask(n), a);
  }
};

#include "fff_cpu_walk.h"
#undef FFF_TARGET
}  // namespace avx512

namespace avx2 {
#define FFF_TARGET __attribute__((target("avx2,fma")))

// 8 floats per vector. Tails go through a zeroed stack buffer (AVX2 has no 16-bit masked load).
struct V {
  using R = __m256;
  static constexpr int W = 8;
  static constexpr int kAcc = 2;  // accumulators per dot product (16 registers: no spills)
  FFF_TARGET FFF_INLINE static R zero() { return _mm256_setzero_ps(); }
  FFF_TARGET FFF_INLINE static R set1(float a) { return _mm256_set1_ps(a); }
  FFF_TARGET FFF_INLINE static R add(R a, R b) { return _mm256_add_ps(a, b); }
  FFF_TARGET FFF_INLINE static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  FFF_TARGET FFF_INLINE static float sum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  FFF_TARGET FFF_INLINE static R load(const float* p) { return _mm256_loadu_ps(p); }
  FFF_TARGET FFF_INLINE static R load(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  template <class T>
  FFF_TARGET FFF_INLINE static R load_n(const T* p, int n) {
    T buf[W] = {};
    std::memcpy(buf, p, n * sizeof(T));
    return load(buf);
  }
  FFF_TARGET FFF_INLINE static void store(float* p, R a) { _mm256_storeu_ps(p, a); }
  FFF_TARGET FFF_INLINE static void store_n(float* p, R a, int n) {
    float buf[W];
    _mm256_storeu_ps(buf, a);
    std::memcpy(p, buf, n * sizeof(float));
  }
};

#include "fff_cpu_walk.h"
#undef FFF_TARGET
}  // namespace avx2

namespace {

enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

std::string isa_name() {
  switch (best_isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "";
  }
}

// Blocks of tokens per at::parallel_for task: enough multiply-adds (~256k) that waking the
// second thread pays off.
int64_t grain_blocks(int64_t work_per_block) {
  const int64_t blocks = (int64_t{1} << 18) / work_per_block;
  return blocks < 1 ? 1 : blocks;
}

// Outputs of at least this size go on 2 MB transparent huge pages (Linux; where THP is off the
// advice is ignored and the memory is ordinary). An output above glibc's mmap threshold (32 MB:
// 16,384 tokens at d=768) is a fresh mapping on every call, and on this VM its ~12,000 4 KB page
// faults cost more than the kernel itself (measured: 4.5 -> 2.3 us/token of CPU at 16,384
// tokens). The packed weights gain nothing measurable from huge pages, so they stay ordinary.
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeMinBytes = size_t{4} << 20;

// An uninitialised CPU tensor, on huge pages when large. Its storage stays resizable (through
// torch's CPU allocator), so it behaves as any other tensor. Small ones come straight from
// at::detail::empty_cpu: at::empty goes through the dispatcher, ~0.7 us of a 1-token call.
at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  void* p = nullptr;
  const size_t padded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (bytes >= kHugeMinBytes && posix_memalign(&p, kHugePage, padded) == 0) {
    madvise(p, padded, MADV_HUGEPAGE);  // advice: failure just means ordinary pages
    return at::for_blob(p, sizes)
        .deleter([](void* q) { std::free(q); })
        .options(at::TensorOptions().dtype(dtype))
        .resizeable_storage()
        .allocator(c10::GetCPUAllocator())
        .make_tensor();
  }
#endif
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// Every argument of a call, checked before anything is allocated or read.
void check_inputs(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                  const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa) {
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512, "fff_cpu_forward: isa must be 1 (avx2) or 2 "
              "(avx512), got ", isa);
  TORCH_CHECK(isa <= best_isa(), "fff_cpu_forward: this CPU does not support the requested "
              "instruction set ", isa);
  TORCH_CHECK(n_trees >= 1 && depth >= 0 && depth <= 40, "fff_cpu_forward: bad tree shape ",
              n_trees, "x", depth);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "fff_cpu_forward: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t rows = n_trees * ((int64_t{2} << depth) - 1);
  for (const at::Tensor* w : {&w_in, &w_out}) {
    TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() && w->dim() == 2 &&
                    w->size(0) == rows && w->size(1) == x.size(1) &&
                    (w->scalar_type() == at::kFloat || w->scalar_type() == at::kBFloat16),
                "fff_cpu_forward: weights must be contiguous (", rows, ", ", x.size(1),
                ") float32/bfloat16 CPU tensors");
  }
  TORCH_CHECK(b_in.device().is_cpu() && b_in.scalar_type() == at::kFloat &&
                  b_in.is_contiguous() && b_in.dim() == 1 && b_in.size(0) == rows,
              "fff_cpu_forward: b_in must be a contiguous (", rows, ",) float32 CPU tensor");
}

// Fills y (and nodes when not null) for x; the shared body of both ops (inputs checked).
void run_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                 const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa,
                 at::Tensor& y, int64_t* nodes) {
  const int64_t T = x.size(0), d = x.size(1);
  const Problem pb{x.data_ptr<float>(), w_in.data_ptr(), b_in.data_ptr<float>(),
                   w_out.data_ptr(), y.data_ptr<float>(), nodes, d, n_trees, depth,
                   T >= kPrefetchTokens};
  const bool in_bf16 = w_in.scalar_type() == at::kBFloat16;
  const bool out_bf16 = w_out.scalar_type() == at::kBFloat16;
  const RunFn run = isa == kAvx512 ? avx512::pick_run(in_bf16, out_bf16)
                                   : avx2::pick_run(in_bf16, out_bf16);
  // Tasks are whole blocks of kTask tokens so that only the call's last group can be short.
  constexpr int64_t kTask = 8;
  const int64_t blocks = (T + kTask - 1) / kTask;
  const int64_t grain = grain_blocks(2 * kTask * n_trees * (depth + 1) * (d + 1));
  if (blocks < 2 * grain) {  // too little for two threads: no parallel region at all (at::
    run(pb, 0, T);            // parallel_for would still start the OpenMP team: ~1 us)
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run(pb, b0 * kTask, std::min(b1 * kTask, T));
  });
}

at::Tensor fff_cpu_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                           const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fff_cpu_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, y, nodes.data_ptr<int64_t>());
  return {y, nodes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_cpu_forward(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa) -> Tensor",
        &fff_cpu_forward);
  m.def("fff_cpu_forward_nodes(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa) -> (Tensor, Tensor)",
        &fff_cpu_forward_nodes);
  m.def("fff_cpu_isa() -> str", &isa_name);
}
