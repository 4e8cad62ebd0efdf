// Native CPU inference for the FFF layer in bfloat16 end to end (docs/precision.md).
//
//   logit_n = x . w_in[n] + b_in[n]  (fp32 sum of bf16 products);  right iff logit_n > 0
//   y = bf16( sum over visited n of GELU(logit_n) * w_out_row[n] )  (fp32 sum, rounded once)
//
// Ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT; the fp32 kernel registers its
// own beside them):
//   fff_bf16_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa) -> y
//   fff_bf16_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_bf16_isa() -> str   best path this CPU runs: "avx512bf16", "avx512", "avx2" or ""
// x (T, d), w_in and w_out_rows (K*N, d) bfloat16; b_in (K*N,) float32; y (T, d) bfloat16.
// isa 3 = AVX512-BF16 dot products (_mm512_dpbf16_ps, fp32 accumulation); 2 = AVX-512 and
// 1 = AVX2, both widening bf16 to fp32 exactly and using fp32 FMAs (the fallback; any path can
// be asked for on a CPU that has it, so tests run every path the CPU has).
//
// The paths differ only in the rounding of the logit sums (dpbf16 adds pairs of products before
// accumulating); the output pass and its rounding to bf16 (nearest even, NaN -> 0x7FC0, as
// torch's own conversion) are the same on every path.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

// One call's data as raw pointers (at::parallel_for bodies must not touch Tensors).
struct Bf16Problem {
  const uint16_t* x;      // (T, d)
  const uint16_t* w_in;   // (K*N, d)
  const float* b_in;      // (K*N,)
  const uint16_t* w_out;  // (K*N, d) output rows
  uint16_t* y;            // (T, d)
  int64_t* nodes;         // (T, K, D+1) or null
  int64_t d, n_trees, depth;
  bool prefetch_out;      // prefetch each visited output row once its node is known
};

// Tokens walked together (their independent dot products hide each level's reduction latency).
constexpr int kBf16Group = 4;
// From this many tokens a call's output rows have usually left the caches: prefetch them.
constexpr int64_t kBf16PrefetchTokens = 1024;
// Deep levels walked bucket by bucket: 31 nodes, 93 KB of bf16 rows at d=768 (fits L2).
constexpr int64_t kBf16DeepLevels = 5;
// Tokens per top-level bucket below which bucketing does not pay for its second pass.
constexpr int64_t kBf16TokensPerBucket = 8;

bool bf16_use_buckets(const Bf16Problem& pb, int64_t tokens) {
  const int64_t split = pb.depth + 1 - kBf16DeepLevels;
  if (pb.n_trees != 1 || split < 1) return false;
  return tokens >= kBf16TokensPerBucket * (int64_t{1} << split);
}

// Token indices [0, n) ordered by the level-`split` node each reached (stable counting sort).
std::vector<int64_t> bf16_bucket_order(const std::vector<int64_t>& local, int64_t split) {
  const int64_t first = (int64_t{1} << split) - 1;
  std::vector<int64_t> start((int64_t{1} << split) + 1, 0);
  for (const int64_t id : local) ++start[id - first + 1];
  for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
  std::vector<int64_t> order(local.size());
  for (size_t j = 0; j < local.size(); ++j) order[start[local[j] - first]++] = j;
  return order;
}

inline float gelu_bf16(float z) {
  return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752440f));
}

using Bf16RunFn = void (*)(const Bf16Problem&, int64_t, int64_t);

}  // namespace

#define FFF_BF16_INLINE inline __attribute__((always_inline))

// The dpbf16 path needs a compiler that knows AVX512-BF16 (target attribute, intrinsics and
// __builtin_cpu_supports("avx512bf16")): GCC 11+, clang 12+. With an older one it is left out
// (the widening paths remain), so the library, fp32 kernel included, still builds.
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define FFF_HAVE_DPBF16 1
#else
#define FFF_HAVE_DPBF16 0
#endif

// ---- AVX-512 helpers shared by the dot-product path and the widening path.
#define FFF_AVX512_COMMON                                                                     \
  using F = __m512;                                                                           \
  static constexpr int W = 16;                                                                \
  FFF_BF16_TARGET FFF_BF16_INLINE static F fzero() { return _mm512_setzero_ps(); }             \
  FFF_BF16_TARGET FFF_BF16_INLINE static F set1(float a) { return _mm512_set1_ps(a); }         \
  FFF_BF16_TARGET FFF_BF16_INLINE static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); } \
  FFF_BF16_TARGET FFF_BF16_INLINE static __mmask16 mask16(int n) {                            \
    return static_cast<__mmask16>((1u << n) - 1u);                                            \
  }                                                                                           \
  FFF_BF16_TARGET FFF_BF16_INLINE static F widen(const uint16_t* p) {                         \
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));                \
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));              \
  }                                                                                           \
  FFF_BF16_TARGET FFF_BF16_INLINE static F widen_n(const uint16_t* p, int n) {                \
    const __m256i h = _mm256_maskz_loadu_epi16(mask16(n), p);                                 \
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));              \
  }                                                                                           \
  /* fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (torch's rule). */               \
  FFF_BF16_TARGET FFF_BF16_INLINE static __m256i to_bf16(F v) {                               \
    const __m512i b = _mm512_castps_si512(v);                                                 \
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));     \
    __m512i r = _mm512_srli_epi32(                                                            \
        _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);           \
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),                      \
                              _mm512_set1_epi32(0x7FC0));                                     \
    return _mm512_cvtepi32_epi16(r);                                                          \
  }                                                                                           \
  FFF_BF16_TARGET FFF_BF16_INLINE static void store_bf16(uint16_t* p, F v) {                  \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v));                           \
  }                                                                                           \
  FFF_BF16_TARGET FFF_BF16_INLINE static void store_bf16_n(uint16_t* p, F v, int n) {         \
    _mm256_mask_storeu_epi16(p, mask16(n), to_bf16(v));                                       \
  }

