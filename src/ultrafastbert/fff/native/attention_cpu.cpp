// Self-attention of packed texts on the CPU, for the short texts of an embedding server
// (infer/native_attention.py says when it is used; docs/precision.md, "Attention").
//
//   packed_attention_cpu(qkv, starts, lengths, n_heads, layout, isa) -> out
//     qkv      (T, 3d) float32, row-major: the T real tokens of N texts, text n at rows
//              starts[n] .. starts[n] + lengths[n] (no padding anywhere)
//     starts, lengths (N,) int64
//     layout   0: each row [q | k | v], each d = H * hd wide (Hugging Face BERT);
//              1: each row [head][q, k, v][hd] (the project's encoder)
//     out      (T, d) float32: for every text n, head h and query i of text n,
//              softmax_j(q_i . k_j / sqrt(hd)) v_j over the keys j of text n only.
//
// Why: PyTorch's CPU attention pads a batch to its widest text and, at sentence widths (10-50
// tokens), spends most of its time on per-call overhead, padding and layout copies rather than
// arithmetic. Here each (text, head) is one task over its own tokens, straight from the packed
// rows: O(l^2 hd) work for a text of l tokens, nothing for padding.
//
// Arithmetic is float32 throughout (as the flash kernel accumulates). exp is a vector
// polynomial (Cody-Waite range reduction, degree-7 Taylor on |f| <= ln2/2; relative error a few
// ulp), so results differ from a float64 reference by ~1e-6 relative, not bit for bit.
// One walk (attention_cpu_walk.h) over a small set of vector ops, compiled for AVX-512 (F, BW, VL)
// and for AVX2 + FMA with per-function target attributes; `isa` picks one (2 = AVX-512,
// 1 = AVX2; the CPU is checked). CPUs with neither keep PyTorch's attention.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#define ATTN_INLINE inline __attribute__((always_inline))

namespace {

// Where a head's q, k and v start within a qkv row, and its output within an out row.
struct HeadOffsets {
  int64_t q, k, v, out;
};

HeadOffsets offsets_of(int64_t h, int64_t hd, int64_t d, int64_t layout) {
  if (layout == 0) return {h * hd, d + h * hd, 2 * d + h * hd, h * hd};
  return {h * 3 * hd, h * 3 * hd + hd, h * 3 * hd + 2 * hd, h * hd};
}

// One call's data as raw pointers (at::parallel_for bodies must not touch Tensors); T is float,
// or uint16_t for bf16 values (their 16-bit patterns).
template <class T>
struct CallOf {
  const T* qkv;
  T* out;
  const int64_t* starts;
  const int64_t* lengths;
  int64_t n_texts, n_heads, hd, d, layout;
};
using Call = CallOf<float>;

// Scratch for one (text, head): keys transposed (hd x lpad, zero past l) and the rows of
// probabilities of a block of queries (queries x lpad).
struct Scratch {
  std::vector<float> keys_t, probs;
  void reserve(int64_t hd, int64_t lpad, int64_t queries) {
    if (static_cast<int64_t>(keys_t.size()) < hd * lpad) keys_t.assign(hd * lpad, 0.0f);
    if (static_cast<int64_t>(probs.size()) < queries * lpad) probs.assign(queries * lpad, 0.0f);
  }
};

// kt[c * lpad + j] = k_j[c] for the l keys (rows `stride` apart), zero for l <= j < lpad.
void transpose_keys(const float* k, int64_t stride, int64_t l, int64_t lpad, int64_t hd,
                    float* kt) {
  for (int64_t j = 0; j < l; ++j)
    for (int64_t c = 0; c < hd; ++c) kt[c * lpad + j] = k[j * stride + c];
  for (int64_t c = 0; c < hd; ++c) std::fill(kt + c * lpad + l, kt + c * lpad + lpad, 0.0f);
}

// Queries are taken NQ at a time so that every key / value load feeds NQ independent FMA
// chains (one chain per query would wait on the FMA latency).
constexpr int kQueries = 4;

// exp's constants: x = n ln2 + f (ln2 in two parts, so f keeps its low bits), then exp(f) as a
// degree-7 Taylor polynomial on |f| <= ln2/2 (truncation ~5e-9 relative), then times 2^n.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpFloor = -87.0f;  // exp(-87) ~ 1.6e-38 keeps 2^n a normal float
constexpr float kTaylor[8] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                              1.0f / 6.0f,    0.5f,          1.0f,          1.0f};

