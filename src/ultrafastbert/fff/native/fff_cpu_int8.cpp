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
// Ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT, beside the fp32 and bf16 ones):
//   fff_int8_forward(x, w_in, s_in, b_in, w_out_rows, s_out, n_trees, depth, isa) -> y
//   fff_int8_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_int8_forward_tuned(x, w_in, s_in, b_in, w_out_rows, s_out, n_trees, depth, isa, knobs)
//   fff_int8_forward_tuned_nodes(same) -> (y, nodes)   with a knobs table, as the fp32 ops
// x (T, d) float32; w_in and w_out_rows (K*N, d) int8; s_in, b_in, s_out (K*N,) float32;
// isa 2 = AVX-512, 1 = AVX2 (fff_cpu_isa() names the best this CPU runs).
#include "fff_cpu_kernel.h"

namespace {

constexpr OpSpec kInt8Op{"fff_int8_forward", at::kFloat, false, kAvx512,
                         "1 (avx2) or 2 (avx512)", true};

void check_scales(const at::Tensor& s_in, const at::Tensor& s_out, const at::Tensor& w_in) {
  for (const at::Tensor* s : {&s_in, &s_out}) {
    TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == at::kFloat && s->is_contiguous() &&
                    s->dim() == 1 && s->size(0) == w_in.size(0),
                "fff_int8_forward: s_in and s_out must be contiguous (", w_in.size(0),
                ",) float32 CPU tensors (one scale per node row)");
  }
}

Runs int8_runs(int64_t isa) {
  using E = Elems<float, int8_t, int8_t>;
  if (isa == kAvx512) return avx512::runs_for<E>();
  return avx2::runs_for<E>();
}

// y (and nodes when asked) for x with `knobs` (arguments checked).
std::tuple<at::Tensor, at::Tensor> int8_forward(const at::Tensor& x, const at::Tensor& w_in,
                                                const at::Tensor& s_in, const at::Tensor& b_in,
                                                const at::Tensor& w_out, const at::Tensor& s_out,
                                                int64_t n_trees, int64_t depth, int64_t isa,
                                                const Knobs& knobs, bool with_nodes) {
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes;
  if (with_nodes) nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  Problem pb = make_problem(x, w_in, b_in, w_out, n_trees, depth, knobs, y,
                            with_nodes ? nodes.data_ptr<int64_t>() : nullptr);
  pb.s_in = s_in.data_ptr<float>();
  pb.s_out = s_out.data_ptr<float>();
  run_problem(int8_runs(isa), pb, x.size(0));
  return {y, nodes};
}

void check_all(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in,
               const at::Tensor& b_in, const at::Tensor& w_out, const at::Tensor& s_out,
               int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(kInt8Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  check_scales(s_in, s_out, w_in);
}

at::Tensor fff_int8_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in,
                            const at::Tensor& b_in, const at::Tensor& w_out,
                            const at::Tensor& s_out, int64_t n_trees, int64_t depth,
                            int64_t isa) {
  check_all(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa);
  return std::get<0>(int8_forward(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa,
                                  default_knobs(x.size(0), n_trees), false));
}

std::tuple<at::Tensor, at::Tensor> fff_int8_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in, const at::Tensor& b_in,
    const at::Tensor& w_out, const at::Tensor& s_out, int64_t n_trees, int64_t depth,
    int64_t isa) {
  check_all(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa);
  return int8_forward(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa,
                      default_knobs(x.size(0), n_trees), true);
}

at::Tensor fff_int8_forward_tuned(const at::Tensor& x, const at::Tensor& w_in,
                                  const at::Tensor& s_in, const at::Tensor& b_in,
                                  const at::Tensor& w_out, const at::Tensor& s_out,
                                  int64_t n_trees, int64_t depth, int64_t isa,
                                  const at::Tensor& knobs) {
  check_all(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa);
  check_knobs("fff_int8_forward_tuned", knobs);
  return std::get<0>(int8_forward(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa,
                                  knobs_for(knobs, x.size(0)), false));
}

std::tuple<at::Tensor, at::Tensor> fff_int8_forward_tuned_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& s_in, const at::Tensor& b_in,
    const at::Tensor& w_out, const at::Tensor& s_out, int64_t n_trees, int64_t depth,
    int64_t isa, const at::Tensor& knobs) {
  check_all(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa);
  check_knobs("fff_int8_forward_tuned", knobs);
  return int8_forward(x, w_in, s_in, b_in, w_out, s_out, n_trees, depth, isa,
                      knobs_for(knobs, x.size(0)), true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_int8_forward(Tensor x, Tensor w_in, Tensor s_in, Tensor b_in, Tensor w_out, "
        "Tensor s_out, int n_trees, int depth, int isa) -> Tensor",
        &fff_int8_forward);
  m.def("fff_int8_forward_nodes(Tensor x, Tensor w_in, Tensor s_in, Tensor b_in, Tensor w_out, "
        "Tensor s_out, int n_trees, int depth, int isa) -> (Tensor, Tensor)",
        &fff_int8_forward_nodes);
  m.def("fff_int8_forward_tuned(Tensor x, Tensor w_in, Tensor s_in, Tensor b_in, Tensor w_out, "
        "Tensor s_out, int n_trees, int depth, int isa, Tensor knobs) -> Tensor",
        &fff_int8_forward_tuned);
  m.def("fff_int8_forward_tuned_nodes(Tensor x, Tensor w_in, Tensor s_in, Tensor b_in, "
        "Tensor w_out, Tensor s_out, int n_trees, int depth, int isa, Tensor knobs) "
        "-> (Tensor, Tensor)",
        &fff_int8_forward_tuned_nodes);
}
