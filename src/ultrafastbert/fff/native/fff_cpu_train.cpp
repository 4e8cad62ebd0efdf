// Native CPU training for the fast feedforward (FFF) layer (docs/design.md §1.1): forward and
// backward over the visited nodes only, equal in value and gradient to the original "masked"
// form (every neuron computed, then multiplied by a 0/1 mask of the visited nodes).
//
//   forward:  logit_p = x . w_in[node_p] + b_in[node_p] along each tree's path (right iff
//             logit > 0; exact 0 and NaN go left); y = sum_p GELU(logit_p) * w_out_row[node_p]
//   backward: g_p = (dy . w_out_row[node_p]) * GELU'(logit_p);  dx = sum_p g_p * w_in[node_p];
//             dW_in[n] = sum over (t, p) visiting n of g * x[t];  db[n] = sum of those g;
//             dW_out[:, n] = sum over (t, p) visiting n of GELU(logit) * dy[t]
//
// Registered as torch ops in the `ultrafastbert` namespace (TORCH_LIBRARY_FRAGMENT, beside the
// inference kernel of fff_cpu.cpp):
//   fff_cpu_train_forward(x, w_in, b_in, w_out_rows, n_trees, depth, isa)
//       -> (y (T, d), nodes (T, K, D+1) int64 global ids, logits (T, K, D+1))
//   fff_cpu_train_backward(grad_y, x, w_in, w_out_rows, nodes, logits, n_trees, depth, isa)
//       -> (grad_x (T, d), grad_w_in (K*N, d), grad_b_in (K*N,), grad_w_out (d, K*N))
//       (grad_w_out in linear_out.weight's layout, written directly: no transposed copy)
// All float32, contiguous; w_out_rows is linear_out.weight transposed; isa 2 = AVX-512,
// 1 = AVX2 (fff_cpu_isa() says which this CPU runs).
//
// Threads come from torch's pool (at::parallel_for). The per-token work (the walk, y, the
// activation gradients and dx) is split by tokens; the weight gradients are computed node by
// node (tokens grouped by node with a counting sort), each (node, column block) owned by one
// task, so no two threads write the same row and no per-thread partial sums are needed. The
// tasks are balanced by the number of tokens each node serves.
#include "fff_cpu_kernel.h"  // vector ops per instruction set, Isa, gelu, empty_cpu