namespace avx512 {
#define ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

struct V {
  using R = __m512;
  static constexpr int W = 16;
  ATTN_TARGET ATTN_INLINE static R zero() { return _mm512_setzero_ps(); }
  ATTN_TARGET ATTN_INLINE static R set1(float a) { return _mm512_set1_ps(a); }
  ATTN_TARGET ATTN_INLINE static R load(const float* p) { return _mm512_loadu_ps(p); }
  ATTN_TARGET ATTN_INLINE static __mmask16 mask(int n) {
    return n >= W ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
  }
  // The first n (<= W) floats, zeros after; never reads past p + n.
  ATTN_TARGET ATTN_INLINE static R load_n(const float* p, int n) {
    return _mm512_maskz_loadu_ps(mask(n), p);
  }
  ATTN_TARGET ATTN_INLINE static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  ATTN_TARGET ATTN_INLINE static void store_n(float* p, R a, int n) {
    _mm512_mask_storeu_ps(p, mask(n), a);
  }
  ATTN_TARGET ATTN_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R max(R a, R b) { return _mm512_max_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  // a's first n lanes, `fill` in the others.
  ATTN_TARGET ATTN_INLINE static R first_or(R a, int n, float fill) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(fill), mask(n), a);
  }
  ATTN_TARGET ATTN_INLINE static float reduce_add(R a) { return _mm512_reduce_add_ps(a); }
  ATTN_TARGET ATTN_INLINE static float reduce_max(R a) { return _mm512_reduce_max_ps(a); }
  // exp(x) for x <= 0 (a softmax after subtracting the row maximum).
  ATTN_TARGET ATTN_INLINE static R exp_nonpositive(R x) {
    x = _mm512_max_ps(x, set1(kExpFloor));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm512_fnmadd_ps(n, set1(kLn2Lo), _mm512_fnmadd_ps(n, set1(kLn2Hi), x));
    R p = set1(kTaylor[0]);
    for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, set1(kTaylor[i]));
    return _mm512_scalef_ps(p, n);
  }
};

#include "attention_cpu_walk.h"
#undef ATTN_TARGET
}  // namespace avx512

namespace avx2 {
#define ATTN_TARGET __attribute__((target("avx2,fma")))

// -1 (lane on) for the first 8 entries, 0 after: the mask of the first n lanes starts at 8 - n.
alignas(64) const int32_t kLaneMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                           0,  0,  0,  0,  0,  0,  0,  0};

