// Native CPU inference for the fast feedforward (FFF) layer (docs/design.md §1.1).
//
//   logit_n = x . w_in[n] + b_in[n];  go right iff logit_n > 0 (exact 0 and NaN go left)
//   y = sum over trees, sum over visited n of GELU(logit_n) * w_out_row[n]   (exact erf GELU)
//
// Registered as torch ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT, so other
// parts of the package may add ops to the same namespace):
//   fff_cpu_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa) -> y
//   fff_cpu_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_cpu_forward_tuned(x, w_in, b_in, w_out_rows, n_trees, depth, isa, knobs) -> y
//   fff_cpu_forward_tuned_nodes(same) -> (y, nodes)   with a knobs table (see Knobs); the
//       untuned ops use the fixed defaults. Knobs choose how a call is walked, never its result.
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

// The CPU-dependent choices of how a call is walked (chosen per shape and token class by the
// autotuner in Python, see fff/native/tuning.py). None of them changes a result: every (token,
// tree) pair sees the same operations in the same order whatever the knobs (tested bit for bit).
struct Knobs {
  int64_t group = 4;           // tokens walked together: 1, 2, 4 or 8 (kMaxGroup)
  int64_t trees_together = 1;  // 1: all trees of a group take level l before any takes l+1
  int64_t prefetch = 0;        // 1: prefetch each visited output row once its node is known
  int64_t bucket = 8;          // tokens per top-level bucket from which one deep tree is walked
                               // in two phases (run_bucketed); 0: never
  int64_t grain = 1 << 18;     // multiply-adds per parallel task, at least
  int64_t block = 0;           // several trees: tokens per tree-major block (run_tree_blocked);
                               // 0: token by token through all trees (run_groups)
  int64_t sort = 0;            // 1: a tree-major block walks each level with its tokens sorted
                               // by node (run_tree_sorted), so a row serves a run of tokens
  int64_t split = 0;           // 1: several trees, two passes split between threads by trees,
                               // then by output columns (walk_trees, output_cols); `block` is
                               // then the tokens per sorted block (0: the whole call)
};

// Columns of one row of the knobs table the ops take: the row applies from min_tokens tokens
// per call (rows in increasing min_tokens; the first row's must be 0 or 1).
enum KnobColumn : int64_t {
  kMinTokens = 0, kColGroup, kColTreesTogether, kColPrefetch, kColBucket, kColGrain, kColBlock,
  kColSort, kColSplit, kColumns
};

// One call's data, as raw pointers (at::parallel_for bodies must not touch Tensors).
struct Problem {
  const float* x;      // (T, d)
  const void* w_in;    // (K*N, d) float or bf16 bits
  const float* b_in;   // (K*N,)
  const void* w_out;   // (K*N, d) output rows, float or bf16 bits
  float* y;            // (T, d)
  int64_t* nodes;      // (T, K, D+1) or null
  int64_t d, n_trees, depth;
  Knobs knobs;
  int64_t tokens = 0;           // T (the split walk)
  float* act = nullptr;         // (T, K*(D+1)) activations (the split walk)
  int64_t* path_nodes = nullptr;  // (T, K*(D+1)) node ids (the split walk)
};

// (token, row) dot products computed together in one dot_group: their chains are independent,
// so while one pair's logit waits on its reduction the others keep the FMA units busy.
constexpr int kChunk = 4;
// Largest group of tokens walked together.
constexpr int64_t kMaxGroup = 8;

// The defaults of the old fixed kernel: from this many tokens in one call, the visited output
// rows are prefetched during the walk (such a call touches most of the weights, so its rows have
// usually left the caches: measured ~10% faster at 4,096 tokens for 1x11, ~10% slower at 128).
constexpr int64_t kPrefetchTokens = 1024;

// Deep levels walked bucket by bucket (see run_bucketed): a subtree of 5 levels is 31 nodes,
// 186 KB of fp32 input and output rows at d=768, small enough to stay in L2 while its bucket
// is processed.
constexpr int64_t kDeepLevels = 5;