#if FFF_HAVE_DPBF16
namespace bf16_dp {
#define FFF_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// 32 bf16 pairs per _mm512_dpbf16_ps: each fp32 lane adds two exact bf16 products.
struct B {
  FFF_AVX512_COMMON
  using Acc = __m512;
  static constexpr int kStep = 32;
  static constexpr int kAcc = 4;
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc zero() { return _mm512_setzero_ps(); }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot(Acc acc, const uint16_t* x, const uint16_t* w) {
    const __m512i a = _mm512_loadu_si512(x), b = _mm512_loadu_si512(w);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a),
                            reinterpret_cast<const __m512bh&>(b));
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot_n(Acc acc, const uint16_t* x, const uint16_t* w,
                                                   int n) {
    const __mmask32 m = n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
    const __m512i a = _mm512_maskz_loadu_epi16(m, x), b = _mm512_maskz_loadu_epi16(m, w);
    return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a),
                            reinterpret_cast<const __m512bh&>(b));
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static float sum(const Acc* acc) {
    __m512 s = acc[0];
    for (int a = 1; a < kAcc; ++a) s = _mm512_add_ps(s, acc[a]);
    return _mm512_reduce_add_ps(s);
  }
};

#include "fff_cpu_bf16_walk.h"
#undef FFF_BF16_TARGET
}  // namespace bf16_dp
#endif