struct V {
  using R = __m256;
  static constexpr int W = 8;
  ATTN_TARGET ATTN_INLINE static R zero() { return _mm256_setzero_ps(); }
  ATTN_TARGET ATTN_INLINE static R set1(float a) { return _mm256_set1_ps(a); }
  ATTN_TARGET ATTN_INLINE static R load(const float* p) { return _mm256_loadu_ps(p); }
  ATTN_TARGET ATTN_INLINE static __m256i mask(int n) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + 8 - std::min(n, W)));
  }
  // Masked lanes are neither read nor written (vmaskmov does not fault on them).
  ATTN_TARGET ATTN_INLINE static R load_n(const float* p, int n) {
    return _mm256_maskload_ps(p, mask(n));
  }
  ATTN_TARGET ATTN_INLINE static void store(float* p, R a) { _mm256_storeu_ps(p, a); }
  ATTN_TARGET ATTN_INLINE static void store_n(float* p, R a, int n) {
    _mm256_maskstore_ps(p, mask(n), a);
  }
  ATTN_TARGET ATTN_INLINE static R add(R a, R b) { return _mm256_add_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R max(R a, R b) { return _mm256_max_ps(a, b); }
  ATTN_TARGET ATTN_INLINE static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  ATTN_TARGET ATTN_INLINE static R first_or(R a, int n, float fill) {
    return _mm256_blendv_ps(_mm256_set1_ps(fill), a, _mm256_castsi256_ps(mask(n)));
  }
  ATTN_TARGET ATTN_INLINE static float reduce_add(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  ATTN_TARGET ATTN_INLINE static float reduce_max(R a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // exp(x) for x <= 0; 2^n built in the exponent bits (n >= -126 after the floor).
  ATTN_TARGET ATTN_INLINE static R exp_nonpositive(R x) {
    x = _mm256_max_ps(x, set1(kExpFloor));
    const R n = _mm256_round_ps(_mm256_mul_ps(x, set1(kLog2e)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm256_fnmadd_ps(n, set1(kLn2Lo), _mm256_fnmadd_ps(n, set1(kLn2Hi), x));
    R p = set1(kTaylor[0]);
    for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, f, set1(kTaylor[i]));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
};

#include "attention_cpu_walk.h"
#undef ATTN_TARGET
}  // namespace avx2

// The AVX512-BF16 path needs a compiler that knows it (GCC 11+, clang 12+); without one it is
// left out and bf16 streams are widened to float32 (the Python side asks which ops exist).
#if (defined(__clang__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define ATTN_HAVE_DPBF16 1
#else
#define ATTN_HAVE_DPBF16 0
#endif

#if ATTN_HAVE_DPBF16
// bf16 q/k/v end to end: scores q . k and the weighted sum of v as _mm512_dpbf16_ps dot products
// (each fp32 lane adds two exact bf16 products), the softmax in float32, its weights rounded to
// bf16 for the weighted sum (as PyTorch's bf16 flash kernel does), the output rounded to bf16.
// Head widths must be even (pairs); the Python side widens other shapes to float32.
namespace avx512bf16 {
#define ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

using F = avx512::V;  // float32 vector ops (their target is a subset of this one's: they inline)

using Bf16Call = CallOf<uint16_t>;

// Per (text, head): key pairs transposed (hd/2 rows of lpad words, word j = k_j[2c], k_j[2c+1]),
// value pairs (lpad/2 rows of hdpad words, word c = v_2j[c], v_2j+1[c]), the float32 scores /
// weights of a block of queries and their bf16 pairs.
struct Scratch16 {
  std::vector<uint32_t> keys2, values2, probs2;
  std::vector<float> probs;
  void reserve(int64_t hd, int64_t hdpad, int64_t lpad) {
    auto grow = [](auto& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.assign(n, 0);
    };
    grow(keys2, hd / 2 * lpad);
    grow(values2, lpad / 2 * hdpad);
    grow(probs2, kQueries * lpad / 2);
    grow(probs, kQueries * lpad);
  }
};

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// The pair layouts of one text's keys and values (rows `stride` apart), zero past l.
void pack_pairs(const uint16_t* k, const uint16_t* v, int64_t stride, int64_t l, int64_t lpad,
                int64_t hd, int64_t hdpad, Scratch16& s) {
  uint32_t* kw = s.keys2.data();
  for (int64_t cp = 0; cp < hd / 2; ++cp) {
    for (int64_t j = 0; j < l; ++j) kw[cp * lpad + j] = pair_at(k + j * stride + 2 * cp);
    std::fill(kw + cp * lpad + l, kw + cp * lpad + lpad, 0u);
  }
  uint32_t* vw = s.values2.data();
  for (int64_t jp = 0; jp < lpad / 2; ++jp) {
    const int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
    for (int64_t c = 0; c < hdpad; ++c) {
      const uint32_t lo = (j0 < l && c < hd) ? v[j0 * stride + c] : 0u;
      const uint32_t hi = (j1 < l && c < hd) ? v[j1 * stride + c] : 0u;
      vw[jp * hdpad + c] = lo | (hi << 16);
    }
  }
}

// Queries i0 .. i0 + NQ of one text's one head (pairs already packed into s).
template <int NQ>
ATTN_TARGET void query_block(const Bf16Call& call, int64_t start, int64_t i0, int64_t l,
                             int64_t lpad, int64_t hdpad, const HeadOffsets& at, Scratch16& s) {
  const int64_t stride = 3 * call.d, hd = call.hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const uint16_t* q[NQ];
  F::R row_max[NQ];
  for (int r = 0; r < NQ; ++r) {
    q[r] = call.qkv + (start + i0 + r) * stride + at.q;
    row_max[r] = F::set1(-INFINITY);
  }
  float* probs = s.probs.data();
  const uint32_t* kw = s.keys2.data();
  for (int64_t j = 0; j < l; j += F::W) {
    F::R acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = F::zero();
    for (int64_t cp = 0; cp < hd / 2; ++cp) {
      const __m512i k = _mm512_loadu_si512(kw + cp * lpad + j);
      for (int r = 0; r < NQ; ++r) {
        const __m512i qq = _mm512_set1_epi32(static_cast<int>(pair_at(q[r] + 2 * cp)));
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<const __m512bh&>(qq),
                                  reinterpret_cast<const __m512bh&>(k));
      }
    }
    const int live = static_cast<int>(std::min<int64_t>(l - j, F::W));
    for (int r = 0; r < NQ; ++r) {
      acc[r] = F::mul(acc[r], F::set1(scale));
      F::store(probs + r * lpad + j, acc[r]);
      row_max[r] = F::max(row_max[r], F::first_or(acc[r], live, -INFINITY));
    }
  }
  float inv_sum[NQ];
  for (int r = 0; r < NQ; ++r) {
    float* row = probs + r * lpad;
    const F::R m = F::set1(F::reduce_max(row_max[r]));
    F::R total = F::zero();
    for (int64_t j = 0; j < lpad; j += F::W) {  // zero weights past l, to lpad
      const int live = static_cast<int>(std::max<int64_t>(std::min<int64_t>(l - j, F::W), 0));
      const F::R p = F::first_or(F::exp_nonpositive(F::sub(F::load(row + j), m)), live, 0.0f);
      F::store(row + j, p);
      total = F::add(total, p);
    }
    inv_sum[r] = 1.0f / F::reduce_add(total);
    // bf16 weights in pairs: word jp = (p_2jp, p_2jp+1), rounded to nearest even
    uint32_t* pw = s.probs2.data() + r * (lpad / 2);
    for (int64_t j = 0; j < lpad; j += 2 * F::W) {
      const __m512bh h = _mm512_cvtne2ps_pbh(F::load(row + j + F::W), F::load(row + j));
      _mm512_storeu_si512(pw + j / 2, reinterpret_cast<const __m512i&>(h));
    }
  }
  const uint32_t* vw = s.values2.data();
  for (int64_t c = 0; c < hdpad; c += F::W) {
    F::R acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = F::zero();
    for (int64_t jp = 0; jp < (l + 1) / 2; ++jp) {
      const __m512i vv = _mm512_loadu_si512(vw + jp * hdpad + c);
      for (int r = 0; r < NQ; ++r) {
        const __m512i pp =
            _mm512_set1_epi32(static_cast<int>(s.probs2[r * (lpad / 2) + jp]));
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<const __m512bh&>(pp),
                                  reinterpret_cast<const __m512bh&>(vv));
      }
    }
    const __mmask16 live = F::mask(static_cast<int>(std::min<int64_t>(hd - c, F::W)));
    for (int r = 0; r < NQ; ++r) {
      const __m256bh h = _mm512_cvtneps_pbh(F::mul(acc[r], F::set1(inv_sum[r])));
      _mm256_mask_storeu_epi16(call.out + (start + i0 + r) * call.d + at.out + c, live,
                               reinterpret_cast<const __m256i&>(h));
    }
  }
}

// One text's one head.
ATTN_TARGET void text_head(const Bf16Call& call, int64_t start, int64_t l, const HeadOffsets& at,
                           Scratch16& s) {
  const int64_t lpad = (l + 2 * F::W - 1) / (2 * F::W) * (2 * F::W);  // whole bf16 pair rows
  const int64_t hdpad = (call.hd + F::W - 1) / F::W * F::W;
  s.reserve(call.hd, hdpad, lpad);
  const int64_t stride = 3 * call.d;
  pack_pairs(call.qkv + start * stride + at.k, call.qkv + start * stride + at.v, stride, l, lpad,
             call.hd, hdpad, s);
  int64_t i = 0;
  for (; i + kQueries <= l; i += kQueries) query_block<kQueries>(call, start, i, l, lpad, hdpad, at, s);
  switch (l - i) {
    case 3: query_block<3>(call, start, i, l, lpad, hdpad, at, s); break;
    case 2: query_block<2>(call, start, i, l, lpad, hdpad, at, s); break;
    case 1: query_block<1>(call, start, i, l, lpad, hdpad, at, s); break;
    default: break;
  }
}

void run(const Bf16Call& call) {
  at::parallel_for(0, call.n_texts * call.n_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch16 s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / call.n_heads, h = task % call.n_heads;
      if (call.lengths[n] == 0) continue;
      text_head(call, call.starts[n], call.lengths[n],
                offsets_of(h, call.hd, call.d, call.layout), s);
    }
  });
}

