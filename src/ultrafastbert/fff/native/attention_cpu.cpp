// Self-attention of packed texts on the CPU, for the short texts of an embedding server
// (infer/native_attention.py says when it is used; docs/precision.md, "Attention").
//
//   packed_attention_cpu(qkv, starts, lengths, n_heads, layout) -> out
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
// AVX-512 (F) only; other CPUs keep PyTorch's attention (the Python side checks first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#define ATTN_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

constexpr int kW = 16;  // floats per vector

ATTN_TARGET inline __mmask16 tail_mask(int64_t n) {
  return n >= kW ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum); x below -87 gives ~1e-38.
ATTN_TARGET inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // f = x - n ln2, in two parts so that f keeps its low bits.
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Where a head's q, k and v start within a qkv row, and its output within an out row.
struct HeadOffsets {
  int64_t q, k, v, out;
};

inline HeadOffsets offsets_of(int64_t h, int64_t hd, int64_t d, int64_t layout) {
  if (layout == 0) return {h * hd, d + h * hd, 2 * d + h * hd, h * hd};
  return {h * 3 * hd, h * 3 * hd + hd, h * 3 * hd + 2 * hd, h * hd};
}

// Scratch for one (text, head): keys transposed (hd x lpad, zero past l) and the rows of
// probabilities of a block of queries (queries x lpad).
struct Scratch {
  std::vector<float> keys_t, probs;
  void reserve(int64_t hd, int64_t lpad, int64_t queries) {
    if (static_cast<int64_t>(keys_t.size()) < hd * lpad) keys_t.assign(hd * lpad, 0.0f);
    if (static_cast<int64_t>(probs.size()) < queries * lpad) probs.assign(queries * lpad, 0.0f);
  }
};

// Queries are taken NQ at a time so that every key / value load feeds NQ independent FMA
// chains (one chain per query would wait on the FMA latency).
constexpr int kQueries = 4;

// Softmax weights of the NQ queries q[0..NQ) (hd floats each) over the l keys into
// probs[r * lpad + j]; inv_sum[r] = 1 / (sum of row r).
template <int NQ>
ATTN_TARGET void query_probs(const float* const* q, const float* kt, int64_t l, int64_t lpad,
                             int64_t hd, float scale, float* probs, float* inv_sum) {
  __m512 row_max[NQ];
  for (int r = 0; r < NQ; ++r) row_max[r] = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < l; j += kW) {
    __m512 acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; ++c) {
      const __m512 k = _mm512_loadu_ps(kt + c * lpad + j);
      for (int r = 0; r < NQ; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][c]), k, acc[r]);
    }
    const __mmask16 live = tail_mask(l - j);
    for (int r = 0; r < NQ; ++r) {
      acc[r] = _mm512_mul_ps(acc[r], _mm512_set1_ps(scale));
      _mm512_storeu_ps(probs + r * lpad + j, acc[r]);
      row_max[r] = _mm512_mask_max_ps(row_max[r], live, row_max[r], acc[r]);
    }
  }
  for (int r = 0; r < NQ; ++r) {
    float* row = probs + r * lpad;
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(row_max[r]));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < l; j += kW) {
      const __m512 p = _mm512_maskz_mov_ps(
          tail_mask(l - j), exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), m)));
      _mm512_storeu_ps(row + j, p);
      total = _mm512_add_ps(total, p);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(total);
  }
}

// out[r][0..hd) = inv_sum[r] * sum_j probs[r * lpad + j] v_j, v_j = v + j * stride.
template <int NQ>
ATTN_TARGET void weighted_values(const float* probs, int64_t lpad, const float* v,
                                 int64_t stride, int64_t l, int64_t hd, const float* inv_sum,
                                 float* const* out) {
  for (int64_t c = 0; c < hd; c += kW) {
    const __mmask16 live = tail_mask(hd - c);
    __m512 acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < l; ++j) {
      const __m512 vj = _mm512_maskz_loadu_ps(live, v + j * stride + c);
      for (int r = 0; r < NQ; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(probs[r * lpad + j]), vj, acc[r]);
    }
    for (int r = 0; r < NQ; ++r)
      _mm512_mask_storeu_ps(out[r] + c, live, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv_sum[r])));
  }
}

// Queries i0 .. i0 + NQ of one text's one head.
template <int NQ>
ATTN_TARGET void query_block(const float* qkv, float* out, int64_t start, int64_t i0, int64_t l,
                             int64_t lpad, int64_t hd, int64_t d, const HeadOffsets& at,
                             Scratch& s) {
  const int64_t stride = 3 * d;
  const float* q[NQ];
  float* o[NQ];
  float inv_sum[NQ];
  for (int r = 0; r < NQ; ++r) {
    q[r] = qkv + (start + i0 + r) * stride + at.q;
    o[r] = out + (start + i0 + r) * d + at.out;
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  query_probs<NQ>(q, s.keys_t.data(), l, lpad, hd, scale, s.probs.data(), inv_sum);
  weighted_values<NQ>(s.probs.data(), lpad, qkv + start * stride + at.v, stride, l, hd, inv_sum,
                      o);
}

// One text's one head: rows [start, start + l) of qkv into the same rows of out.
ATTN_TARGET void text_head(const float* qkv, float* out, int64_t start, int64_t l, int64_t hd,
                           int64_t d, const HeadOffsets& at, Scratch& s) {
  const int64_t lpad = (l + kW - 1) / kW * kW;
  s.reserve(hd, lpad, kQueries);
  const int64_t stride = 3 * d;
  float* kt = s.keys_t.data();
  for (int64_t j = 0; j < l; ++j) {
    const float* k = qkv + (start + j) * stride + at.k;
    for (int64_t c = 0; c < hd; ++c) kt[c * lpad + j] = k[c];
  }
  for (int64_t c = 0; c < hd; ++c)
    std::fill(kt + c * lpad + l, kt + c * lpad + lpad, 0.0f);
  int64_t i = 0;
  for (; i + kQueries <= l; i += kQueries)
    query_block<kQueries>(qkv, out, start, i, l, lpad, hd, d, at, s);
  switch (l - i) {
    case 3: query_block<3>(qkv, out, start, i, l, lpad, hd, d, at, s); break;
    case 2: query_block<2>(qkv, out, start, i, l, lpad, hd, d, at, s); break;
    case 1: query_block<1>(qkv, out, start, i, l, lpad, hd, d, at, s); break;
    default: break;
  }
}

at::Tensor packed_attention_cpu(const at::Tensor& qkv, const at::Tensor& starts,
                                const at::Tensor& lengths, int64_t n_heads, int64_t layout) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl"),
              "packed_attention_cpu needs AVX-512 (F, BW, VL); use PyTorch's attention here");
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
  const float* in = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n_texts * n_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / n_heads, h = task % n_heads;
      if (lp[n] == 0) continue;
      text_head(in, o, sp[n], lp[n], hd, d, offsets_of(h, hd, d, layout), s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("packed_attention_cpu(Tensor qkv, Tensor starts, Tensor lengths, int n_heads, "
        "int layout) -> Tensor",
        &packed_attention_cpu);
}
