// The bf16 FFF tree walk and output pass, written once and compiled once per instruction set.
//
// fff_cpu_bf16.cpp includes this file inside `namespace bf16_dp`, `namespace bf16_avx512` and
// `namespace bf16_avx2` after defining there `struct B` (the instruction set's operations) and
// FFF_BF16_TARGET (the matching target attribute). Inputs, weights and outputs are bf16 bit
// patterns (uint16_t); logits, activations and output sums are fp32. No includes here.

// logits[i] = x[i] . w[i] for G (token, row) pairs of length d: B::kAcc accumulators per pair,
// each step consuming B::kStep elements. The operations do not depend on G, so a token's result
// does not depend on the tokens walked beside it.
template <int G>
FFF_BF16_TARGET static void dot_group(const uint16_t* const* x, const uint16_t* const* w,
                                      int64_t d, float* logits) {
  constexpr int A = B::kAcc, S = B::kStep;
  typename B::Acc acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = B::zero();
  int64_t k = 0;
  for (; k + A * S <= d; k += A * S) {
    for (int i = 0; i < G; ++i)
      for (int a = 0; a < A; ++a)
        acc[i][a] = B::dot(acc[i][a], x[i] + k + a * S, w[i] + k + a * S);
  }
  for (int a = 0; k < d; k += S, ++a) {  // the last < A steps, the final one partial
    const int n = d - k < S ? static_cast<int>(d - k) : S;
    for (int i = 0; i < G; ++i) acc[i][a] = B::dot_n(acc[i][a], x[i] + k, w[i] + k, n);
  }
  for (int i = 0; i < G; ++i) logits[i] = B::sum(acc[i]);
}

// Ask for a whole row to be brought towards L2 (the hardware prefetcher then needs no warm-up).
FFF_BF16_TARGET static void prefetch_row(const uint16_t* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * 2; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
}

// Levels [first, last) of tree `tree` for G tokens, level-synchronously. local[i]: token i's
// tree-local node on entry and exit. Writes act[i][p] = GELU(logit) and node[i][p] = global id
// at path position p = tree*(D+1) + level.
template <int G>
FFF_BF16_TARGET static void walk_levels(const Bf16Problem& pb, const uint16_t* const* x,
                                        int64_t tree, int64_t first, int64_t last,
                                        int64_t* local, float* const* act,
                                        int64_t* const* node) {
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1, path = pb.depth + 1;
  for (int64_t level = first; level < last; ++level) {
    const uint16_t* rows[G];
    int64_t ids[G];
    for (int i = 0; i < G; ++i) {
      ids[i] = tree * n_nodes + local[i];
      rows[i] = pb.w_in + ids[i] * pb.d;
      if (pb.prefetch_out) prefetch_row(pb.w_out + ids[i] * pb.d, pb.d);
    }
    float logits[G];
    dot_group<G>(x, rows, pb.d, logits);
    for (int i = 0; i < G; ++i) {
      const float z = logits[i] + pb.b_in[ids[i]];
      act[i][tree * path + level] = gelu_bf16(z);
      node[i][tree * path + level] = ids[i];
      local[i] = 2 * local[i] + 1 + (z > 0.0f ? 1 : 0);  // exact 0 and NaN go left
    }
  }
}

// y[0:d] = bf16(sum_p act[p] * w_out[node[p], 0:d]) for one token, fp32 sums held in registers
// across all P rows, rounded to bf16 (nearest even) once.
FFF_BF16_TARGET static void apply_output(const float* act, const int64_t* node, int64_t P,
                                         const uint16_t* w_out, int64_t d, uint16_t* y) {
  constexpr int kTile = 8, W = B::W;
  int64_t k = 0;
  for (; k + kTile * W <= d; k += kTile * W) {
    typename B::F acc[kTile];
    for (int j = 0; j < kTile; ++j) acc[j] = B::fzero();
    for (int64_t p = 0; p < P; ++p) {
      const typename B::F a = B::set1(act[p]);
      const uint16_t* row = w_out + node[p] * d + k;
      for (int j = 0; j < kTile; ++j) acc[j] = B::fma(a, B::widen(row + j * W), acc[j]);
    }
    for (int j = 0; j < kTile; ++j) B::store_bf16(y + k + j * W, acc[j]);
  }
  for (; k < d; k += W) {
    const int n = d - k < W ? static_cast<int>(d - k) : W;
    typename B::F acc = B::fzero();
    for (int64_t p = 0; p < P; ++p) {
      acc = B::fma(B::set1(act[p]), B::widen_n(w_out + node[p] * d + k, n), acc);
    }
    B::store_bf16_n(y + k, acc, n);
  }
}

