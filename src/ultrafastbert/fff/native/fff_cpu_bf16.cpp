// Native CPU inference for the FFF layer in bfloat16 end to end (docs/precision.md): the same
// walk as the fp32 ops (fff_cpu_walk.h through fff_cpu_kernel.h), on bf16 inputs and weights.
//
//   logit_n = x . w_in[n] + b_in[n]  (fp32 sum of bf16 products);  right iff logit_n > 0
//   y = bf16( sum over visited n of GELU(logit_n) * w_out_row[n] )  (fp32 sum, rounded once)
//
// Ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT; fff_cpu.cpp registers the fp32
// ones beside them):
//   fff_bf16_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa) -> y
//   fff_bf16_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_bf16_forward_tuned(x, w_in, b_in, w_out_rows, n_trees, depth, isa, knobs) -> y
//   fff_bf16_forward_tuned_nodes(same) -> (y, nodes)   with a knobs table, as the fp32 ops
//   fff_bf16_isa() -> str   best path this CPU runs: "avx512bf16", "avx512", "avx2" or ""
// x (T, d), w_in and w_out_rows (K*N, d) bfloat16; b_in (K*N,) float32; y (T, d) bfloat16.
// isa 3 = AVX512-BF16 dot products (_mm512_dpbf16_ps, fp32 accumulation); 2 = AVX-512 and
// 1 = AVX2, both widening bf16 to fp32 exactly and using fp32 FMAs (the fallback; any path can
// be asked for on a CPU that has it, so tests run every path the CPU has).
//
// The paths differ only in the rounding of the logit sums (dpbf16 adds pairs of products before
// accumulating); the output pass and its rounding to bf16 (nearest even, NaN -> 0x7FC0, as
// torch's own conversion) are the same on every path.
#include "fff_cpu_kernel.h"

namespace {

constexpr OpSpec kBf16Op{"fff_bf16_forward", at::kBFloat16, false, kAvx512Bf16,
                         "1 (avx2), 2 (avx512) or 3 (avx512bf16)"};

std::string bf16_isa_name() {
  switch (best_isa()) {
    case kAvx512Bf16: return "avx512bf16";
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "";
  }
}

// The untuned ops' knobs: several trees: a lone token's trees side by side (as the fp32 kernel),
// more tokens a tree at a time for groups of 4 tokens (walk_tree_group; the fp32 kernel's sorted
// blocks measured no faster here); one deep tree: bucketed from 8 tokens per bucket; the output
// rows prefetched from kPrefetchTokens tokens.
Knobs bf16_default_knobs(int64_t tokens) {
  Knobs k;
  k.trees_together = tokens == 1 ? 1 : 0;
  k.prefetch = tokens >= kPrefetchTokens ? 1 : 0;
  return k;
}

Runs bf16_runs(int64_t isa) {
  using E = Elems<bf16_bits, bf16_bits, bf16_bits>;
#if FFF_HAVE_DPBF16
  if (isa == kAvx512Bf16) return avx512bf16::runs_for<E>();
#endif
  if (isa == kAvx512) return avx512::runs_for<E>();
  return avx2::runs_for<E>();
}

// y (and nodes when asked) for x with `knobs` (arguments checked).
std::tuple<at::Tensor, at::Tensor> bf16_forward(const at::Tensor& x, const at::Tensor& w_in,
                                                const at::Tensor& b_in, const at::Tensor& w_out,
                                                int64_t n_trees, int64_t depth, int64_t isa,
                                                const Knobs& knobs, bool with_nodes) {
  at::Tensor y = empty_cpu(x.sizes(), at::kBFloat16);
  at::Tensor nodes;
  if (with_nodes) nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  Problem pb = make_problem(x, w_in, b_in, w_out, n_trees, depth, knobs, y,
                            with_nodes ? nodes.data_ptr<int64_t>() : nullptr);
  run_problem(bf16_runs(isa), pb, x.size(0));
  return {y, nodes};
}

at::Tensor fff_bf16_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                            const at::Tensor& w_out, int64_t n_trees, int64_t depth,
                            int64_t isa) {
  check_inputs(kBf16Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  return std::get<0>(bf16_forward(x, w_in, b_in, w_out, n_trees, depth, isa,
                                  bf16_default_knobs(x.size(0)), false));
}

std::tuple<at::Tensor, at::Tensor> fff_bf16_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(kBf16Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  return bf16_forward(x, w_in, b_in, w_out, n_trees, depth, isa, bf16_default_knobs(x.size(0)),
                      true);
}

at::Tensor fff_bf16_forward_tuned(const at::Tensor& x, const at::Tensor& w_in,
                                  const at::Tensor& b_in, const at::Tensor& w_out,
                                  int64_t n_trees, int64_t depth, int64_t isa,
                                  const at::Tensor& knobs) {
  check_inputs(kBf16Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs("fff_bf16_forward_tuned", knobs);
  return std::get<0>(bf16_forward(x, w_in, b_in, w_out, n_trees, depth, isa,
                                  knobs_for(knobs, x.size(0)), false));
}

std::tuple<at::Tensor, at::Tensor> fff_bf16_forward_tuned_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa, const at::Tensor& knobs) {
  check_inputs(kBf16Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs("fff_bf16_forward_tuned", knobs);
  return bf16_forward(x, w_in, b_in, w_out, n_trees, depth, isa, knobs_for(knobs, x.size(0)),
                      true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_bf16_forward(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa) -> Tensor",
        &fff_bf16_forward);
  m.def("fff_bf16_forward_nodes(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, "
        "int n_trees, int depth, int isa) -> (Tensor, Tensor)",
        &fff_bf16_forward_nodes);
  m.def("fff_bf16_forward_tuned(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, "
        "int n_trees, int depth, int isa, Tensor knobs) -> Tensor",
        &fff_bf16_forward_tuned);
  m.def("fff_bf16_forward_tuned_nodes(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, "
        "int n_trees, int depth, int isa, Tensor knobs) -> (Tensor, Tensor)",
        &fff_bf16_forward_tuned_nodes);
  m.def("fff_bf16_isa() -> str", &bf16_isa_name);
}
