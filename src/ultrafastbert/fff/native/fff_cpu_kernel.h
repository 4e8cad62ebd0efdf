// The native FFF kernel's shared parts (docs/design.md §1.1), included by the .cpp files that
// register ops (fff_cpu.cpp: fp32; fff_cpu_bf16.cpp: bf16 end to end; fff_cpu_int8.cpp: int8
// weights with fp32 activations):
//
//   logit_n = x . w_in[n] + b_in[n];  go right iff logit_n > 0 (exact 0 and NaN go left)
//   y = sum over trees, sum over visited n of GELU(logit_n) * w_out_row[n]   (exact erf GELU)
//
// - what a call is (Problem) and how it is walked (Knobs, chosen by the autotuner in Python, see
//   fff/native/tuning.py; never changes a result);
// - the one walk (fff_cpu_walk.h), compiled for AVX-512 (F, BW, VL), for AVX2 + FMA and, with a
//   compiler that knows it, for AVX512-BF16 (bf16 x bf16 dot products with _mm512_dpbf16_ps),
//   with per-function target attributes; the CPU is checked at run time;
// - the checks of an op's arguments and the threaded driver (run_problem): threads come from
//   torch's own pool (at::parallel_for), never a second runtime: two spinning thread pools in
//   one process stall each other on a 2-core machine.
//
// Everything is in an unnamed namespace: each .cpp gets its own copy and instantiates only the
// walks it registers. Headers are kept to the few needed so that the first-use build stays short.
#pragma once

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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The AVX512-BF16 path needs a compiler that knows it (target attribute, intrinsics and
// __builtin_cpu_supports("avx512bf16")): GCC 11+, clang 12+. With an older one it is left out
// (the widening paths remain), so the library still builds.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define FFF_HAVE_DPBF16 1
#else
#define FFF_HAVE_DPBF16 0
#endif

// The AVX512-VNNI path of the int8 ops (_mm512_dpbusd_epi32): GCC 9+, clang 9+.
#if (defined(__clang__) && __clang_major__ >= 9) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 9)
#define FFF_HAVE_VNNI 1
#else
#define FFF_HAVE_VNNI 0
#endif

#define FFF_INLINE inline __attribute__((always_inline))

namespace {

// bf16 values travel as their 16-bit patterns (the top half of an fp32).
using bf16_bits = uint16_t;

// The element types of a walk: X of x and y, In of the routing rows, Out of the output rows.
// XIn: what the walk reads x as (X, or for the VNNI int8 path uint8 quantized tokens, see
// fff_cpu_int8.cpp).
template <class X_, class In_, class Out_, class XIn_ = X_>
struct Elems {
  using X = X_;
  using In = In_;
  using Out = Out_;
  using XIn = XIn_;
};

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

// Columns of one row of the knobs table the tuned ops take: the row applies from min_tokens
// tokens per call (rows in increasing min_tokens; the first row's must be 0 or 1).
enum KnobColumn : int64_t {
  kMinTokens = 0, kColGroup, kColTreesTogether, kColPrefetch, kColBucket, kColGrain, kColBlock,
  kColSort, kColSplit, kColumns
};

// One call's data, as raw pointers (at::parallel_for bodies must not touch Tensors).
struct Problem {
  const void* x;       // (T, d) float or bf16 bits
  const void* w_in;    // (K*N, d) float or bf16 bits
  const float* b_in;   // (K*N,)
  const void* w_out;   // (K*N, d) output rows, float or bf16 bits
  void* y;             // (T, d), x's type
  int64_t* nodes;      // (T, K, D+1) or null
  int64_t d, n_trees, depth;
  Knobs knobs;
  int64_t tokens = 0;           // T (the split walk)
  float* act = nullptr;         // (T, K*(D+1)) activations (the split walk)
  int64_t* path_nodes = nullptr;  // (T, K*(D+1)) node ids (the split walk)
  const float* s_in = nullptr;    // (K*N,) int8 routing rows: each row's scale (else unused)
  const float* s_out = nullptr;   // (K*N,) int8 output rows: each row's scale (else unused)
  const float* c_in = nullptr;    // (K*N,) VNNI path: 128 * each int8 routing row's sum
  int64_t x_stride = 0;           // elements of E::XIn from one token's x to the next's (d,
                                  // or the VNNI path's quantized rows)
};

// (token, row) dot products computed together in one dot_group: their chains are independent,
// so while one pair's logit waits on its reduction the others keep the FMA units busy.
constexpr int kChunk = 4;
// Largest group of tokens walked together.
constexpr int64_t kMaxGroup = 8;

// The fixed defaults: from this many tokens in one call, the visited output rows are prefetched
// during the walk (such a call touches most of the weights, so its rows have usually left the
// caches: measured ~10% faster at 4,096 tokens for 1x11, ~10% slower at 128).
constexpr int64_t kPrefetchTokens = 1024;

// Deep levels walked bucket by bucket (see run_bucketed): a subtree of 5 levels is 31 nodes,
// 186 KB of fp32 input and output rows at d=768 (93 KB in bf16), small enough to stay in L2
// while its bucket is processed.
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

// The fixed defaults of the fp32 and int8-weight ops (what their untuned ops use; tuning.py's
// default_row says the same): prefetch from kPrefetchTokens tokens; several trees: one token's
// trees together, and from 2 tokens tree-major blocks of 256 tokens walked level by level sorted
// by node, without prefetch (run_tree_sorted: 5-22% less CPU per token than unsorted blocks of
// 64 walked 8 at a time for 8x7-32x5 at d=384, AMD Zen 4, 1 thread, docs/native.md).
Knobs default_knobs(int64_t tokens, int64_t n_trees) {
  Knobs k;
  k.prefetch = tokens >= kPrefetchTokens ? 1 : 0;
  if (n_trees > 1 && tokens > 1) {
    k.group = 8;
    k.block = 256;
    k.sort = 1;
    // Sorted tokens share their output rows while those are in L1: prefetching every pair's
    // row is wasted work (8x7 and 32x5 at d=384, 4,096 tokens: 12-22% slower with it).
    k.prefetch = 0;
  }
  return k;
}

using RunFn = void (*)(const Problem&, int64_t, int64_t);

// An instruction set's entry points for one set of element types: run(pb, t0, t1) for tokens
// [t0, t1); the split walk's walk(pb, tree0, tree1) and cols(pb, v0, v1) for vectors of `width`
// columns.
struct Runs {
  RunFn run, walk, cols;
  int64_t width;
};

// Exact (erf) GELU on a scalar: only K*(D+1) of these per token, so no vector erf is needed.
inline float gelu(float z) { return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752440f)); }