namespace bf16_avx512 {
#define FFF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// The fallback on AVX-512: widen 16 bf16 of each operand to fp32 and FMA.
struct B {
  FFF_AVX512_COMMON
  using Acc = __m512;
  static constexpr int kStep = 16;
  static constexpr int kAcc = 4;
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc zero() { return _mm512_setzero_ps(); }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot(Acc acc, const uint16_t* x, const uint16_t* w) {
    return _mm512_fmadd_ps(widen(x), widen(w), acc);
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot_n(Acc acc, const uint16_t* x, const uint16_t* w,
                                                   int n) {
    return _mm512_fmadd_ps(widen_n(x, n), widen_n(w, n), acc);
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static float sum(const Acc* acc) {
    __m512 s = acc[0];
    for (int a = 1; a < kAcc; ++a) s = _mm512_add_ps(s, acc[a]);
    return _mm512_reduce_add_ps(s);
  }
};

#include "fff_cpu_bf16_walk.h"
#undef FFF_BF16_TARGET
}  // namespace bf16_avx512

namespace bf16_avx2 {
#define FFF_BF16_TARGET __attribute__((target("avx2,fma")))

// The fallback on AVX2: 8 lanes; tails through a zeroed stack buffer (no 16-bit masked loads).
struct B {
  using F = __m256;
  using Acc = __m256;
  static constexpr int W = 8;
  static constexpr int kStep = 8;
  static constexpr int kAcc = 2;
  FFF_BF16_TARGET FFF_BF16_INLINE static F fzero() { return _mm256_setzero_ps(); }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc zero() { return _mm256_setzero_ps(); }
  FFF_BF16_TARGET FFF_BF16_INLINE static F set1(float a) { return _mm256_set1_ps(a); }
  FFF_BF16_TARGET FFF_BF16_INLINE static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  FFF_BF16_TARGET FFF_BF16_INLINE static F widen(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static F widen_n(const uint16_t* p, int n) {
    uint16_t buf[W] = {};
    std::memcpy(buf, p, n * sizeof(uint16_t));
    return widen(buf);
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot(Acc acc, const uint16_t* x, const uint16_t* w) {
    return _mm256_fmadd_ps(widen(x), widen(w), acc);
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static Acc dot_n(Acc acc, const uint16_t* x, const uint16_t* w,
                                                   int n) {
    return _mm256_fmadd_ps(widen_n(x, n), widen_n(w, n), acc);
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static float sum(const Acc* acc) {
    __m256 v = acc[0];
    for (int a = 1; a < kAcc; ++a) v = _mm256_add_ps(v, acc[a]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // fp32 -> bf16 bits as on AVX-512 (nearest even, NaN -> 0x7FC0).
  FFF_BF16_TARGET FFF_BF16_INLINE static __m128i to_bf16(F v) {
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
  FFF_BF16_TARGET FFF_BF16_INLINE static void store_bf16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v));
  }
  FFF_BF16_TARGET FFF_BF16_INLINE static void store_bf16_n(uint16_t* p, F v, int n) {
    uint16_t buf[W];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), to_bf16(v));
    std::memcpy(p, buf, n * sizeof(uint16_t));
  }
};

#include "fff_cpu_bf16_walk.h"
#undef FFF_BF16_TARGET
}  // namespace bf16_avx2

namespace {

enum Bf16Isa : int64_t { kBf16None = 0, kBf16Avx2 = 1, kBf16Avx512 = 2, kBf16Dot = 3 };

Bf16Isa bf16_best_isa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl");
#if FFF_HAVE_DPBF16
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return kBf16Dot;
#endif
  if (avx512) return kBf16Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kBf16Avx2;
  return kBf16None;
}

std::string bf16_isa_name() {
  switch (bf16_best_isa()) {
    case kBf16Dot: return "avx512bf16";
    case kBf16Avx512: return "avx512";
    case kBf16Avx2: return "avx2";
    default: return "";
  }
}

void bf16_check_inputs(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                       const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa) {
  TORCH_CHECK(isa >= kBf16Avx2 && isa <= kBf16Dot, "fff_bf16_forward: isa must be 1 (avx2), "
              "2 (avx512) or 3 (avx512bf16), got ", isa);
  TORCH_CHECK(isa <= bf16_best_isa(), "fff_bf16_forward: this CPU does not support the "
              "requested path ", isa, " (best: ", bf16_isa_name(), ")");
  TORCH_CHECK(n_trees >= 1 && depth >= 0 && depth <= 40, "fff_bf16_forward: bad tree shape ",
              n_trees, "x", depth);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
                  x.is_contiguous(),
              "fff_bf16_forward: x must be a contiguous 2-D bfloat16 CPU tensor");
  const int64_t rows = n_trees * ((int64_t{2} << depth) - 1);
  for (const at::Tensor* w : {&w_in, &w_out}) {
    TORCH_CHECK(w->device().is_cpu() && w->is_contiguous() && w->dim() == 2 &&
                    w->size(0) == rows && w->size(1) == x.size(1) &&
                    w->scalar_type() == at::kBFloat16,
                "fff_bf16_forward: weights must be contiguous (", rows, ", ", x.size(1),
                ") bfloat16 CPU tensors");
  }
  TORCH_CHECK(b_in.device().is_cpu() && b_in.scalar_type() == at::kFloat &&
                  b_in.is_contiguous() && b_in.dim() == 1 && b_in.size(0) == rows,
              "fff_bf16_forward: b_in must be a contiguous (", rows, ",) float32 CPU tensor");
}

Bf16RunFn bf16_pick_run(int64_t isa) {
#if FFF_HAVE_DPBF16
  if (isa == kBf16Dot) return &bf16_dp::run_tokens;
#endif
  if (isa == kBf16Avx512) return &bf16_avx512::run_tokens;
  return &bf16_avx2::run_tokens;
}

// Fills y (and nodes when not null); threads from torch's pool when the call is big enough.
void bf16_run_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                      const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa,
                      at::Tensor& y, int64_t* nodes) {
  const int64_t T = x.size(0), d = x.size(1);
  const Bf16Problem pb{static_cast<const uint16_t*>(x.data_ptr()),
                       static_cast<const uint16_t*>(w_in.data_ptr()), b_in.data_ptr<float>(),
                       static_cast<const uint16_t*>(w_out.data_ptr()),
                       static_cast<uint16_t*>(y.data_ptr()), nodes, d, n_trees, depth,
                       T >= kBf16PrefetchTokens};
  const Bf16RunFn run = bf16_pick_run(isa);
  constexpr int64_t kTask = 8;  // tokens per block: only the call's last group can be short
  const int64_t blocks = (T + kTask - 1) / kTask;
  const int64_t work = 2 * kTask * n_trees * (depth + 1) * (d + 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / work);
  if (blocks < 2 * grain) {  // too little for two threads: no parallel region at all
    run(pb, 0, T);
    return;
  }
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    run(pb, b0 * kTask, std::min(b1 * kTask, T));
  });
}

at::Tensor fff_bf16_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                            const at::Tensor& w_out, int64_t n_trees, int64_t depth,
                            int64_t isa) {
  bf16_check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  at::Tensor y = at::Tensor(at::detail::empty_cpu(x.sizes(), at::kBFloat16));
  bf16_run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> fff_bf16_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  bf16_check_inputs(x, w_in, b_in, w_out, n_trees, depth, isa);
  at::Tensor y = at::Tensor(at::detail::empty_cpu(x.sizes(), at::kBFloat16));
  at::Tensor nodes = at::Tensor(at::detail::empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong));
  bf16_run_forward(x, w_in, b_in, w_out, n_trees, depth, isa, y, nodes.data_ptr<int64_t>());
  return {y, nodes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_bf16_forward(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa) -> Tensor",
        &fff_bf16_forward);
  m.def("fff_bf16_forward_nodes(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, "
        "int n_trees, int depth, int isa) -> (Tensor, Tensor)",
        &fff_bf16_forward_nodes);
  m.def("fff_bf16_isa() -> str", &bf16_isa_name);
}