// Whether a task of `tokens` tokens is walked in two phases (run_bucketed): one tree (several
// trees would re-read x once per tree and phase), deep enough to have a subtree below the top
// levels, and enough tokens per bucket (knobs.bucket) for the deep rows to be reused.
bool use_buckets(const Problem& pb, int64_t tokens) {
  const int64_t split = pb.depth + 1 - kDeepLevels;  // top levels walked in token order
  if (pb.n_trees != 1 || split < 1 || pb.knobs.bucket <= 0) return false;
  return tokens >= pb.knobs.bucket * (int64_t{1} << split);
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

// An instruction set's entry points: run(pb, t0, t1) for tokens [t0, t1); the split walk's
// walk(pb, tree0, tree1) and cols(pb, v0, v1) for vectors of `width` columns.
struct Runs {
  RunFn run, walk, cols;
  int64_t width;
};

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

// Blocks of tokens per at::parallel_for task: at least `grain` multiply-adds per task, so that
// waking the second thread pays off.
int64_t grain_blocks(int64_t work_per_block, int64_t grain) {
  const int64_t blocks = grain / work_per_block;
  return blocks < 1 ? 1 : blocks;
}

// The knobs for a call of `tokens` tokens: the last row of `table` (R, kColumns) whose
// min_tokens is at most `tokens` (rows checked by check_knobs).
Knobs knobs_for(const at::Tensor& table, int64_t tokens) {
  const int64_t* t = table.data_ptr<int64_t>();
  const int64_t rows = table.size(0);
  int64_t r = 0;
  while (r + 1 < rows && t[(r + 1) * kColumns + kMinTokens] <= tokens) ++r;
  const int64_t* row = t + r * kColumns;
  return Knobs{row[kColGroup], row[kColTreesTogether], row[kColPrefetch], row[kColBucket],
               row[kColGrain], row[kColBlock], row[kColSort], row[kColSplit]};
}

// The fixed defaults (what the untuned ops use; tuning.py's default_row says the same): prefetch
// from kPrefetchTokens tokens; several trees: one token's trees together, and from 2 tokens
// tree-major blocks of 256 tokens walked level by level sorted by node (run_tree_sorted: 5-22%
// less CPU per token than unsorted blocks of 64 walked 8 at a time for 8x7-32x5 at d=384, AMD
// Zen 4, 1 thread, docs/native.md).
Knobs default_knobs(int64_t tokens, int64_t n_trees) {
  Knobs k;
  k.prefetch = tokens >= kPrefetchTokens ? 1 : 0;
  if (n_trees > 1 && tokens > 1) {
    k.group = 8;
    k.block = 256;
    k.sort = 1;
  }
  return k;
}

// A knobs table the kernel can use: int64 (R >= 1, kColumns), min_tokens increasing from 0 or
// 1, every knob in its range.
void check_knobs(const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.is_contiguous() && table.size(0) >= 1 && table.size(1) == kColumns,
              "fff_cpu_forward_tuned: knobs must be a contiguous (rows, ", kColumns,
              ") int64 CPU tensor");
  const int64_t* t = table.data_ptr<int64_t>();
  for (int64_t r = 0; r < table.size(0); ++r) {
    const int64_t* row = t + r * kColumns;
    TORCH_CHECK(r == 0 ? row[kMinTokens] <= 1 : row[kMinTokens] > (row - kColumns)[kMinTokens],
                "fff_cpu_forward_tuned: knob rows must start at 0 or 1 token and increase");
    const int64_t g = row[kColGroup];
    TORCH_CHECK(g == 1 || g == 2 || g == 4 || g == 8,
                "fff_cpu_forward_tuned: group must be 1, 2, 4 or 8, got ", g);
    for (const int64_t c : {kColTreesTogether, kColPrefetch, kColSort, kColSplit}) {
      TORCH_CHECK(row[c] == 0 || row[c] == 1, "fff_cpu_forward_tuned: trees_together, prefetch, "
                  "sort and split must be 0 or 1");
    }
    TORCH_CHECK(row[kColBucket] >= 0 && row[kColGrain] >= 1 && row[kColBlock] >= 0,
                "fff_cpu_forward_tuned: bucket and block must be >= 0 and grain >= 1");
  }
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

// The split walk (Knobs::split): pass 1 over the trees, pass 2 over y's columns, each an
// at::parallel_for of at least knobs.grain multiply-adds per task.
void run_split(const Runs& runs, Problem& pb, int64_t T) {
  const int64_t path = pb.depth + 1, P = pb.n_trees * path;
  std::vector<float> act(T * P);
  std::vector<int64_t> scratch(pb.nodes == nullptr ? T * P : 0);
  pb.tokens = T;
  pb.act = act.data();
  pb.path_nodes = pb.nodes != nullptr ? pb.nodes : scratch.data();
  const int64_t tree_grain = grain_blocks(T * path * pb.d, pb.knobs.grain);
  at::parallel_for(0, pb.n_trees, tree_grain, [&](int64_t a, int64_t b) { runs.walk(pb, a, b); });
  const int64_t vectors = (pb.d + runs.width - 1) / runs.width;
  const int64_t col_grain = grain_blocks(T * P * runs.width, pb.knobs.grain);
  at::parallel_for(0, vectors, col_grain, [&](int64_t a, int64_t b) { runs.cols(pb, a, b); });
}

// Fills y (and nodes when not null) for x with `knobs`; the shared body of the ops (inputs
// checked).
void run_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                 const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa,
                 const Knobs& knobs, at::Tensor& y, int64_t* nodes) {
  const int64_t T = x.size(0), d = x.size(1);
  Problem pb{x.data_ptr<float>(), w_in.data_ptr(), b_in.data_ptr<float>(),
             w_out.data_ptr(), y.data_ptr<float>(), nodes, d, n_trees, depth, knobs};
  const bool in_bf16 = w_in.scalar_type() == at::kBFloat16;
  const bool out_bf16 = w_out.scalar_type() == at::kBFloat16;
  const Runs runs = isa == kAvx512 ? avx512::pick_run(in_bf16, out_bf16)
                                   : avx2::pick_run(in_bf16, out_bf16);
  if (knobs.split && n_trees > 1 && T > 1) {
    run_split(runs, pb, T);
    return;
  }
  const RunFn run = runs.run;
  // Tasks are whole blocks of kTask tokens so that only the call's last group can be short.
  constexpr int64_t kTask = 8;
  const int64_t blocks = (T + kTask - 1) / kTask;
  const int64_t grain =
      grain_blocks(2 * kTask * n_trees * (depth + 1) * (d + 1), knobs.grain);
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
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, default_knobs(x.size(0), n_trees), y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fff_cpu_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, default_knobs(x.size(0), n_trees), y,
              nodes.data_ptr<int64_t>());
  return {y, nodes};
}

at::Tensor fff_cpu_forward_tuned(const at::Tensor& x, const at::Tensor& w_in,
                                 const at::Tensor& b_in, const at::Tensor& w_out,
                                 int64_t n_trees, int64_t depth, int64_t isa,
                                 const at::Tensor& knobs) {
  check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs(knobs);
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, knobs_for(knobs, x.size(0)), y,
              nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fff_cpu_forward_tuned_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa, const at::Tensor& knobs) {
  check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs(knobs);
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, knobs_for(knobs, x.size(0)), y,
              nodes.data_ptr<int64_t>());
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
  m.def("fff_cpu_forward_tuned(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa, Tensor knobs) -> Tensor",
        &fff_cpu_forward_tuned);
  m.def("fff_cpu_forward_tuned_nodes(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, "
        "int n_trees, int depth, int isa, Tensor knobs) -> (Tensor, Tensor)",
        &fff_cpu_forward_tuned_nodes);
  m.def("fff_cpu_isa() -> str", &isa_name);
}