// ---------------------------------------------------------------- the walk per instruction set

namespace avx512 {
#define FFF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// 16 floats per vector. bf16 loads widen the 16-bit patterns to fp32 (bf16 is the top half);
// bf16 stores round to nearest even (NaN -> 0x7FC0, as torch's own conversion).
struct V {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int kAcc = 4;  // accumulators per dot product (32 registers to spare)
  FFF_TARGET FFF_INLINE static R zero() { return _mm512_setzero_ps(); }
  FFF_TARGET FFF_INLINE static R set1(float a) { return _mm512_set1_ps(a); }
  FFF_TARGET FFF_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
  FFF_TARGET FFF_INLINE static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  FFF_TARGET FFF_INLINE static float sum(R a) { return _mm512_reduce_add_ps(a); }
  // For the vector GELU (fff_cpu_walk.h, gelu_vec).
  FFF_TARGET FFF_INLINE static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  FFF_TARGET FFF_INLINE static R div(R a, R b) { return _mm512_div_ps(a, b); }
  FFF_TARGET FFF_INLINE static R abs(R a) { return _mm512_abs_ps(a); }
  FFF_TARGET FFF_INLINE static R round(R a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // p * 2^n for integral n in [-126, 127].
  FFF_TARGET FFF_INLINE static R scale2(R p, R n) { return _mm512_scalef_ps(p, n); }
  // a < b ? x : y, lane by lane (false for NaN).
  FFF_TARGET FFF_INLINE static R select_lt(R a, R b, R x, R y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  FFF_TARGET FFF_INLINE static R load(const float* p) { return _mm512_loadu_ps(p); }
  FFF_TARGET FFF_INLINE static R load(const bf16_bits* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // int8 weights (fff_cpu_int8.cpp): sign-extended to int32, then converted (exact).
  FFF_TARGET FFF_INLINE static R load(const int8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  FFF_TARGET FFF_INLINE static __mmask16 mask(int n) {
    return static_cast<__mmask16>((1u << n) - 1u);
  }
  // The first n (< or = W) elements, zeros after; never reads past p + n.
  FFF_TARGET FFF_INLINE static R load_n(const float* p, int n) {
    return _mm512_maskz_loadu_ps(mask(n), p);
  }
  FFF_TARGET FFF_INLINE static R load_n(const bf16_bits* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  FFF_TARGET FFF_INLINE static R load_n(const int8_t* p, int n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask(n), p)));
  }
  FFF_TARGET FFF_INLINE static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  FFF_TARGET FFF_INLINE static void store_n(float* p, R a, int n) {
    _mm512_mask_storeu_ps(p, mask(n), a);
  }
  // fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0.
  FFF_TARGET FFF_INLINE static __m256i to_bf16(R v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  FFF_TARGET FFF_INLINE static void store(bf16_bits* p, R a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(a));
  }
  FFF_TARGET FFF_INLINE static void store_n(bf16_bits* p, R a, int n) {
    _mm256_mask_storeu_epi16(p, mask(n), to_bf16(a));
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
  // For the vector GELU (fff_cpu_walk.h, gelu_vec).
  FFF_TARGET FFF_INLINE static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  FFF_TARGET FFF_INLINE static R div(R a, R b) { return _mm256_div_ps(a, b); }
  FFF_TARGET FFF_INLINE static R abs(R a) {
    return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
  }
  FFF_TARGET FFF_INLINE static R round(R a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // p * 2^n for integral n in [-126, 127] and p in [0.5, 2] (the exponent field is added to).
  FFF_TARGET FFF_INLINE static R scale2(R p, R n) {
    const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  }
  FFF_TARGET FFF_INLINE static R select_lt(R a, R b, R x, R y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  FFF_TARGET FFF_INLINE static float sum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  FFF_TARGET FFF_INLINE static R load(const float* p) { return _mm256_loadu_ps(p); }
  FFF_TARGET FFF_INLINE static R load(const bf16_bits* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  FFF_TARGET FFF_INLINE static R load(const int8_t* p) {  // int8 weights, exact
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
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
  // fp32 -> bf16 bits as on AVX-512 (nearest even, NaN -> 0x7FC0).
  FFF_TARGET FFF_INLINE static __m128i to_bf16(R v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // Values are <= 0xFFFF, so the unsigned-saturating pack is exact; it packs per 128-bit lane.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
  FFF_TARGET FFF_INLINE static void store(bf16_bits* p, R a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(a));
  }
  FFF_TARGET FFF_INLINE static void store_n(bf16_bits* p, R a, int n) {
    bf16_bits buf[W];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), to_bf16(a));
    std::memcpy(p, buf, n * sizeof(bf16_bits));
  }
};

#include "fff_cpu_walk.h"
#undef FFF_TARGET
}  // namespace avx2

#if FFF_HAVE_DPBF16
namespace avx512bf16 {
#define FFF_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// AVX-512's vector operations (their target is a subset of this one's, so they inline here).
using V = avx512::V;

#include "fff_cpu_walk.h"

// bf16 x bf16 dot products with _mm512_dpbf16_ps: 32 pairs per step, each fp32 lane adding two
// exact bf16 products (so the sums round differently from the widening path's). Declared before
// any walk is instantiated (the .cpp that registers the ops does that).
template <>
struct Dot<bf16_bits, bf16_bits> {
  using RX = __m512i;
  using RW = __m512i;
  static constexpr int kStep = 32;
  FFF_TARGET FFF_INLINE static __mmask32 mask(int n) {
    return n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
  }
  FFF_TARGET FFF_INLINE static RX load_x(const bf16_bits* p) { return _mm512_loadu_si512(p); }
  FFF_TARGET FFF_INLINE static RX load_x_n(const bf16_bits* p, int n) {
    return _mm512_maskz_loadu_epi16(mask(n), p);
  }
  FFF_TARGET FFF_INLINE static RW load_w(const bf16_bits* p) { return _mm512_loadu_si512(p); }
  FFF_TARGET FFF_INLINE static RW load_w_n(const bf16_bits* p, int n) {
    return _mm512_maskz_loadu_epi16(mask(n), p);
  }
  using Acc = V::R;
  FFF_TARGET FFF_INLINE static Acc madd(Acc acc, RX x, RW w) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(x),
                            reinterpret_cast<const __m512bh&>(w));
  }
  FFF_TARGET FFF_INLINE static Acc zero() { return V::zero(); }
  FFF_TARGET FFF_INLINE static Acc add(Acc a, Acc b) { return V::add(a, b); }
  FFF_TARGET FFF_INLINE static float sum(Acc a) { return V::sum(a); }
};

#undef FFF_TARGET
}  // namespace avx512bf16
#endif

#if FFF_HAVE_VNNI
namespace avx512vnni {
#define FFF_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

using V = avx512::V;

#include "fff_cpu_walk.h"

// Quantized tokens (uint8: q + 128, see quantize_tokens) x int8 rows with _mm512_dpbusd_epi32:
// 64 pairs per step, four products summed per int32 lane, all exact (|sum| < 2^31); the
// reduction is exact too, and the float result is exact while |sum| < 2^24. Declared before any
// walk is instantiated (fff_cpu_int8.cpp does that).
template <>
struct Dot<uint8_t, int8_t> {
  using RX = __m512i;
  using RW = __m512i;
  using Acc = __m512i;
  static constexpr int kStep = 64;
  FFF_TARGET FFF_INLINE static __mmask64 mask(int n) {
    return n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1;
  }
  FFF_TARGET FFF_INLINE static RX load_x(const uint8_t* p) { return _mm512_loadu_si512(p); }
  FFF_TARGET FFF_INLINE static RX load_x_n(const uint8_t* p, int n) {
    return _mm512_maskz_loadu_epi8(mask(n), p);
  }
  FFF_TARGET FFF_INLINE static RW load_w(const int8_t* p) { return _mm512_loadu_si512(p); }
  FFF_TARGET FFF_INLINE static RW load_w_n(const int8_t* p, int n) {
    return _mm512_maskz_loadu_epi8(mask(n), p);
  }
  FFF_TARGET FFF_INLINE static Acc madd(Acc acc, RX x, RW w) {
    return _mm512_dpbusd_epi32(acc, x, w);
  }
  FFF_TARGET FFF_INLINE static Acc zero() { return _mm512_setzero_si512(); }
  FFF_TARGET FFF_INLINE static Acc add(Acc a, Acc b) { return _mm512_add_epi32(a, b); }
  FFF_TARGET FFF_INLINE static float sum(Acc a) {
    return static_cast<float>(_mm512_reduce_add_epi32(a));
  }
};

// Tokens [t0, t1) of x (T, d) fp32 -> rows of `stride` bytes at out: q + 128 as uint8, q =
// x * (127 / max|x|) rounded to nearest even and clamped to [-127, 127] (0 for an all-zero
// token), zeros up to the last 4 bytes, which hold the token's scale max|x| / 127 as a float
// (NaN when the token has a NaN: its logits are then NaN, so it routes left and gives NaN).
FFF_TARGET static void quantize_tokens(const float* x, int64_t t0, int64_t t1, int64_t d,
                                       int64_t stride, uint8_t* out) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i shift = _mm512_set1_epi32(128);
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = x + t * d;
    uint8_t* q = out + t * stride;
    __m512 m = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = 0; k < d; k += 16) {
      const int n = d - k < 16 ? static_cast<int>(d - k) : 16;
      const __m512 v = V::load_n(row + k, n);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, _mm512_abs_ps(v));
    }
    const float mx = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(mx > 0.0f ? 127.0f / mx : 0.0f);
    for (int64_t k = 0; k < d; k += 16) {
      const int n = d - k < 16 ? static_cast<int>(d - k) : 16;
      __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(V::load_n(row + k, n), inv));
      i = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(i, lo), hi), shift);
      _mm_mask_storeu_epi8(q + k, static_cast<__mmask16>(V::mask(n)), _mm512_cvtepi32_epi8(i));
    }
    std::memset(q + d, 0, stride - d - sizeof(float));
    const float sx = nan ? std::numeric_limits<float>::quiet_NaN() : mx / 127.0f;
    std::memcpy(q + stride - sizeof(float), &sx, sizeof(float));
  }
}

