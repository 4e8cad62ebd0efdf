// Native CPU inference for the FFF layer with int8 weights (docs/precision.md): the same walk as
// the fp32 ops (fff_cpu_walk.h through fff_cpu_kernel.h), on int8 node rows with one float scale
// per row (symmetric: row = scale * q, q in [-127, 127]); x, y, logits, activations and sums fp32.
//
//   logit_n = s_in[n] * (x . q_in[n]) + b_in[n];  right iff logit_n > 0 (exact 0, NaN: left)
//   y = sum over trees, sum over visited n of (GELU(logit_n) * s_out[n]) * q_out_row[n]
//
// so the op computes the FFF of the dequantized weights (s * q) in fp32: the int8 values are
// widened to fp32 exactly in registers (a quarter of the fp32 rows' bytes to stream).
//
// The VNNI path (isa 3) also quantizes each token once per call (symmetric, one scale per token:
// xq = round(x * 127 / max|x|), see avx512vnni::quantize_tokens) and computes the routing dot
// products in integers with _mm512_dpbusd_epi32 (uint8 x int8: the token as xq + 128, and the
// row's c_in = 128 * sum(q_in) subtracted after):
//
//   logit_n = (max|x| / 127) * s_in[n] * (xq . q_in[n]) + b_in[n]
//
// that is, the FFF of the dequantized weights on the dequantized token; the output pass is the
// same as on the other paths (fp32 activations, int8 output rows widened).
//
// Ops in the `ultrafastbert` namespace (a TORCH_LIBRARY_FRAGMENT beside the fp32 and bf16 ones):
//   fff_int8_forward(x, w_in, s_in, c_in, b_in, w_out_rows, s_out, n_trees, depth, isa) -> y
//   fff_int8_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_int8_forward_tuned(x, w_in, s_in, c_in, b_in, w_out_rows, s_out, n_trees, depth, isa,
//                          knobs) -> y
//   fff_int8_forward_tuned_nodes(same) -> (y, nodes)   with a knobs table, as the fp32 ops
//   fff_int8_quantize_tokens(x) -> (xq, scale)   the VNNI path's tokens: xq (T, d) int8 (the q
//       above), scale (T,) float32 (for tests and the reference)
//   fff_int8_isa() -> str   the best path this CPU runs: "avx512vnni", "avx512", "avx2" or ""
// x (T, d) float32; w_in and w_out_rows (K*N, d) int8; s_in, c_in, b_in, s_out (K*N,) float32
// (c_in = 128 * the row sums of w_in, read by the VNNI path only); isa 3 = AVX512-VNNI,
// 2 = AVX-512, 1 = AVX2 (any path the CPU has can be asked for, so the tests run each).
#include "fff_cpu_kernel.h"

namespace {

// The int8 ops' isa 3: AVX512-VNNI dot products on quantized tokens.
constexpr int64_t kInt8Vnni = 3;

constexpr OpSpec kInt8Op{"fff_int8_forward", at::kFloat, false, kAvx512,
                         "1 (avx2), 2 (avx512) or 3 (avx512vnni)", true};

bool vnni_supported() {
#if FFF_HAVE_VNNI
  __builtin_cpu_init();
  return best_isa() >= kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

std::string int8_isa_name() {
  if (vnni_supported()) return "avx512vnni";
  const Isa best = best_isa();
  return best >= kAvx512 ? "avx512" : best == kAvx2 ? "avx2" : "";
}

void check_scales(const at::Tensor& s_in, const at::Tensor& c_in, const at::Tensor& s_out,
                  const at::Tensor& w_in) {
  for (const at::Tensor* s : {&s_in, &c_in, &s_out}) {
    TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat && s->is_contiguous() &&
                    s->dim() == 1 && s->size(0) == w_in.size(0),
                "fff_int8_forward: s_in, c_in and s_out must be contiguous (", w_in.size(0),
                ",) float32 CPU tensors (one value per node row)");
  }
}

void check_all(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in,
               const at::Tensor& c_in, const at::Tensor& b_in, const at::Tensor& w_out,
               const at::Tensor& s_out, int64_t n_trees, int64_t depth, int64_t isa) {
  TORCH_CHECK(isa != kInt8Vnni || vnni_supported(), "fff_int8_forward: this CPU (or compiler) "
              "has no AVX512-VNNI path (isa 3); use 2 (avx512) or 1 (avx2)");
  check_inputs(kInt8Op, x, w_in, b_in, w_out, n_trees, depth, isa == kInt8Vnni ? kAvx512 : isa);
  check_scales(s_in, c_in, s_out, w_in);
}

Runs int8_runs(int64_t isa) {
#if FFF_HAVE_VNNI
  if (isa == kInt8Vnni) return avx512vnni::runs_for<Elems<float, int8_t, int8_t, uint8_t>>();
#endif
  using E = Elems<float, int8_t, int8_t>;
  if (isa == kAvx512) return avx512::runs_for<E>();
  return avx2::runs_for<E>();
}

// Bytes per quantized token: d values, then the scale, rounded up to whole cache lines.
int64_t quantized_stride(int64_t d) {
  return (d + static_cast<int64_t>(sizeof(float)) + 63) / 64 * 64;
}

// x's tokens quantized for the VNNI path into `out` (T * quantized_stride(d) bytes), on torch's
// threads when there are many.
void quantize_into(const at::Tensor& x, uint8_t* out) {
#if FFF_HAVE_VNNI
  const int64_t T = x.size(0), d = x.size(1), stride = quantized_stride(d);
  const float* xs = x.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(64, (int64_t{1} << 18) / d);
  if (T < 2 * grain) {
    avx512vnni::quantize_tokens(xs, 0, T, d, stride, out);
    return;
  }
  at::parallel_for(0, T, grain, [&](int64_t a, int64_t b) {
    avx512vnni::quantize_tokens(xs, a, b, d, stride, out);
  });
#else
  (void)x;
  (void)out;
#endif
}

std::tuple<at::Tensor, at::Tensor> fff_int8_quantize_tokens(const at::Tensor& x) {
  TORCH_CHECK(vnni_supported(), "fff_int8_quantize_tokens: this CPU (or compiler) has no "
              "AVX512-VNNI path");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.is_contiguous(),
              "fff_int8_quantize_tokens: x must be a contiguous 2-D float32 CPU tensor");
  const int64_t T = x.size(0), d = x.size(1), stride = quantized_stride(d);
  std::vector<uint8_t> buf(T * stride);
  quantize_into(x, buf.data());
  at::Tensor q = empty_cpu({T, d}, at::kChar), scale = empty_cpu({T}, at::kFloat);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < d; ++k) {
      qp[t * d + k] = static_cast<int8_t>(static_cast<int>(buf[t * stride + k]) - 128);
    }
    std::memcpy(sp + t, buf.data() + (t + 1) * stride - sizeof(float), sizeof(float));
  }
  return {q, scale};
}