namespace {

// One call's data as raw pointers (at::parallel_for bodies must not touch Tensors).
struct TrainProblem {
  const float* x;       // (T, d)
  const float* w_in;    // (M, d), M = K*N
  const float* b_in;    // (M,)
  const float* w_out;   // (M, d) output rows
  int64_t d, n_trees, depth;
  int64_t* nodes;       // (T, P), P = K*(D+1): tree-major, level order
  float* logits;        // (T, P)
  float* y = nullptr;   // (T, d)  forward
  const float* dy = nullptr;  // (T, d)  backward from here on
  float* g = nullptr;   // (T, P) logit gradients
  float* a = nullptr;   // (T, P) activations GELU(logit)
  float* dx = nullptr;  // (T, d)
  float* dw_in = nullptr;   // (M, d)
  float* dw_out = nullptr;  // (d, M): linear_out.weight's layout
  int64_t m = 0;            // M
};

// The (token, p) pairs of a call grouped by node: node n's entries are [start[n], start[n+1]),
// in token order, each with its token, logit gradient and activation.
struct NodeEntries {
  std::vector<int64_t> start;
  int64_t* token;
  float* g;
  float* a;
};

// A backward call's buffers (24 bytes per (token, node) pair). Up to kKeepPairs pairs they are
// the calling thread's, reused from call to call: a fresh multi-megabyte buffer costs page faults
// (and zero-filling) on every call, which on this project's VMs cost as much as the loops that
// fill it. Each thread that calls the ops has its own (the ops may run concurrently). Larger calls
// get buffers of their own, freed on return, so no thread keeps more than ~50 MB.
constexpr int64_t kKeepPairs = int64_t{1} << 21;

struct Scratch {
  std::vector<float> g, a, entry_g, entry_a;
  std::vector<int64_t> entry_token;
};

Scratch& kept_scratch() {
  thread_local Scratch s;
  return s;
}

// v's storage, grown to at least n elements (contents unspecified).
template <class T>
T* at_least(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Tokens walked together by the forward (their trees' dot products are independent chains).
constexpr int64_t kGroup = 4;
// Multiply-adds per parallel task, at least (as the inference kernel's default grain).
constexpr int64_t kGrain = int64_t{1} << 18;
// Weight-gradient tasks per thread (balanced by tokens served; more tasks, finer balance).
constexpr int64_t kTasksPerThread = 4;

using TokenFn = void (*)(const TrainProblem&, int64_t, int64_t);
using NodeFn = void (*)(const TrainProblem&, const NodeEntries&, int64_t, int64_t);

// An instruction set's entry points: forward(pb, t0, t1) and tokens(pb, t0, t1) for tokens
// [t0, t1); node(pb, entries, n, cb) for column block cb (`width` floats) of node n's rows.
struct TrainRuns {
  TokenFn forward, tokens;
  NodeFn node;
  int64_t width;
};

// The derivative of the exact (erf) GELU (fff_cpu_kernel.h's gelu): Phi(z) + z phi(z), on
// scalars: K*(D+1) per token.
inline float gelu_grad(float z) {
  return 0.5f * (1.0f + std::erf(z * 0.70710678118654752440f)) +
         z * std::exp(-0.5f * z * z) * 0.39894228040143267794f;
}

// The walks per instruction set over fff_cpu_kernel.h's vector ops (the inference kernel's), with
// this file's block sizes.
namespace train_avx512 {
#define FFF_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

struct V : avx512::V {
  static constexpr int64_t kRowsBlock = 4;  // vectors per column block of a sum of rows
  static constexpr int64_t kNodeBlock = 8;  // ... of a node's two gradient rows (16 registers)
};

#include "fff_cpu_train_walk.h"
#undef FFF_TARGET
}  // namespace train_avx512

namespace train_avx2 {
#define FFF_TARGET __attribute__((target("avx2,fma")))

struct V : avx2::V {
  static constexpr int64_t kRowsBlock = 4;
  static constexpr int64_t kNodeBlock = 4;  // 8 accumulators of 16 registers
};

#include "fff_cpu_train_walk.h"
#undef FFF_TARGET
}  // namespace train_avx2

bool cpu_runs(int64_t isa) {
  __builtin_cpu_init();
  if (isa == kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }
  return isa == kAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

TrainRuns pick(int64_t isa) { return isa == kAvx512 ? train_avx512::runs() : train_avx2::runs(); }

void check_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.is_contiguous() && t.size(0) == rows && t.size(1) == cols,
              "fff_cpu_train: ", name, " must be a contiguous (", rows, ", ", cols,
              ") float32 CPU tensor");
}

// The arguments both ops share, checked before anything is allocated or read.
void check_common(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out,
                  int64_t n_trees, int64_t depth, int64_t isa) {
  TORCH_CHECK(isa == kAvx2 || isa == kAvx512, "fff_cpu_train: isa must be 1 (avx2) or 2 "
              "(avx512), got ", isa);
  TORCH_CHECK(cpu_runs(isa), "fff_cpu_train: this CPU does not support instruction set ", isa);
  TORCH_CHECK(n_trees >= 1 && depth >= 0 && depth <= 40, "fff_cpu_train: bad tree shape ",
              n_trees, "x", depth);
  TORCH_CHECK(x.dim() == 2, "fff_cpu_train: x must be 2-D (tokens, d)");
  const int64_t rows = n_trees * ((int64_t{2} << depth) - 1);
  check_matrix(x, x.size(0), x.size(1), "x");
  check_matrix(w_in, rows, x.size(1), "w_in");
  check_matrix(w_out, rows, x.size(1), "w_out_rows");
}

// Tokens per parallel task: at least kGrain multiply-adds each.
int64_t token_grain(int64_t work_per_token) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, work_per_token));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fff_cpu_train_forward(
    const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& b_in, const at::Tensor& w_out,
    int64_t n_trees, int64_t depth, int64_t isa) {
  check_common(x, w_in, w_out, n_trees, depth, isa);
  TORCH_CHECK(b_in.device().is_cpu() && b_in.scalar_type() == at::kFloat && b_in.dim() == 1 &&
                  b_in.is_contiguous() && b_in.size(0) == w_in.size(0),
              "fff_cpu_train: b_in must be a contiguous (", w_in.size(0), ",) float32 tensor");
  const int64_t T = x.size(0), d = x.size(1), L = depth + 1;
  at::Tensor y = empty_cpu({T, d}, at::kFloat);
  at::Tensor nodes = at::detail::empty_cpu({T, n_trees, L}, at::kLong);
  at::Tensor logits = empty_cpu({T, n_trees, L}, at::kFloat);
  TrainProblem pb{x.data_ptr<float>(), w_in.data_ptr<float>(), b_in.data_ptr<float>(),
                  w_out.data_ptr<float>(), d, n_trees, depth, nodes.data_ptr<int64_t>(),
                  logits.data_ptr<float>()};
  pb.y = y.data_ptr<float>();
  const TokenFn run = pick(isa).forward;
  at::parallel_for(0, T, token_grain(2 * n_trees * L * d),
                   [&](int64_t t0, int64_t t1) { run(pb, t0, t1); });
  return {y, nodes, logits};
}