#undef FFF_TARGET
}  // namespace avx512vnni
#endif

// ------------------------------------------------------------------------ the ops' shared parts

// Instruction sets, as the ops' `isa` argument numbers them.
enum Isa : int64_t { kNone = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The best instruction set this CPU runs (kAvx512Bf16 only where the library has that path).
Isa best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
#if FFF_HAVE_DPBF16
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return kAvx512Bf16;
#endif
  if (avx512) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kNone;
}

// What one op accepts, for check_inputs and its messages.
struct OpSpec {
  const char* name;          // the op, e.g. "fff_cpu_forward"
  at::ScalarType act;        // dtype of x (and y)
  bool fp32_weights;         // weights may be float32 as well as bfloat16
  int64_t max_isa;           // largest `isa` the op knows
  const char* isa_choices;   // the allowed values in words
  bool int8_weights = false;  // weights are int8 (then nothing else), with row scales
};

// Every argument of a call, checked before anything is allocated or read.
void check_inputs(const OpSpec& op, const at::Tensor& x, const at::Tensor& w_in,
                  const at::Tensor& b_in, const at::Tensor& w_out, int64_t n_trees,
                  int64_t depth, int64_t isa) {
  TORCH_CHECK(isa >= kAvx2 && isa <= op.max_isa, op.name, ": isa must be ", op.isa_choices,
              ", got ", isa);
  TORCH_CHECK(isa <= best_isa(), op.name, ": this CPU does not support the requested "
              "instruction set ", isa, " (best: ", static_cast<int64_t>(best_isa()), ")");
  TORCH_CHECK(n_trees >= 1 && depth >= 0 && depth <= 40, op.name, ": bad tree shape ", n_trees,
              "x", depth);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == op.act && x.dim() == 2 &&
                  x.is_contiguous(),
              op.name, ": x must be a contiguous 2-D ", c10::toString(op.act), " CPU tensor");
  const int64_t rows = n_trees * ((int64_t{2} << depth) - 1);
  for (const at::Tensor* w : {&w_in, &w_out}) {
    const bool dtype_ok = op.int8_weights ? w->scalar_type() == at::kChar
                                          : w->scalar_type() == at::kBFloat16 ||
                                                (op.fp32_weights && w->scalar_type() == at::kFloat);
    TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() && w->dim() == 2 &&
                    w->size(0) == rows && w->size(1) == x.size(1) && dtype_ok,
                op.name, ": weights must be contiguous (", rows, ", ", x.size(1), ") ",
                op.int8_weights ? "int8" : op.fp32_weights ? "float32/bfloat16" : "bfloat16",
                " CPU tensors");
  }
  TORCH_CHECK(b_in.device().is_cpu() && b_in.scalar_type() == at::kFloat &&
                  b_in.is_contiguous() && b_in.dim() == 1 && b_in.size(0) == rows,
              op.name, ": b_in must be a contiguous (", rows, ",) float32 CPU tensor");
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