// y (and nodes when asked) for x with `knobs` (arguments checked).
std::tuple<at::Tensor, at::Tensor> int8_forward(const at::Tensor& x, const at::Tensor& w_in,
                                                const at::Tensor& s_in, const at::Tensor& c_in,
                                                const at::Tensor& b_in, const at::Tensor& w_out,
                                                const at::Tensor& s_out, int64_t n_trees,
                                                int64_t depth, int64_t isa, const Knobs& knobs,
                                                bool with_nodes) {
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes;
  if (with_nodes) nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  Problem pb = make_problem(x, w_in, b_in, w_out, n_trees, depth, knobs, y,
                            with_nodes ? nodes.data_ptr<int64_t>() : nullptr);
  pb.s_in = s_in.data_ptr<float>();
  pb.s_out = s_out.data_ptr<float>();
  std::vector<uint8_t> quantized;
  if (isa == kInt8Vnni) {
    quantized.resize(x.size(0) * quantized_stride(x.size(1)));
    quantize_into(x, quantized.data());
    pb.x = quantized.data();
    pb.x_stride = quantized_stride(x.size(1));
    pb.c_in = c_in.data_ptr<float>();
  }
  run_problem(int8_runs(isa), pb, x.size(0));
  return {y, nodes};
}

at::Tensor fff_int8_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in,
                            const at::Tensor& c_in, const at::Tensor& b_in,
                            const at::Tensor& w_out, const at::Tensor& s_out, int64_t n_trees,
                            int64_t depth, int64_t isa) {
  check_all(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa);
  return std::get<0>(int8_forward(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa,
                                  default_knobs(x.size(0), n_trees), false));
}

std::tuple<at::Tensor, at::Tensor> fff_int8_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in, const at::Tensor& c_in,
    const at::Tensor& b_in, const at::Tensor& w_out, const at::Tensor& s_out, int64_t n_trees,
    int64_t depth, int64_t isa) {
  check_all(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa);
  return int8_forward(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa,
                      default_knobs(x.size(0), n_trees), true);
}

at::Tensor fff_int8_forward_tuned(const at::Tensor& x, const at::Tensor& w_in,
                                  const at::Tensor& s_in, const at::Tensor& c_in,
                                  const at::Tensor& b_in, const at::Tensor& w_out,
                                  const at::Tensor& s_out, int64_t n_trees, int64_t depth,
                                  int64_t isa, const at::Tensor& knobs) {
  check_all(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa);
  check_knobs("fff_int8_forward_tuned", knobs);
  return std::get<0>(int8_forward(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa,
                                  knobs_for(knobs, x.size(0)), false));
}

std::tuple<at::Tensor, at::Tensor> fff_int8_forward_tuned_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in, const at::Tensor& c_in,
    const at::Tensor& b_in, const at::Tensor& w_out, const at::Tensor& s_out, int64_t n_trees,
    int64_t depth, int64_t isa, const at::Tensor& knobs) {
  check_all(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa);
  check_knobs("fff_int8_forward_tuned", knobs);
  return int8_forward(x, w_in, s_in, c_in, b_in, w_out, s_out, n_trees, depth, isa,
                      knobs_for(knobs, x.size(0)), true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_int8_forward(Tensor x, Tensor w_in, Tensor s_in, Tensor c_in, Tensor b_in, "
        "Tensor w_out, Tensor s_out, int n_trees, int depth, int isa) -> Tensor",
        &fff_int8_forward);
  m.def("fff_int8_forward_nodes(Tensor x, Tensor w_in, Tensor s_in, Tensor c_in, Tensor b_in, "
        "Tensor w_out, Tensor s_out, int n_trees, int depth, int isa) -> (Tensor, Tensor)",
        &fff_int8_forward_nodes);
  m.def("fff_int8_forward_tuned(Tensor x, Tensor w_in, Tensor s_in, Tensor c_in, Tensor b_in, "
        "Tensor w_out, Tensor s_out, int n_trees, int depth, int isa, Tensor knobs) -> Tensor",
        &fff_int8_forward_tuned);
  m.def("fff_int8_forward_tuned_nodes(Tensor x, Tensor w_in, Tensor s_in, Tensor c_in, "
        "Tensor b_in, Tensor w_out, Tensor s_out, int n_trees, int depth, int isa, "
        "Tensor knobs) -> (Tensor, Tensor)",
        &fff_int8_forward_tuned_nodes);
  m.def("fff_int8_quantize_tokens(Tensor x) -> (Tensor, Tensor)", &fff_int8_quantize_tokens);
  m.def("fff_int8_isa() -> str", &int8_isa_name);
}
