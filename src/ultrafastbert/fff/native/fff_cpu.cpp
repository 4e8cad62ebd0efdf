// Native CPU inference for the fast feedforward (FFF) layer in fp32 (docs/design.md §1.1, the
// walk: fff_cpu_walk.h through fff_cpu_kernel.h).
//
// Registered as torch ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT, so other
// parts of the package add ops to the same namespace: fff_cpu_bf16.cpp):
//   fff_cpu_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa) -> y
//   fff_cpu_forward_nodes(same) -> (y, nodes)    nodes: (T, K, D+1) int64 global node ids
//   fff_cpu_forward_tuned(x, w_in, b_in, w_out_rows, n_trees, depth, isa, knobs) -> y
//   fff_cpu_forward_tuned_nodes(same) -> (y, nodes)   with a knobs table (see Knobs); the
//       untuned ops use the fixed defaults. Knobs choose how a call is walked, never its result.
//   fff_cpu_isa() -> str   the best instruction set this CPU runs: "avx512", "avx2" or ""
// x (T, d) float32; w_in and w_out_rows (K*N, d) float32 or bfloat16 (bf16 is widened exactly to
// fp32 in registers; all arithmetic is fp32); b_in (K*N,) float32; isa 2 = AVX-512, 1 = AVX2.
#include "fff_cpu_kernel.h"

namespace {

constexpr OpSpec kFp32Op{"fff_cpu_forward", at::kFloat, true, kAvx512, "1 (avx2) or 2 (avx512)"};

std::string isa_name() {
  const Isa best = best_isa();
  return best >= kAvx512 ? "avx512" : best == kAvx2 ? "avx2" : "";
}

// An instruction set's entry points for these weight types, picked once per call.
template <class X>
Runs runs_of(int64_t isa, bool in_bf16, bool out_bf16) {
  using F = float;
  using H = bf16_bits;
  if (isa == kAvx512) {
    if (in_bf16) return out_bf16 ? avx512::runs_for<Elems<X, H, H>>() : avx512::runs_for<Elems<X, H, F>>();
    return out_bf16 ? avx512::runs_for<Elems<X, F, H>>() : avx512::runs_for<Elems<X, F, F>>();
  }
  if (in_bf16) return out_bf16 ? avx2::runs_for<Elems<X, H, H>>() : avx2::runs_for<Elems<X, H, F>>();
  return out_bf16 ? avx2::runs_for<Elems<X, F, H>>() : avx2::runs_for<Elems<X, F, F>>();
}

// y (and nodes when asked) for x with `knobs` (arguments checked).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& w_in,
                                           const at::Tensor& b_in, const at::Tensor& w_out,
                                           int64_t n_trees, int64_t depth, int64_t isa,
                                           const Knobs& knobs, bool with_nodes) {
  at::Tensor y = empty_cpu(x.sizes(), at::kFloat);
  at::Tensor nodes;
  if (with_nodes) nodes = empty_cpu({x.size(0), n_trees, depth + 1}, at::kLong);
  Problem pb = make_problem(x, w_in, b_in, w_out, n_trees, depth, knobs, y,
                            with_nodes ? nodes.data_ptr<int64_t>() : nullptr);
  const Runs runs = runs_of<float>(isa, w_in.scalar_type() == at::kBFloat16,
                                   w_out.scalar_type() == at::kBFloat16);
  run_problem(runs, pb, x.size(0));
  return {y, nodes};
}

at::Tensor fff_cpu_forward(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in,
                           const at::Tensor& w_out, int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(kFp32Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  return std::get<0>(forward(x, w_in, b_in, w_out, n_trees, depth, isa,
                             default_knobs(x.size(0), n_trees), false));
}

std::tuple<at::Tensor, at::Tensor> fff_cpu_forward_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  check_inputs(kFp32Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  return forward(x, w_in, b_in, w_out, n_trees, depth, isa, default_knobs(x.size(0), n_trees),
                 true);
}

at::Tensor fff_cpu_forward_tuned(const at::Tensor& x, const at::Tensor& w_in,
                                 const at::Tensor& b_in, const at::Tensor& w_out,
                                 int64_t n_trees, int64_t depth, int64_t isa,
                                 const at::Tensor& knobs) {
  check_inputs(kFp32Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs("fff_cpu_forward_tuned", knobs);
  return std::get<0>(forward(x, w_in, b_in, w_out, n_trees, depth, isa,
                             knobs_for(knobs, x.size(0)), false));
}

std::tuple<at::Tensor, at::Tensor> fff_cpu_forward_tuned_nodes(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa, const at::Tensor& knobs) {
  check_inputs(kFp32Op, x, w_in, b_in, w_out, n_trees, depth, isa);
  check_knobs("fff_cpu_forward_tuned", knobs);
  return forward(x, w_in, b_in, w_out, n_trees, depth, isa, knobs_for(knobs, x.size(0)), true);
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