// A knobs table the kernel can use: int64 (R >= 1, kColumns), min_tokens increasing from 0 or
// 1, every knob in its range.
void check_knobs(const char* op, const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.is_contiguous() && table.size(0) >= 1 && table.size(1) == kColumns,
              op, ": knobs must be a contiguous (rows, ", kColumns, ") int64 CPU tensor");
  const int64_t* t = table.data_ptr<int64_t>();
  for (int64_t r = 0; r < table.size(0); ++r) {
    const int64_t* row = t + r * kColumns;
    TORCH_CHECK(r == 0 ? row[kMinTokens] <= 1 : row[kMinTokens] > (row - kColumns)[kMinTokens],
                op, ": knob rows must start at 0 or 1 token and increase");
    const int64_t g = row[kColGroup];
    TORCH_CHECK(g == 1 || g == 2 || g == 4 || g == 8, op, ": group must be 1, 2, 4 or 8, got ",
                g);
    for (const int64_t c : {kColTreesTogether, kColPrefetch, kColSort, kColSplit}) {
      TORCH_CHECK(row[c] == 0 || row[c] == 1, op, ": trees_together, prefetch, sort and split "
                  "must be 0 or 1");
    }
    TORCH_CHECK(row[kColBucket] >= 0 && row[kColGrain] >= 1 && row[kColBlock] >= 0,
                op, ": bucket and block must be >= 0 and grain >= 1");
  }
}