// The pairs grouped by node (NodeEntries), one tree per task: each token visits exactly L nodes
// of each tree, so tree k's entries are the fixed range [k*T*L, (k+1)*T*L).
NodeEntries group_by_node(const TrainProblem& pb, int64_t T, Scratch& s) {
  const int64_t K = pb.n_trees, L = pb.depth + 1, P = K * L;
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1;
  NodeEntries ne;
  ne.start.assign(K * n_nodes + 1, 0);
  ne.token = at_least(s.entry_token, T * P);
  ne.g = at_least(s.entry_g, T * P);
  ne.a = at_least(s.entry_a, T * P);
  at::parallel_for(0, K, token_grain(T * L * 8), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t* start = ne.start.data() + k * n_nodes;  // start[i + 1] counts local node i
      for (int64_t t = 0; t < T; ++t)
        for (int64_t l = 0; l < L; ++l) ++start[pb.nodes[t * P + k * L + l] - k * n_nodes + 1];
      std::vector<int64_t> next(n_nodes);
      int64_t at = k * T * L;
      for (int64_t i = 0; i < n_nodes; ++i) {
        next[i] = at;
        at += start[i + 1];
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t l = 0; l < L; ++l) {
          const int64_t p = t * P + k * L + l;
          const int64_t e = next[pb.nodes[p] - k * n_nodes]++;
          ne.token[e] = t;
          ne.g[e] = pb.g[p];
          ne.a[e] = pb.a[p];
        }
      }
    }
  });
  for (int64_t n = 0; n + 1 < static_cast<int64_t>(ne.start.size()); ++n)
    ne.start[n + 1] += ne.start[n];  // counts -> starts (trees' ranges follow each other)
  return ne;
}