#undef ATTN_TARGET
}  // namespace avx512bf16
#endif

bool cpu_runs(int64_t isa) {
#if ATTN_HAVE_DPBF16
  if (isa == 3)
    return cpu_runs(2) && __builtin_cpu_supports("avx512bf16");
#endif
  if (isa == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  return isa == 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

at::Tensor packed_attention_cpu(const at::Tensor& qkv, const at::Tensor& starts,
                                const at::Tensor& lengths, int64_t n_heads, int64_t layout,
                                int64_t isa) {
  TORCH_CHECK(isa >= 1 && isa <= 3, "packed_attention_cpu: isa must be 1 (avx2), 2 (avx512) or "
              "3 (avx512bf16), got ", isa);
  TORCH_CHECK(cpu_runs(isa), "packed_attention_cpu: this CPU (or this build) does not run "
              "instruction set ", isa, "; use PyTorch's attention here");
  const at::ScalarType want = isa == 3 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == want && qkv.dim() == 2,
              "packed_attention_cpu: qkv must be a (T, 3d) ", want, " CPU tensor for isa ", isa,
              ", got ", qkv.scalar_type(), " of shape ", qkv.sizes());
  TORCH_CHECK(n_heads > 0 && qkv.size(1) % (3 * n_heads) == 0,
              "packed_attention_cpu: qkv width ", qkv.size(1), " is not 3 * n_heads (", n_heads,
              ") * head_dim");
  TORCH_CHECK(isa != 3 || (qkv.size(1) / (3 * n_heads)) % 2 == 0,
              "packed_attention_cpu: the bf16 path needs an even head width, got ",
              qkv.size(1) / (3 * n_heads));
  TORCH_CHECK(layout == 0 || layout == 1, "packed_attention_cpu: layout must be 0 or 1");
  TORCH_CHECK(starts.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  starts.dim() == 1 && starts.sizes() == lengths.sizes(),
              "packed_attention_cpu: starts and lengths must be (N,) int64 tensors");
  const at::Tensor x = qkv.contiguous();
  const at::Tensor st = starts.contiguous(), ln = lengths.contiguous();
  const int64_t n_texts = st.size(0), d = x.size(1) / 3, hd = d / n_heads, rows = x.size(0);
  const int64_t* sp = st.data_ptr<int64_t>();
  const int64_t* lp = ln.data_ptr<int64_t>();
  for (int64_t n = 0; n < n_texts; ++n)
    TORCH_CHECK(lp[n] >= 0 && sp[n] >= 0 && sp[n] + lp[n] <= rows,
                "packed_attention_cpu: text ", n, " (start ", sp[n], ", length ", lp[n],
                ") lies outside the ", rows, " rows of qkv");
  at::Tensor out = at::empty({rows, d}, x.options());
#if ATTN_HAVE_DPBF16
  if (isa == 3) {
    const avx512bf16::Bf16Call call{reinterpret_cast<const uint16_t*>(x.data_ptr()),
                                    reinterpret_cast<uint16_t*>(out.data_ptr()), sp, lp,
                                    n_texts, n_heads, hd, d, layout};
    avx512bf16::run(call);
    return out;
  }
#endif
  const Call call{x.data_ptr<float>(), out.data_ptr<float>(), sp, lp, n_texts, n_heads, hd, d,
                  layout};
  if (isa == 2) {
    avx512::run(call);
  } else {
    avx2::run(call);
  }
  return out;
}

// Whether this build has the AVX512-BF16 path (isa 3), whatever the CPU.
bool packed_attention_has_bf16() { return ATTN_HAVE_DPBF16 != 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("packed_attention_cpu(Tensor qkv, Tensor starts, Tensor lengths, int n_heads, "
        "int layout, int isa) -> Tensor",
        &packed_attention_cpu);
  m.def("packed_attention_has_bf16() -> bool", &packed_attention_has_bf16);
}