// Outputs of at least this size go on 2 MB transparent huge pages (Linux; where THP is off the
// advice is ignored and the memory is ordinary). An output above glibc's mmap threshold (32 MB:
// 16,384 tokens at d=768 in fp32) is a fresh mapping on every call, and on this VM its ~12,000
// 4 KB page faults cost more than the kernel itself (measured: 4.5 -> 2.3 us/token of CPU at
// 16,384 tokens). The packed weights gain nothing measurable from huge pages, so they stay
// ordinary.
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

// The call's data for the walk (arguments checked).
Problem make_problem(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                     const at::Tensor& w_out, int64_t n_trees, int64_t depth,
                     const Knobs& knobs, at::Tensor& y, int64_t* nodes) {
  Problem pb{x.data_ptr(), w_in.data_ptr(), b_in.data_ptr<float>(), w_out.data_ptr(),
             y.data_ptr(), nodes, x.size(1), n_trees, depth, knobs};
  pb.x_stride = x.size(1);
  return pb;
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

// Fills y (and nodes when not null) for the T tokens of `pb` with `runs`: the split walk, or
// blocks of tokens on torch's threads when the call is big enough for two.
void run_problem(const Runs& runs, Problem& pb, int64_t T) {
  if (pb.knobs.split && pb.n_trees > 1 && T > 1) {
    run_split(runs, pb, T);
    return;
  }
  const RunFn run = runs.run;
  // Tasks are whole blocks of kTask tokens so that only the call's last group can be short.
  constexpr int64_t kTask = 8;
  const int64_t blocks = (T + kTask - 1) / kTask;
  const int64_t grain =
      grain_blocks(2 * kTask * pb.n_trees * (pb.depth + 1) * (pb.d + 1), pb.knobs.grain);
  if (blocks < 2 * grain) {  // too little for two threads: no parallel region at all (at::
    run(pb, 0, T);            // parallel_for would still start the OpenMP team: ~1 us)
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run(pb, b0 * kTask, std::min(b1 * kTask, T));
  });
}

}  // namespace