// The weight gradients: tasks of (column block, node) items in column-block-major order, split
// so that every task serves about the same number of (token, node) entries (+1 per item for its
// stores), then db from each node's entries in token order.
void weight_gradients(const TrainProblem& pb, const NodeEntries& ne, const NodeFn node_fn,
                      int64_t width, float* db) {
  const int64_t M = static_cast<int64_t>(ne.start.size()) - 1;
  const int64_t n_blocks = (pb.d + width - 1) / width;
  std::vector<int64_t> cost(M + 1, 0);  // cost[n]: items 0..n-1 of one column block
  for (int64_t n = 0; n < M; ++n) cost[n + 1] = cost[n] + (ne.start[n + 1] - ne.start[n]) + 1;
  const int64_t per_block = cost[M], total = n_blocks * per_block;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(
      at::get_num_threads() * kTasksPerThread, total / std::max<int64_t>(1, kGrain / width)));
  at::parallel_for(0, tasks, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t lo = total * q / tasks, hi = total * (q + 1) / tasks;  // [lo, hi) of cost
      for (int64_t cb = lo / per_block; cb < n_blocks && cb * per_block < hi; ++cb) {
        const int64_t a = std::max<int64_t>(lo - cb * per_block, 0);
        const int64_t b = std::min<int64_t>(hi - cb * per_block, per_block);
        // the items whose cost starts in [a, b)
        int64_t n = std::lower_bound(cost.begin(), cost.end() - 1, a) - cost.begin();
        for (; n < M && cost[n] < b; ++n) node_fn(pb, ne, n, cb);
      }
    }
  });
  at::parallel_for(0, M, 4096, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.0f;
      for (int64_t e = ne.start[n]; e < ne.start[n + 1]; ++e) s += ne.g[e];
      db[n] = s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fff_cpu_train_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_in,
    const at::Tensor& w_out, const at::Tensor& nodes, const at::Tensor& logits, int64_t n_trees,
    int64_t depth, int64_t isa) {
  check_common(x, w_in, w_out, n_trees, depth, isa);
  const int64_t T = x.size(0), d = x.size(1), L = depth + 1, P = n_trees * L;
  const int64_t M = w_in.size(0);
  check_matrix(grad_y, T, d, "grad_y");
  TORCH_CHECK(nodes.device().is_cpu() && nodes.scalar_type() == at::kLong &&
                  nodes.is_contiguous() && nodes.numel() == T * P,
              "fff_cpu_train: nodes must be contiguous int64 (T, K, D+1)");
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat &&
                  logits.is_contiguous() && logits.numel() == T * P,
              "fff_cpu_train: logits must be contiguous float32 (T, K, D+1)");
  const int64_t* ids = nodes.data_ptr<int64_t>();
  const int64_t n_nodes = (int64_t{2} << depth) - 1;
  bool ok = true;  // a bad id would write outside the gradients
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < n_trees; ++k)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t id = ids[t * P + k * L + l];
        ok &= id >= k * n_nodes && id < (k + 1) * n_nodes;
      }
  TORCH_CHECK(ok, "fff_cpu_train: a node id is not in its tree's range (nodes must come from "
              "fff_cpu_train_forward)");
  at::Tensor dx = empty_cpu({T, d}, at::kFloat);
  at::Tensor dw_in = empty_cpu({M, d}, at::kFloat);
  at::Tensor db = empty_cpu({M}, at::kFloat);
  at::Tensor dw_out = empty_cpu({d, M}, at::kFloat);
  TrainProblem pb{x.data_ptr<float>(), w_in.data_ptr<float>(), nullptr, w_out.data_ptr<float>(),
                  d, n_trees, depth, nodes.data_ptr<int64_t>(), logits.data_ptr<float>()};
  pb.dy = grad_y.data_ptr<float>();
  Scratch own;
  Scratch& s = T * P <= kKeepPairs ? kept_scratch() : own;
  pb.g = at_least(s.g, T * P);
  pb.a = at_least(s.a, T * P);
  pb.dx = dx.data_ptr<float>();
  pb.dw_in = dw_in.data_ptr<float>();
  pb.dw_out = dw_out.data_ptr<float>();
  pb.m = M;
  const TrainRuns runs = pick(isa);
  at::parallel_for(0, T, token_grain(2 * P * d),
                   [&](int64_t t0, int64_t t1) { runs.tokens(pb, t0, t1); });
  const NodeEntries ne = group_by_node(pb, T, s);
  weight_gradients(pb, ne, runs.node, runs.width, db.data_ptr<float>());
  return {dx, dw_in, db, dw_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ultrafastbert, m) {
  m.def("fff_cpu_train_forward(Tensor x, Tensor w_in, Tensor b_in, Tensor w_out, int n_trees, "
        "int depth, int isa) -> (Tensor, Tensor, Tensor)",
        &fff_cpu_train_forward);
  m.def("fff_cpu_train_backward(Tensor grad_y, Tensor x, Tensor w_in, Tensor w_out, "
        "Tensor nodes, Tensor logits, int n_trees, int depth, int isa) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &fff_cpu_train_backward);
}
