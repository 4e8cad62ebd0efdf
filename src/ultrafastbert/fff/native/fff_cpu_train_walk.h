// The FFF training kernel's loops, written once and compiled once per instruction set.
//
// fff_cpu_train.cpp includes this file inside `namespace train_avx512 { ... }` and
// `namespace train_avx2 { ... }` after defining, in that namespace, `struct V` (the vector
// operations of that instruction set) and the macro FFF_TARGET (the matching
// `__attribute__((target(...)))`). Every function here carries FFF_TARGET so the compiler may use
// that instruction set in it; an AVX2-only CPU never meets an AVX-512 instruction. No includes
// here: fff_cpu_train.cpp includes everything first.
//
// Every (token, node) pair's dot product and every token's sum of rows is computed with the same
// operations in the same order whatever the batch, the grouping or the thread count, and each
// node's gradient row sums its tokens in token order: results do not depend on the threads.

// out[i] = x[i] . w[i] for N (token, row) pairs, rows of length d, 2 accumulators per pair.
// Shared: all pairs have the same x (one token's rows), loaded once per vector for the N rows.
template <int N, bool Shared>
FFF_TARGET static void dots(const float* const* x, const float* const* w, int64_t d,
                            float* out) {
  constexpr int A = 2;
  typename V::R acc[N][A];
  for (int i = 0; i < N; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = V::zero();
  int64_t k = 0;
  for (; k + A * V::W <= d; k += A * V::W) {
    for (int a = 0; a < A; ++a) {
      const typename V::R xs = V::load(x[0] + k + a * V::W);
      for (int i = 0; i < N; ++i) {
        const typename V::R xv = Shared ? xs : V::load(x[i] + k + a * V::W);
        acc[i][a] = V::fma(xv, V::load(w[i] + k + a * V::W), acc[i][a]);
      }
    }
  }
  for (int a = 0; k < d; k += V::W, ++a) {  // fewer than A vectors left, the last one partial
    const int n = d - k < V::W ? static_cast<int>(d - k) : V::W;
    for (int i = 0; i < N; ++i)
      acc[i][a] = V::fma(V::load_n(x[Shared ? 0 : i] + k, n), V::load_n(w[i] + k, n), acc[i][a]);
  }
  for (int i = 0; i < N; ++i) out[i] = V::sum(V::add(acc[i][0], acc[i][1]));
}

// dots() for n <= 4 pairs, the count as a template argument.
FFF_TARGET static void dots_n(const float* const* x, const float* const* w, int n, bool shared,
                              int64_t d, float* out) {
  if (shared) {
    switch (n) {
      case 4: dots<4, true>(x, w, d, out); return;
      case 3: dots<3, true>(x, w, d, out); return;
      case 2: dots<2, true>(x, w, d, out); return;
      default: dots<1, true>(x, w, d, out); return;
    }
  }
  switch (n) {
    case 4: dots<4, false>(x, w, d, out); return;
    case 3: dots<3, false>(x, w, d, out); return;
    case 2: dots<2, false>(x, w, d, out); return;
    default: dots<1, false>(x, w, d, out); return;
  }
}

// out[c0 : c0 + NV*W] (the last vector `tail` floats when Tail) = sum_i coef[i] * rows[i][...]
// over n rows, accumulated in registers in row order.
template <int NV, bool Tail>
FFF_TARGET static void rows_block(const float* coef, const float* const* rows, int64_t n,
                                  int64_t c0, int tail, float* out) {
  typename V::R acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = V::zero();
  for (int64_t i = 0; i < n; ++i) {
    const typename V::R c = V::set1(coef[i]);
    const float* r = rows[i] + c0;
    for (int v = 0; v < NV; ++v) {
      const typename V::R rv = (Tail && v == NV - 1) ? V::load_n(r + v * V::W, tail)
                                                     : V::load(r + v * V::W);
      acc[v] = V::fma(c, rv, acc[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    if (Tail && v == NV - 1) V::store_n(out + c0 + v * V::W, acc[v], tail);
    else V::store(out + c0 + v * V::W, acc[v]);
  }
}

// The last, partial column block of rows_block: NV vectors (1..kRowsBlock), the last `tail`
// floats long (tail == W: a whole vector).
template <int NV>
FFF_TARGET static void rows_last(const float* coef, const float* const* rows, int64_t n,
                                 int64_t c0, int tail, float* out) {
  if (tail == V::W) rows_block<NV, false>(coef, rows, n, c0, tail, out);
  else rows_block<NV, true>(coef, rows, n, c0, tail, out);
}

// out (d) = sum_i coef[i] * rows[i] over n rows (y of a token, or its input gradient).
FFF_TARGET static void combine_rows(const float* coef, const float* const* rows, int64_t n,
                                    int64_t d, float* out) {
  constexpr int64_t B = V::kRowsBlock * V::W;
  int64_t c0 = 0;
  for (; c0 + B <= d; c0 += B) rows_block<V::kRowsBlock, false>(coef, rows, n, c0, V::W, out);
  if (c0 == d) return;
  const int64_t rest = d - c0, nv = (rest + V::W - 1) / V::W;
  const int tail = static_cast<int>(rest - (nv - 1) * V::W);
  switch (nv) {  // kRowsBlock <= 4
    case 1: rows_last<1>(coef, rows, n, c0, tail, out); break;
    case 2: rows_last<2>(coef, rows, n, c0, tail, out); break;
    case 3: rows_last<3>(coef, rows, n, c0, tail, out); break;
    default: rows_last<4>(coef, rows, n, c0, tail, out); break;
  }
}

// The forward walk of tokens [t0, t1), kGroup tokens at a time: every tree of every token of a
// group goes one level down before any goes further, in chunks of up to 4 (token, tree) pairs
// (4 independent dot products; the pairs of a chunk share x when they are one token's). Records
// each visited node and its logit (pre-activation), then y = sum GELU(logit) * w_out row.
FFF_TARGET static void forward_tokens(const TrainProblem& pb, int64_t t0, int64_t t1) {
  const int64_t d = pb.d, K = pb.n_trees, L = pb.depth + 1, P = K * L;
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1;
  std::vector<int64_t> local(kGroup * K);
  std::vector<const float*> rows(P);
  std::vector<float> act(P);
  for (int64_t g0 = t0; g0 < t1; g0 += kGroup) {
    const int64_t G = std::min(kGroup, t1 - g0);
    std::fill(local.begin(), local.end(), 0);
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t q0 = 0; q0 < G * K; q0 += 4) {  // pairs q = token * K + tree
        const int n = static_cast<int>(std::min<int64_t>(4, G * K - q0));
        const float* xs[4];
        const float* ws[4];
        int64_t ids[4];
        for (int i = 0; i < n; ++i) {
          const int64_t q = q0 + i, t = g0 + q / K, k = q % K;
          ids[i] = k * n_nodes + local[q];
          xs[i] = pb.x + t * d;
          ws[i] = pb.w_in + ids[i] * d;
        }
        float z[4];
        dots_n(xs, ws, n, xs[0] == xs[n - 1], d, z);
        for (int i = 0; i < n; ++i) {
          const int64_t q = q0 + i, t = g0 + q / K, k = q % K;
          const float logit = z[i] + pb.b_in[ids[i]];
          const int64_t at = t * P + k * L + l;
          pb.nodes[at] = ids[i];
          pb.logits[at] = logit;
          local[q] = 2 * local[q] + (logit > 0.0f ? 2 : 1);  // exact 0 and NaN go left
        }
      }
    }
    for (int64_t t = g0; t < g0 + G; ++t) {
      for (int64_t p = 0; p < P; ++p) {
        act[p] = gelu(pb.logits[t * P + p]);
        rows[p] = pb.w_out + pb.nodes[t * P + p] * d;
      }
      combine_rows(act.data(), rows.data(), P, d, pb.y + t * d);
    }
  }
}

// Backward, per token t in [t0, t1): the activation gradient of each visited node
// (dy . w_out row) times GELU'(logit) -> g[t, p]; GELU(logit) -> a[t, p]; and
// dx[t] = sum_p g[t, p] * w_in[node_p].
FFF_TARGET static void backward_tokens(const TrainProblem& pb, int64_t t0, int64_t t1) {
  const int64_t d = pb.d, P = pb.n_trees * (pb.depth + 1);
  std::vector<const float*> rows(P);
  for (int64_t t = t0; t < t1; ++t) {
    const float* dy = pb.dy + t * d;
    const int64_t* node = pb.nodes + t * P;
    float* g = pb.g + t * P;
    for (int64_t p0 = 0; p0 < P; p0 += 4) {
      const int n = static_cast<int>(std::min<int64_t>(4, P - p0));
      const float* xs[4] = {dy, dy, dy, dy};
      const float* ws[4];
      for (int i = 0; i < n; ++i) ws[i] = pb.w_out + node[p0 + i] * d;
      dots_n(xs, ws, n, true, d, g + p0);
    }
    for (int64_t p = 0; p < P; ++p) {
      const float z = pb.logits[t * P + p];
      g[p] *= gelu_grad(z);
      pb.a[t * P + p] = gelu(z);
      rows[p] = pb.w_in + node[p] * d;
    }
    combine_rows(g, rows.data(), P, d, pb.dx + t * d);
  }
}

// One node's gradients on columns [c0, c0 + NV*W) (the last vector `tail` floats when Tail):
// dW_in[n] = sum_e g_e * x[t_e] and dW_out[:, n] = sum_e a_e * dy[t_e] over the node's entries,
// in token order, accumulated in registers.
template <int NV, bool Tail>
FFF_TARGET static void node_block(const TrainProblem& pb, const NodeEntries& ne, int64_t n,
                                  int64_t c0, int tail) {
  typename V::R gin[NV], gout[NV];
  for (int v = 0; v < NV; ++v) gin[v] = gout[v] = V::zero();
  const int64_t d = pb.d;
  for (int64_t e = ne.start[n]; e < ne.start[n + 1]; ++e) {
    const float* x = pb.x + ne.token[e] * d + c0;
    const float* dy = pb.dy + ne.token[e] * d + c0;
    const typename V::R g = V::set1(ne.g[e]), a = V::set1(ne.a[e]);
    for (int v = 0; v < NV; ++v) {
      const bool part = Tail && v == NV - 1;
      gin[v] = V::fma(g, part ? V::load_n(x + v * V::W, tail) : V::load(x + v * V::W), gin[v]);
      gout[v] = V::fma(a, part ? V::load_n(dy + v * V::W, tail) : V::load(dy + v * V::W),
                       gout[v]);
    }
  }
  float* win = pb.dw_in + n * d + c0;
  alignas(64) float out[NV * V::W];
  for (int v = 0; v < NV; ++v) {
    V::store(out + v * V::W, gout[v]);
    if (Tail && v == NV - 1) V::store_n(win + v * V::W, gin[v], tail);
    else V::store(win + v * V::W, gin[v]);
  }
  // dW_out in linear_out.weight's own (d, M) layout: column n, rows c0.. (the task's next
  // nodes fill the rest of these cache lines, so no transposed copy is ever made).
  const int cols = (NV - 1) * V::W + (Tail ? tail : V::W);
  float* col = pb.dw_out + c0 * pb.m + n;
  for (int c = 0; c < cols; ++c) col[c * pb.m] = out[c];
}

template <int NV>
FFF_TARGET static void node_last(const TrainProblem& pb, const NodeEntries& ne, int64_t n,
                                 int64_t c0, int tail) {
  if (tail == V::W) node_block<NV, false>(pb, ne, n, c0, tail);
  else node_block<NV, true>(pb, ne, n, c0, tail);
}

// Column block `cb` (kNodeBlock vectors wide; the last one may be shorter) of node n's rows.
FFF_TARGET static void node_rows(const TrainProblem& pb, const NodeEntries& ne, int64_t n,
                                 int64_t cb) {
  constexpr int64_t B = V::kNodeBlock * V::W;
  const int64_t c0 = cb * B;
  if (c0 + B <= pb.d) {
    node_block<V::kNodeBlock, false>(pb, ne, n, c0, V::W);
    return;
  }
  const int64_t rest = pb.d - c0, nv = (rest + V::W - 1) / V::W;
  const int tail = static_cast<int>(rest - (nv - 1) * V::W);
  switch (nv) {  // kNodeBlock <= 8
    case 1: node_last<1>(pb, ne, n, c0, tail); break;
    case 2: node_last<2>(pb, ne, n, c0, tail); break;
    case 3: node_last<3>(pb, ne, n, c0, tail); break;
    case 4: node_last<4>(pb, ne, n, c0, tail); break;
    case 5: node_last<5>(pb, ne, n, c0, tail); break;
    case 6: node_last<6>(pb, ne, n, c0, tail); break;
    case 7: node_last<7>(pb, ne, n, c0, tail); break;
    default: node_last<8>(pb, ne, n, c0, tail); break;
  }
}

// The instruction set's entry points.
static TrainRuns runs() {
  return TrainRuns{&forward_tokens, &backward_tokens, &node_rows, V::kNodeBlock * V::W};
}