// Tokens [t0, t1) in groups of G: walk a group through every tree, then write each valid
// token's output. A short last group repeats a valid token so the walk stays branch-free.
template <int G>
FFF_BF16_TARGET static void run_groups(const Bf16Problem& pb, int64_t t0, int64_t t1) {
  const int64_t path = pb.depth + 1, P = pb.n_trees * path;
  std::vector<float> act_buf(G * P);
  std::vector<int64_t> node_buf(G * P);
  float* acts[G];
  int64_t* nodes[G];
  for (int i = 0; i < G; ++i) {
    acts[i] = act_buf.data() + i * P;
    nodes[i] = node_buf.data() + i * P;
  }
  for (int64_t t = t0; t < t1; t += G) {
    const int valid = static_cast<int>(t1 - t < G ? t1 - t : G);
    const uint16_t* x[G];
    for (int i = 0; i < G; ++i) x[i] = pb.x + (t + (i < valid ? i : 0)) * pb.d;
    for (int64_t tree = 0; tree < pb.n_trees; ++tree) {
      int64_t local[G] = {};
      walk_levels<G>(pb, x, tree, 0, path, local, acts, nodes);
    }
    for (int i = 0; i < valid; ++i) {
      apply_output(acts[i], nodes[i], P, pb.w_out, pb.d, pb.y + (t + i) * pb.d);
      if (pb.nodes != nullptr) std::memcpy(pb.nodes + (t + i) * P, nodes[i], P * sizeof(int64_t));
    }
  }
}

// One deep tree over many tokens in two phases (as the fp32 kernel does): the top levels in
// token order, then the tokens sorted by the node they reached, so that each small subtree's
// rows are fetched once per bucket of tokens rather than once per token. Every token sees the
// same operations as in run_groups, so results are bit-identical to it.
FFF_BF16_TARGET static void run_bucketed(const Bf16Problem& pb, int64_t t0, int64_t t1) {
  constexpr int G = kBf16Group;
  const int64_t n = t1 - t0, P = pb.depth + 1, split = P - kBf16DeepLevels;
  std::vector<float> act(n * P);
  std::vector<int64_t> node(n * P), local(n);
  float* acts[G];
  int64_t* nodes[G];
  const uint16_t* x[G];
  for (int64_t t = 0; t < n; t += G) {  // phase 1: top levels, token order
    int64_t loc[G] = {};
    for (int i = 0; i < G; ++i) {
      const int64_t j = t + i < n ? t + i : t;
      x[i] = pb.x + (t0 + j) * pb.d;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
    }
    walk_levels<G>(pb, x, 0, 0, split, loc, acts, nodes);
    for (int i = 0; i < G && t + i < n; ++i) local[t + i] = loc[i];
  }
  const std::vector<int64_t> order = bf16_bucket_order(local, split);
  for (int64_t b = 0; b < n; b += G) {  // phase 2: deep levels and output, bucket order
    int64_t loc[G];
    for (int i = 0; i < G; ++i) {
      const int64_t j = order[b + i < n ? b + i : b];
      x[i] = pb.x + (t0 + j) * pb.d;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
      loc[i] = local[j];
    }
    walk_levels<G>(pb, x, 0, split, P, loc, acts, nodes);
    for (int i = 0; i < G && b + i < n; ++i) {
      const int64_t j = order[b + i];
      apply_output(acts[i], nodes[i], P, pb.w_out, pb.d, pb.y + (t0 + j) * pb.d);
    }
  }
  if (pb.nodes != nullptr) std::memcpy(pb.nodes + t0 * P, node.data(), n * P * sizeof(int64_t));
}

// Tokens [t0, t1): bucketed for one deep tree and many tokens, a lone token alone, else groups.
FFF_BF16_TARGET static void run_tokens(const Bf16Problem& pb, int64_t t0, int64_t t1) {
  if (bf16_use_buckets(pb, t1 - t0)) {
    run_bucketed(pb, t0, t1);
  } else if (t1 - t0 == 1) {
    run_groups<1>(pb, t0, t1);
  } else {
    run_groups<kBf16Group>(pb, t0, t1);
  }
}
