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

// One call's data as raw pointers (at::parallel_for bodies must not touch Tensors).
struct Call {
  const float* qkv;
  float* out;
  const int64_t* starts;
  const int64_t* lengths;
  int64_t n_texts, n_heads, hd, d, layout;
};

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

bool cpu_runs(int64_t isa) {
  if (isa == 2)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  return isa == 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

at::Tensor packed_attention_cpu(const at::Tensor& qkv, const at::Tensor& starts,
                                const at::Tensor& lengths, int64_t n_heads, int64_t layout,
                                int64_t isa) {
  TORCH_CHECK(isa == 1 || isa == 2, "packed_attention_cpu: isa must be 1 (avx2) or 2 (avx512), "
              "got ", isa);
  TORCH_CHECK(cpu_runs(isa), "packed_attention_cpu: this CPU does not run instruction set ", isa,
              "; use PyTorch's attention here");
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2,
              "packed_attention_cpu: qkv must be a (T, 3d) float32 CPU tensor, got ",
              qkv.scalar_type(), " of shape ", qkv.sizes());
  TORCH_CHECK(n_heads > 0 && qkv.size(1) % (3 * n_heads) == 0,
              "packed_attention_cpu: qkv width ", qkv.size(1), " is not 3 * n_heads (", n_heads,
              ") * head_dim");
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
  const Call call{x.data_ptr<float>(), out.data_ptr<float>(), sp, lp, n_texts, n_heads, hd, d,
                  layout};
  if (isa == 2) {
    avx512::run(call);
  } else {
    avx2::run(call);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("packed_attention_cpu(Tensor qkv, Tensor starts, Tensor lengths, int n_heads, "
        "int layout, int isa) -> Tensor",
        &packed_attention_cpu);
}
