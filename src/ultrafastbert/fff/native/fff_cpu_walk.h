// The FFF tree walk and output pass, written once and compiled once per instruction set.
//
// fff_cpu.cpp includes this file inside `namespace avx512 { ... }` and `namespace avx2 { ... }`
// after defining, in that namespace, `struct V` (the vector operations of that instruction set)
// and the macro FFF_TARGET (the matching `__attribute__((target(...)))`). Every function here
// carries FFF_TARGET so the compiler may use that instruction set in it and inline V into it;
// nothing outside these functions is compiled for it, so an AVX2-only CPU never meets an
// AVX-512 instruction. No includes here: fff_cpu.cpp includes everything first.

// logits[i] = x[i] . w[i] for G (token, row) pairs, rows of length d, with V::kAcc accumulators
// per pair: enough independent FMA chains for a lone token (the 1-token latency) and, with four
// tokens, for the FMA latency. The order of operations does not depend on G, so a token's
// result does not depend on the batch around it.
template <class Tw, int G>
FFF_TARGET static void dot_group(const float* const* x, const Tw* const* w, int64_t d,
                                 float* logits) {
  constexpr int A = V::kAcc;
  typename V::R acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = V::zero();
  int64_t k = 0;
  for (; k + A * V::W <= d; k += A * V::W) {
    for (int i = 0; i < G; ++i)
      for (int a = 0; a < A; ++a)
        acc[i][a] = V::fma(V::load(x[i] + k + a * V::W), V::load(w[i] + k + a * V::W), acc[i][a]);
  }
  for (int a = 0; k < d; k += V::W, ++a) {  // the last < A vectors, the final one partial
    const int n = d - k < V::W ? static_cast<int>(d - k) : V::W;
    for (int i = 0; i < G; ++i)
      acc[i][a] = V::fma(V::load_n(x[i] + k, n), V::load_n(w[i] + k, n), acc[i][a]);
  }
  for (int i = 0; i < G; ++i) {
    for (int a = 1; a < A; ++a) acc[i][0] = V::add(acc[i][0], acc[i][a]);
    logits[i] = V::sum(acc[i][0]);
  }
}

// Ask for a whole row to be brought towards L2 (the hardware prefetcher then needs no warm-up).
template <class T>
FFF_TARGET static void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
}

// Levels [first, last) of one tree for a group of G tokens, level-synchronously: all G tokens
// take level l before any takes level l+1. local[i] is token i's tree-local node on entry and
// on exit. Writes act[i][p] = GELU(logit) and node[i][p] = global node id at path position
// p = tree*(D+1) + level. Only dot products, bias and GELU happen here; the output rows are
// applied afterwards in one pass (apply_output).
template <class Tin, class Tout, int G>
FFF_TARGET static void walk_levels(const Problem& pb, const float* const* x, int64_t tree,
                                   int64_t first, int64_t last, int64_t* local,
                                   float* const* act, int64_t* const* node) {
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1;
  const int64_t path = pb.depth + 1;
  const Tin* w_in = static_cast<const Tin*>(pb.w_in);
  const Tout* w_out = static_cast<const Tout*>(pb.w_out);
  for (int64_t level = first; level < last; ++level) {
    const Tin* rows[G];
    int64_t ids[G];
    for (int i = 0; i < G; ++i) {
      ids[i] = tree * n_nodes + local[i];
      rows[i] = w_in + ids[i] * pb.d;
      if (pb.prefetch_out) prefetch_row(w_out + ids[i] * pb.d, pb.d);
    }
    float logits[G];
    dot_group<Tin, G>(x, rows, pb.d, logits);
    for (int i = 0; i < G; ++i) {
      const float z = logits[i] + pb.b_in[ids[i]];
      act[i][tree * path + level] = gelu(z);
      node[i][tree * path + level] = ids[i];
      // Right iff z > 0: an exact 0 and NaN go left (the comparison is false for both).
      local[i] = 2 * local[i] + 1 + (z > 0.0f ? 1 : 0);
    }
  }
}

// y[0:d] = sum_p act[p] * w_out[node[p], 0:d] for one token: each output tile is held in
// registers across all P rows and stored once.
template <class Tw>
FFF_TARGET static void apply_output(const float* act, const int64_t* node, int64_t P,
                                    const Tw* w_out, int64_t d, float* y) {
  constexpr int kTile = 8;  // vectors per tile: 8 independent FMA chains
  int64_t k = 0;
  for (; k + kTile * V::W <= d; k += kTile * V::W) {
    typename V::R acc[kTile];
    for (int j = 0; j < kTile; ++j) acc[j] = V::zero();
    for (int64_t p = 0; p < P; ++p) {
      const typename V::R a = V::set1(act[p]);
      const Tw* row = w_out + node[p] * d + k;
      for (int j = 0; j < kTile; ++j) acc[j] = V::fma(a, V::load(row + j * V::W), acc[j]);
    }
    for (int j = 0; j < kTile; ++j) V::store(y + k + j * V::W, acc[j]);
  }
  for (; k < d; k += V::W) {
    const int n = d - k < V::W ? static_cast<int>(d - k) : V::W;
    typename V::R acc = V::zero();
    for (int64_t p = 0; p < P; ++p) {
      acc = V::fma(V::set1(act[p]), V::load_n(w_out + node[p] * d + k, n), acc);
    }
    V::store_n(y + k, acc, n);
  }
}

// Groups of G tokens from [t0, t1): walk a group through every tree, then apply each valid
// token's output while its activations are still in L1. A short last group repeats a valid
// token's input so the walk stays branch-free; only valid tokens are written.
template <class Tin, class Tout, int G>
FFF_TARGET static void run_groups(const Problem& pb, int64_t t0, int64_t t1, float* act,
                                  int64_t* node) {
  const int64_t path = pb.depth + 1;
  const int64_t P = pb.n_trees * path;
  const Tout* w_out = static_cast<const Tout*>(pb.w_out);
  float* acts[G];
  int64_t* nodes[G];
  for (int i = 0; i < G; ++i) {
    acts[i] = act + i * P;
    nodes[i] = node + i * P;
  }
  for (int64_t t = t0; t < t1; t += G) {
    const int valid = static_cast<int>(t1 - t < G ? t1 - t : G);
    const float* x[G];
    for (int i = 0; i < G; ++i) x[i] = pb.x + (t + (i < valid ? i : 0)) * pb.d;
    for (int64_t tree = 0; tree < pb.n_trees; ++tree) {
      int64_t local[G] = {};
      walk_levels<Tin, Tout, G>(pb, x, tree, 0, path, local, acts, nodes);
    }
    for (int i = 0; i < valid; ++i) {
      apply_output<Tout>(acts[i], nodes[i], P, w_out, pb.d, pb.y + (t + i) * pb.d);
      if (pb.nodes != nullptr) std::memcpy(pb.nodes + (t + i) * P, nodes[i], P * sizeof(int64_t));
    }
  }
}

// One tree (K = 1) over many tokens, in two phases so that the deep rows are reused while
// cached. The top `split` levels (few nodes, cached anyway) are walked in token order; tokens are
// then grouped by the node they reached (a counting sort), and the deep levels and the output are
// done bucket by bucket: a bucket's tokens share a small subtree (kDeepLevels levels, ~30 nodes
// for 1x11), whose rows are fetched once per bucket instead of once per token. Each token still
// sees exactly the same operations, so results are bit-identical to run_groups.
template <class Tin, class Tout>
FFF_TARGET static void run_bucketed(const Problem& pb, int64_t t0, int64_t t1) {
  const int64_t n = t1 - t0, P = pb.depth + 1, split = P - kDeepLevels;
  std::vector<float> act(n * P);
  std::vector<int64_t> node(n * P), local(n);
  float* acts[kGroup];
  int64_t* nodes[kGroup];
  const float* x[kGroup];
  for (int64_t t = 0; t < n; t += kGroup) {  // phase 1: top levels, token order
    int64_t loc[kGroup] = {};
    for (int i = 0; i < kGroup; ++i) {
      const int64_t j = t + i < n ? t + i : t;  // a short last group repeats token t
      x[i] = pb.x + (t0 + j) * pb.d;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
    }
    walk_levels<Tin, Tout, kGroup>(pb, x, 0, 0, split, loc, acts, nodes);
    for (int i = 0; i < kGroup && t + i < n; ++i) local[t + i] = loc[i];
  }
  const std::vector<int64_t> order = bucket_order(local, split);
  const Tout* w_out = static_cast<const Tout*>(pb.w_out);
  for (int64_t b = 0; b < n; b += kGroup) {  // phase 2: deep levels and output, bucket order
    int64_t loc[kGroup];
    for (int i = 0; i < kGroup; ++i) {
      const int64_t j = order[b + i < n ? b + i : b];
      x[i] = pb.x + (t0 + j) * pb.d;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
      loc[i] = local[j];
    }
    walk_levels<Tin, Tout, kGroup>(pb, x, 0, split, P, loc, acts, nodes);
    for (int i = 0; i < kGroup && b + i < n; ++i) {
      const int64_t j = order[b + i];
      apply_output<Tout>(acts[i], nodes[i], P, w_out, pb.d, pb.y + (t0 + j) * pb.d);
    }
  }
  if (pb.nodes != nullptr) std::memcpy(pb.nodes + t0 * P, node.data(), n * P * sizeof(int64_t));
}

// Tokens [t0, t1) of the problem: bucketed when one deep tree meets many tokens, else in groups
// of kGroup; a lone token (a 1-token call) walks alone rather than as four copies of itself.
template <class Tin, class Tout>
FFF_TARGET static void run_tokens(const Problem& pb, int64_t t0, int64_t t1) {
  if (use_buckets(pb, t1 - t0)) {
    run_bucketed<Tin, Tout>(pb, t0, t1);
    return;
  }
  const int64_t P = pb.n_trees * (pb.depth + 1);
  std::vector<float> act(kGroup * P);
  std::vector<int64_t> node(kGroup * P);
  if (t1 - t0 == 1) {
    run_groups<Tin, Tout, 1>(pb, t0, t1, act.data(), node.data());
  } else {
    run_groups<Tin, Tout, kGroup>(pb, t0, t1, act.data(), node.data());
  }
}

// The entry point of this instruction set: picks the weight types once per call.
static RunFn pick_run(bool in_bf16, bool out_bf16) {
  if (in_bf16) return out_bf16 ? &run_tokens<uint16_t, uint16_t> : &run_tokens<uint16_t, float>;
  return out_bf16 ? &run_tokens<float, uint16_t> : &run_tokens<float, float>;
}
