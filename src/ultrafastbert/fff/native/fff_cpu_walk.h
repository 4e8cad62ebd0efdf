// The FFF tree walk and output pass, written once for every element type and compiled once per
// instruction set: the fp32 ops (fff_cpu.cpp), the bf16 ops (fff_cpu_bf16.cpp) and the int8-weight
// ops (fff_cpu_int8.cpp) all run it.
//
// fff_cpu_kernel.h includes this file inside `namespace avx512`, `namespace avx2` and (with a
// compiler that knows AVX512-BF16) `namespace avx512bf16`, after defining there `struct V` (that
// instruction set's fp32 vector operations: loads that widen bf16 to fp32 exactly, stores that
// round fp32 to bf16) and the macro FFF_TARGET (the matching `__attribute__((target(...)))`).
// Every function here carries FFF_TARGET so the compiler may use that instruction set in it and
// inline V into it; nothing outside these functions is compiled for it, so an AVX2-only CPU
// never meets an AVX-512 instruction. No includes here: fff_cpu_kernel.h includes everything.
//
// The walks are templates on E, an Elems: E::X the type of x and y (float, or bf16 bits as
// uint16_t), E::In that of the routing rows, E::Out that of the output rows. Logits, activations
// and output sums are fp32 whatever the types; a bf16 output is rounded once, at the end. int8
// rows carry one scale per row (Problem::s_in, s_out): a routing row's dot product is scaled
// before the bias is added (node_logit), an output row is applied with its activation times its
// scale (out_coef); the int8 values are widened to fp32 exactly in registers. An op's .cpp
// instantiates the walks it needs (runs_for<E>()).

// The routing dot product for inputs Tx and rows Tw: each step multiplies kStep elements of x by
// kStep of the row and adds them into an fp32 accumulator. This one widens both to fp32 (exact
// for bf16) and uses an FMA; the avx512bf16 namespace specialises it for bf16 x bf16
// (_mm512_dpbf16_ps, two products per lane and step), before any walk is instantiated.
template <class Tx, class Tw>
struct Dot {
  using RX = V::R;
  using RW = V::R;
  using Acc = V::R;  // the accumulator (fp32 lanes here; int32 lanes for VNNI)
  static constexpr int kStep = V::W;
  FFF_TARGET FFF_INLINE static RX load_x(const Tx* p) { return V::load(p); }
  FFF_TARGET FFF_INLINE static RX load_x_n(const Tx* p, int n) { return V::load_n(p, n); }
  FFF_TARGET FFF_INLINE static RW load_w(const Tw* p) { return V::load(p); }
  FFF_TARGET FFF_INLINE static RW load_w_n(const Tw* p, int n) { return V::load_n(p, n); }
  FFF_TARGET FFF_INLINE static Acc madd(Acc acc, RX x, RW w) { return V::fma(x, w, acc); }
  FFF_TARGET FFF_INLINE static Acc zero() { return V::zero(); }
  FFF_TARGET FFF_INLINE static Acc add(Acc a, Acc b) { return V::add(a, b); }
  FFF_TARGET FFF_INLINE static float sum(Acc a) { return V::sum(a); }
};

// logits[i] = x[i] . w[i] for G (token, row) pairs, rows of length d, with V::kAcc accumulators
// per pair: enough independent chains for a lone token (the 1-token latency) and, with four
// tokens, for the FMA latency. The order of operations does not depend on G, so a token's
// result does not depend on the batch around it.
template <class Tx, class Tw, int G>
FFF_TARGET static void dot_group(const Tx* const* x, const Tw* const* w, int64_t d,
                                 float* logits) {
  using D = Dot<Tx, Tw>;
  constexpr int A = V::kAcc, S = D::kStep;
  typename D::Acc acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = D::zero();
  int64_t k = 0;
  for (; k + A * S <= d; k += A * S) {
    for (int i = 0; i < G; ++i)
      for (int a = 0; a < A; ++a)
        acc[i][a] = D::madd(acc[i][a], D::load_x(x[i] + k + a * S), D::load_w(w[i] + k + a * S));
  }
  for (int a = 0; k < d; k += S, ++a) {  // the last < A steps, the final one partial
    const int n = d - k < S ? static_cast<int>(d - k) : S;
    for (int i = 0; i < G; ++i)
      acc[i][a] = D::madd(acc[i][a], D::load_x_n(x[i] + k, n), D::load_w_n(w[i] + k, n));
  }
  for (int i = 0; i < G; ++i) {
    for (int a = 1; a < A; ++a) acc[i][0] = D::add(acc[i][0], acc[i][a]);
    logits[i] = D::sum(acc[i][0]);
  }
}

// Ask for a whole row to be brought towards L2 (the hardware prefetcher then needs no warm-up).
template <class T>
FFF_TARGET static void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
}

// logits[i] = x . w[i] for G rows and one token: dot_group's operations, in dot_group's order
// for every (token, row) pair (so bit-identical to it), but each step of x is loaded once for
// the G rows instead of once per row (the walk is load-bound: 1.25 loads per FMA instead of 2).
template <class Tx, class Tw, int G>
FFF_TARGET static void dot_shared(const Tx* x, const Tw* const* w, int64_t d, float* logits) {
  using D = Dot<Tx, Tw>;
  constexpr int A = V::kAcc, S = D::kStep;
  typename D::Acc acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = D::zero();
  int64_t k = 0;
  for (; k + A * S <= d; k += A * S) {
    for (int a = 0; a < A; ++a) {
      const typename D::RX xv = D::load_x(x + k + a * S);
      for (int i = 0; i < G; ++i) acc[i][a] = D::madd(acc[i][a], xv, D::load_w(w[i] + k + a * S));
    }
  }
  for (int a = 0; k < d; k += S, ++a) {
    const int n = d - k < S ? static_cast<int>(d - k) : S;
    const typename D::RX xv = D::load_x_n(x + k, n);
    for (int i = 0; i < G; ++i) acc[i][a] = D::madd(acc[i][a], xv, D::load_w_n(w[i] + k, n));
  }
  for (int i = 0; i < G; ++i) {
    for (int a = 1; a < A; ++a) acc[i][0] = D::add(acc[i][0], acc[i][a]);
    logits[i] = D::sum(acc[i][0]);
  }
}

// logits[i] = x[i] . w for G tokens and one row: dot_group's operations in dot_group's order for
// every (token, row) pair (so bit-identical to it), but each step of the row is loaded once for
// the G tokens (tokens sorted by node share their rows: run_tree_sorted).
template <class Tx, class Tw, int G>
FFF_TARGET static void dot_row_shared(const Tx* const* x, const Tw* w, int64_t d,
                                      float* logits) {
  using D = Dot<Tx, Tw>;
  constexpr int A = V::kAcc, S = D::kStep;
  typename D::Acc acc[G][A];
  for (int i = 0; i < G; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = D::zero();
  int64_t k = 0;
  for (; k + A * S <= d; k += A * S) {
    for (int a = 0; a < A; ++a) {
      const typename D::RW wv = D::load_w(w + k + a * S);
      for (int i = 0; i < G; ++i) acc[i][a] = D::madd(acc[i][a], D::load_x(x[i] + k + a * S), wv);
    }
  }
  for (int a = 0; k < d; k += S, ++a) {
    const int n = d - k < S ? static_cast<int>(d - k) : S;
    const typename D::RW wv = D::load_w_n(w + k, n);
    for (int i = 0; i < G; ++i) acc[i][a] = D::madd(acc[i][a], D::load_x_n(x[i] + k, n), wv);
  }
  for (int i = 0; i < G; ++i) {
    for (int a = 1; a < A; ++a) acc[i][0] = D::add(acc[i][0], acc[i][a]);
    logits[i] = D::sum(acc[i][0]);
  }
}

// logits of n <= kChunk (token, row) pairs: dot_shared when they all have the same token (one
// token's trees), dot_row_shared when they all have the same row (tokens sorted by node), else
// dot_group, with the count as a template argument.
template <class Tx, class Tw>
FFF_TARGET static void dot_pairs(const Tx* const* x, const Tw* const* w, int n, int64_t d,
                                 bool shared, bool same_row, float* logits) {
  if (same_row && n > 1) {
    switch (n) {
      case 4: dot_row_shared<Tx, Tw, 4>(x, w[0], d, logits); return;
      case 3: dot_row_shared<Tx, Tw, 3>(x, w[0], d, logits); return;
      default: dot_row_shared<Tx, Tw, 2>(x, w[0], d, logits); return;
    }
  }
  if (shared) {
    switch (n) {
      case 4: dot_shared<Tx, Tw, 4>(x[0], w, d, logits); return;
      case 3: dot_shared<Tx, Tw, 3>(x[0], w, d, logits); return;
      case 2: dot_shared<Tx, Tw, 2>(x[0], w, d, logits); return;
      default: dot_shared<Tx, Tw, 1>(x[0], w, d, logits); return;
    }
  }
  switch (n) {
    case 4: dot_group<Tx, Tw, 4>(x, w, d, logits); break;
    case 3: dot_group<Tx, Tw, 3>(x, w, d, logits); break;
    case 2: dot_group<Tx, Tw, 2>(x, w, d, logits); break;
    default: dot_group<Tx, Tw, 1>(x, w, d, logits); break;
  }
}

// A node's logit from its routing row's dot product with x: plus the bias; an int8 row's dot
// product is in units of the row's scale (fff_cpu_int8.cpp), so it is scaled first.
template <class E>
FFF_TARGET FFF_INLINE static float node_logit(const Problem& pb, int64_t id, float dot,
                                              const typename E::XIn* x) {
  if constexpr (std::is_same<typename E::XIn, uint8_t>::value) {
    // VNNI: x quantized per token (quantize_tokens): dot = sum (q + 128) * w, so the row's
    // 128 * sum(w) comes off first; the token's scale is stored after its row.
    float sx;
    std::memcpy(&sx, x + pb.x_stride - sizeof(float), sizeof(float));
    return (dot - pb.c_in[id]) * (sx * pb.s_in[id]) + pb.b_in[id];
  } else if constexpr (std::is_same<typename E::In, int8_t>::value) {
    (void)x;
    return dot * pb.s_in[id] + pb.b_in[id];
  } else {
    (void)x;
    return dot + pb.b_in[id];
  }
}

// Up to kChunk (token, tree) pairs of one level whose dot products are computed together.
template <class Tx>
struct Chunk {
  const Tx* x[kChunk];
  const void* rows[kChunk];
  int64_t ids[kChunk];  // global node ids
  int64_t* local[kChunk];  // the pairs' tree-local nodes (updated)
  float* z[kChunk];     // where the logits go
  int64_t* node[kChunk];  // where the node ids go
  int n = 0;
  bool shared = true;   // all pairs have the same token (x)
  bool same_row = true;  // all pairs have the same row (node)
};

// Computes a full or final chunk's logits, stores them with their node ids, takes each pair one
// level down (right iff logit > 0: an exact 0 and NaN go left) and empties the chunk.
template <class E>
FFF_TARGET static void flush_chunk(const Problem& pb, Chunk<typename E::XIn>& c) {
  using Tin = typename E::In;
  float logits[kChunk];
  dot_pairs<typename E::XIn, Tin>(c.x, reinterpret_cast<const Tin* const*>(c.rows), c.n, pb.d,
                                c.shared, c.same_row, logits);
  for (int j = 0; j < c.n; ++j) {
    const float v = node_logit<E>(pb, c.ids[j], logits[j], c.x[j]);
    *c.z[j] = v;
    *c.node[j] = c.ids[j];
    *c.local[j] = 2 * *c.local[j] + 1 + (v > 0.0f ? 1 : 0);
  }
  c.n = 0;
  c.shared = true;
  c.same_row = true;
}

// Adds the pair (token x, global node id) to the chunk, its logit and node id to go to *z and
// *node and its tree-local node *local to be taken one level down; flushes a full chunk.
template <class E>
FFF_TARGET static void add_pair_at(const Problem& pb, Chunk<typename E::XIn>& c,
                                   const typename E::XIn* x, int64_t id, int64_t* local,
                                   float* z, int64_t* node) {
  const int j = c.n++;
  c.shared = c.shared && (j == 0 || c.x[0] == x);
  c.same_row = c.same_row && (j == 0 || c.ids[0] == id);
  c.x[j] = x;
  c.rows[j] = static_cast<const typename E::In*>(pb.w_in) + id * pb.d;
  if (pb.knobs.prefetch) {
    prefetch_row(static_cast<const typename E::Out*>(pb.w_out) + id * pb.d, pb.d);
  }
  c.ids[j] = id;
  c.local[j] = local;
  c.z[j] = z;
  c.node[j] = node;
  if (c.n == kChunk) flush_chunk<E>(pb, c);
}

// Adds token i's pair with `tree` at `level` to the chunk (z and node: the token's path arrays,
// position tree*(D+1) + level), flushing it when full.
template <class E>
FFF_TARGET static void add_pair(const Problem& pb, Chunk<typename E::XIn>& c,
                                const typename E::XIn* x, int64_t tree, int64_t level,
                                int64_t* local, float* z, int64_t* node) {
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1;
  const int64_t id = tree * n_nodes + *local, pos = tree * (pb.depth + 1) + level;
  add_pair_at<E>(pb, c, x, id, local, z + pos, node + pos);
}

// One level for the pairs (token i < G, tree in [tree0, tree1)), kChunk pairs at a time:
// consecutive chunks are independent, so while one chunk's logits wait on their reductions the
// next chunk's loads and multiply-adds proceed. `token_major`: pairs in the order (i, tree), so
// a chunk is one token's trees and shares its x loads (dot_shared); else (tree, i), a chunk is
// one tree's tokens. local[tree * G + i] is the pair's tree-local node (updated). Writes
// z[i][p] = logit and node[i][p] = global node id at path position p = tree*(D+1) + level. A
// pair's logit does not depend on the chunk it is in, so the order and grouping of pairs never
// change a result.
template <class E>
FFF_TARGET static void walk_level(const Problem& pb, const typename E::XIn* const* x, int G,
                                  int64_t tree0, int64_t tree1, int64_t level, bool token_major,
                                  int64_t* local, float* const* z, int64_t* const* node) {
  Chunk<typename E::XIn> c;
  if (token_major) {
    for (int i = 0; i < G; ++i)
      for (int64_t tree = tree0; tree < tree1; ++tree)
        add_pair<E>(pb, c, x[i], tree, level, local + tree * G + i, z[i], node[i]);
  } else {
    for (int64_t tree = tree0; tree < tree1; ++tree)
      for (int i = 0; i < G; ++i)
        add_pair<E>(pb, c, x[i], tree, level, local + tree * G + i, z[i], node[i]);
  }
  if (c.n > 0) flush_chunk<E>(pb, c);
}

// Levels [first, last) of `tree` for G (<= kChunk) tokens, their dot products as one dot_group
// per level with G a template argument: walk_level's pairs without the chunk's bookkeeping
// (which measured 5-20% slower here for several trees in bf16), the same operations per pair.
// local[i] is token i's tree-local node (updated); writes z[i][p] and node[i][p] at path
// position p = tree*(D+1) + level.
template <class E, int G>
FFF_TARGET static void walk_tree_group(const Problem& pb, const typename E::XIn* const* x,
                                       int64_t tree, int64_t first, int64_t last,
                                       int64_t* local, float* const* z, int64_t* const* node) {
  using Tin = typename E::In;
  const int64_t n_nodes = (int64_t{2} << pb.depth) - 1, path = pb.depth + 1;
  const Tin* w_in = static_cast<const Tin*>(pb.w_in);
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  for (int64_t level = first; level < last; ++level) {
    const Tin* rows[G];
    int64_t ids[G];
    for (int i = 0; i < G; ++i) {
      ids[i] = tree * n_nodes + local[i];
      rows[i] = w_in + ids[i] * pb.d;
      if (pb.knobs.prefetch) prefetch_row(w_out + ids[i] * pb.d, pb.d);
    }
    float logits[G];
    dot_group<typename E::XIn, Tin, G>(x, rows, pb.d, logits);
    for (int i = 0; i < G; ++i) {
      const float v = node_logit<E>(pb, ids[i], logits[i], x[i]);
      z[i][tree * path + level] = v;
      node[i][tree * path + level] = ids[i];
      local[i] = 2 * local[i] + 1 + (v > 0.0f ? 1 : 0);  // exact 0 and NaN go left
    }
  }
}

// Levels [first, last) of every tree for a group of G tokens. With trees_together every tree
// takes level l before any takes l+1, one token's trees side by side (K independent chains per
// token, sharing the token's x loads); otherwise the trees are walked one after another, a
// tree's G tokens side by side. Same results either way.
template <class E>
FFF_TARGET static void walk_levels(const Problem& pb, const typename E::XIn* const* x, int G,
                                   int64_t first, int64_t last, int64_t* local,
                                   float* const* z, int64_t* const* node) {
  if (pb.knobs.trees_together && pb.n_trees > 1) {
    for (int64_t level = first; level < last; ++level)
      walk_level<E>(pb, x, G, 0, pb.n_trees, level, true, local, z, node);
    return;
  }
  for (int64_t tree = 0; tree < pb.n_trees; ++tree) {
    int64_t* loc = local + tree * G;
    switch (G) {  // a group of at most one chunk: one dot_group per level
      case 1: walk_tree_group<E, 1>(pb, x, tree, first, last, loc, z, node); continue;
      case 2: walk_tree_group<E, 2>(pb, x, tree, first, last, loc, z, node); continue;
      case 3: walk_tree_group<E, 3>(pb, x, tree, first, last, loc, z, node); continue;
      case 4: walk_tree_group<E, 4>(pb, x, tree, first, last, loc, z, node); continue;
      default: break;
    }
    for (int64_t level = first; level < last; ++level)
      walk_level<E>(pb, x, G, tree, tree + 1, level, false, local, z, node);
  }
}

// exp(hi + lo) for hi + lo in [-87, 0] with |lo| small beside |hi| allowed to be large: the
// argument is reduced as hi - n ln2 (Cody-Waite, ln2 in two parts) before lo is added, so lo's
// bits are not lost to hi's rounding; exp on [-ln2/2, ln2/2] is a degree-7 Taylor polynomial
// (truncation < 1e-8 relative), scaled by 2^n.
FFF_TARGET FFF_INLINE static V::R exp_split(V::R hi, V::R lo) {
  const V::R n = V::round(V::mul(V::add(hi, lo), V::set1(1.44269504088896341f)));
  V::R r = V::fma(n, V::set1(-0.693145751953125f), hi);  // ln2's top 16 bits: n * it is exact
  r = V::add(V::fma(n, V::set1(-1.42860682030941723e-6f), r), lo);
  V::R p = V::set1(1.0f / 5040);
  p = V::fma(p, r, V::set1(1.0f / 720));
  p = V::fma(p, r, V::set1(1.0f / 120));
  p = V::fma(p, r, V::set1(1.0f / 24));
  p = V::fma(p, r, V::set1(1.0f / 6));
  p = V::fma(p, r, V::set1(0.5f));
  p = V::fma(p, r, V::set1(1.0f));
  p = V::fma(p, r, V::set1(1.0f));
  return V::scale2(p, n);
}

// GELU(z) = z/2 (1 + erf(z / sqrt 2)) for a vector of z, exact erf to ~5e-7 relative: with
// a = |z| / sqrt 2, 1 + erf is erfc(a) for z < 0 and 2 - erfc(a) otherwise (no cancellation on
// either side), and erfc(a) = t exp(-a^2 + Q(t)) with t = 1 / (1 + a/2) and Q the degree-9
// polynomial fitted to erfc on [0, 9.5] (relative error < 4.4e-7 there; scripts/fit_erfc.py).
// a^2 = z^2/2 is split into its rounded value and the rounding error (an FMA) so that exp's
// argument keeps its bits at large a. Past a = 9.2 (erfc < 1e-37) erfc is taken as 0, so
// z = -inf gives NaN as the scalar formula does; NaN stays NaN. Measured against float64 erfc
// over [-14, 14]: < 3e-7 relative everywhere (tests/test_native.py); the fp32 formula
// z/2 (1 + erf(z / sqrt 2)) loses all its digits to cancellation for z < -5.
FFF_TARGET FFF_INLINE static V::R gelu_vec(V::R z) {
  static constexpr float kQ[10] = {-1.265495016e+00f, 9.997074342e-01f,  3.762910606e-01f,
                                   8.978525455e-02f,  -1.786697081e-01f, 2.929608678e-01f,
                                   -1.190438014e+00f, 1.560890578e+00f,  -8.667128024e-01f,
                                   1.816807834e-01f};  // scripts/fit_erfc.py
  const V::R a = V::mul(V::abs(z), V::set1(0.70710678118654752440f));
  const V::R t = V::div(V::set1(1.0f), V::fma(a, V::set1(0.5f), V::set1(1.0f)));
  V::R q = V::set1(kQ[9]);
  for (int k = 8; k >= 0; --k) q = V::fma(q, t, V::set1(kQ[k]));
  // -a^2 = -z^2 / 2 from z itself (a's own rounding would cost 1e-5 relative at a = 8): z*z
  // rounded, plus its rounding error from an FMA; halving is exact.
  const V::R z2 = V::mul(z, z);
  const V::R z2_err = V::fma(z, z, V::mul(z2, V::set1(-1.0f)));
  const V::R hi = V::mul(z2, V::set1(-0.5f));
  V::R e = V::mul(t, exp_split(hi, V::fma(z2_err, V::set1(-0.5f), q)));
  e = V::select_lt(a, V::set1(9.2f), e, V::zero());
  const V::R two_minus_e = V::fma(e, V::set1(-1.0f), V::set1(2.0f));  // exact: e <= 1
  const V::R one_plus_erf = V::select_lt(z, V::zero(), e, two_minus_e);
  return V::mul(V::mul(z, V::set1(0.5f)), one_plus_erf);
}

// act[p] = GELU(act[p]) for p < P, a vector at a time (gelu_vec): the logits become
// activations once the walk is done (the erf is off the walk's level-to-level dependency chain).
// The many-tree walks all use this, so their results agree bit for bit with each other; the
// one-tree walk (walk_one) applies the scalar gelu inside its walk.
FFF_TARGET static void gelu_all(float* act, int64_t P) {
  int64_t p = 0;
  for (; p + V::W <= P; p += V::W) V::store(act + p, gelu_vec(V::load(act + p)));
  if (p < P) {
    const int n = static_cast<int>(P - p);
    V::store_n(act + p, gelu_vec(V::load_n(act + p, n)), n);
  }
}

// y[0:d] = sum_p act[p] * w_out[node[p], 0:d] for one token: each output tile is held in fp32
// registers across all P rows and stored once (a bf16 y: rounded once, there).
//
// With `accumulate` (fp32 y only) each tile starts from the y already there instead of from
// zero: a token's rows applied in several calls, in path order, then see exactly the
// multiply-adds of one call (an fp32 value stored and reloaded is unchanged), so the result is
// bit-identical.
// For int8 output rows, s_out holds each row's scale: the row is applied with its activation
// times its scale (s_out is unused for float rows).
template <class Tw>
FFF_INLINE static float out_coef(const float* act, const int64_t* node, int64_t p,
                                 const float* s_out) {
  if constexpr (std::is_same<Tw, int8_t>::value) {
    return act[p] * s_out[node[p]];
  } else {
    return act[p];
  }
}

template <class Tw, class Ty>
FFF_TARGET static void apply_output(const float* act, const int64_t* node, int64_t P,
                                    const Tw* w_out, const float* s_out, int64_t d, Ty* y,
                                    bool accumulate = false) {
  constexpr int kTile = 8;  // vectors per tile: 8 independent FMA chains
  int64_t k = 0;
  for (; k + kTile * V::W <= d; k += kTile * V::W) {
    V::R acc[kTile];
    for (int j = 0; j < kTile; ++j) acc[j] = accumulate ? V::load(y + k + j * V::W) : V::zero();
    for (int64_t p = 0; p < P; ++p) {
      const V::R a = V::set1(out_coef<Tw>(act, node, p, s_out));
      const Tw* row = w_out + node[p] * d + k;
      for (int j = 0; j < kTile; ++j) acc[j] = V::fma(a, V::load(row + j * V::W), acc[j]);
    }
    for (int j = 0; j < kTile; ++j) V::store(y + k + j * V::W, acc[j]);
  }
  for (; k < d; k += V::W) {
    const int n = d - k < V::W ? static_cast<int>(d - k) : V::W;
    V::R acc = accumulate ? V::load_n(y + k, n) : V::zero();
    for (int64_t p = 0; p < P; ++p) {
      acc = V::fma(V::set1(out_coef<Tw>(act, node, p, s_out)),
                   V::load_n(w_out + node[p] * d + k, n), acc);
    }
    V::store_n(y + k, acc, n);
  }
}

// y[0:count] = src[0:count] in y's type (a bf16 y: each value rounded once).
template <class Ty>
FFF_TARGET static void store_sums(const float* src, Ty* y, int64_t count) {
  int64_t k = 0;
  for (; k + V::W <= count; k += V::W) V::store(y + k, V::load(src + k));
  if (k < count) {
    const int n = static_cast<int>(count - k);
    V::store_n(y + k, V::load_n(src + k, n), n);
  }
}

// The rows a tree-major walk accumulates a block's outputs in, tree by tree: y itself when it is
// fp32 (apply_output's `accumulate`), else fp32 rows of the block that `finish` rounds into y
// once every tree is in, so a bf16 y is rounded once, as in every other walk.
template <class Ty>
struct BlockSums {
  static constexpr bool kDirect = std::is_same<Ty, float>::value;
  Ty* y;
  int64_t d, b0 = 0;
  std::vector<float> sums;
  BlockSums(Ty* y_, int64_t d_, int64_t block) : y(y_), d(d_), sums(kDirect ? 0 : block * d_) {}
  float* row(int64_t t) {
    if constexpr (kDirect) return y + t * d;
    return sums.data() + (t - b0) * d;
  }
  FFF_TARGET void finish(int64_t n) {
    if constexpr (!kDirect) store_sums(sums.data(), y + b0 * d, n * d);
  }
};

// Groups of G tokens from [t0, t1) (the last group shorter): walk a group through every tree,
// then apply each token's output while its activations are still in L1. act/node hold G*P
// entries, local G*K.
template <class E>
FFF_TARGET static void run_groups(const Problem& pb, int64_t t0, int64_t t1, int64_t G0,
                                  float* act, int64_t* node, int64_t* local) {
  using Tx = typename E::X;
  const int64_t path = pb.depth + 1;
  const int64_t P = pb.n_trees * path;
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  using Tq = typename E::XIn;
  const Tq* const xs = static_cast<const Tq*>(pb.x);
  Tx* const ys = static_cast<Tx*>(pb.y);
  float* acts[kMaxGroup];
  int64_t* nodes[kMaxGroup];
  const Tq* x[kMaxGroup];
  for (int i = 0; i < G0; ++i) {
    acts[i] = act + i * P;
    nodes[i] = node + i * P;
  }
  for (int64_t t = t0; t < t1; t += G0) {
    const int G = static_cast<int>(t1 - t < G0 ? t1 - t : G0);
    for (int i = 0; i < G; ++i) x[i] = xs + (t + i) * pb.x_stride;
    std::fill(local, local + G * pb.n_trees, int64_t{0});
    walk_levels<E>(pb, x, G, 0, path, local, acts, nodes);
    for (int i = 0; i < G; ++i) {
      gelu_all(acts[i], P);
      apply_output(acts[i], nodes[i], P, w_out, pb.s_out, pb.d, ys + (t + i) * pb.d);
      if (pb.nodes != nullptr) std::memcpy(pb.nodes + (t + i) * P, nodes[i], P * sizeof(int64_t));
    }
  }
}

// Several trees over many tokens, tree-major within blocks of knobs.block tokens: for each
// tree, every group of the block walks that tree and applies its output rows, so a tree's rows
// (189 KB for 32x5 at d=384) are fetched once per block and then reused from L2 by the block's
// tokens, instead of all trees' rows (6 MB) competing for the caches token by token. y
// accumulates tree by tree in path order (BlockSums): bit-identical to run_groups.
template <class E>
FFF_TARGET static void run_tree_blocked(const Problem& pb, int64_t t0, int64_t t1) {
  using Tx = typename E::X;
  const int64_t path = pb.depth + 1, P = pb.n_trees * path;
  const int64_t G0 = pb.knobs.group;
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  using Tq = typename E::XIn;
  const Tq* const xs = static_cast<const Tq*>(pb.x);
  std::vector<float> act(G0 * P);
  std::vector<int64_t> node(G0 * P), local(G0 * pb.n_trees);
  BlockSums<Tx> out(static_cast<Tx*>(pb.y), pb.d, pb.knobs.block);
  float* acts[kMaxGroup];
  int64_t* nodes[kMaxGroup];
  const Tq* x[kMaxGroup];
  for (int i = 0; i < G0; ++i) {
    acts[i] = act.data() + i * P;
    nodes[i] = node.data() + i * P;
  }
  for (int64_t b0 = t0; b0 < t1; b0 += pb.knobs.block) {
    const int64_t b1 = std::min(t1, b0 + pb.knobs.block);
    out.b0 = b0;
    for (int64_t tree = 0; tree < pb.n_trees; ++tree) {
      for (int64_t t = b0; t < b1; t += G0) {
        const int G = static_cast<int>(b1 - t < G0 ? b1 - t : G0);
        for (int i = 0; i < G; ++i) x[i] = xs + (t + i) * pb.x_stride;
        std::fill(local.begin() + tree * G, local.begin() + (tree + 1) * G, int64_t{0});
        for (int64_t level = 0; level < path; ++level)
          walk_level<E>(pb, x, G, tree, tree + 1, level, false, local.data(), acts, nodes);
        for (int i = 0; i < G; ++i) {
          float* a = acts[i] + tree * path;
          const int64_t* nd = nodes[i] + tree * path;
          gelu_all(a, path);
          apply_output(a, nd, path, w_out, pb.s_out, pb.d, out.row(t + i), tree > 0);
          if (pb.nodes != nullptr)
            std::memcpy(pb.nodes + (t + i) * P + tree * path, nd, path * sizeof(int64_t));
        }
      }
    }
    out.finish(b1 - b0);
  }
}

// Work arrays of a sorted walk over blocks of up to B tokens.
struct SortScratch {
  std::vector<int64_t> order, next, local, start;
  SortScratch(int64_t B, int64_t depth)
      : order(B), next(B), local(B), start((int64_t{1} << depth) + 1) {}
};

// All levels of `tree` for the n tokens b0, b0+1, ... of a block, each level with the tokens in
// the order of the node they are at (a stable counting sort after each level): the tokens at one
// node are consecutive, so a chunk of them shares its row (dot_row_shared: one row load per
// kChunk tokens instead of one per token) and the row is read while in L1. Token i's logit at
// `level` goes to z[i * stride + level] and its node id to nd[i * stride + level]; on return
// s.order[0:n] lists the tokens by leaf. Every pair sees dot_group's operations: the same logits
// as every other walk.
template <class E>
FFF_TARGET static void walk_tree_sorted(const Problem& pb, int64_t tree, int64_t b0, int64_t n,
                                        float* z, int64_t* nd, int64_t stride, SortScratch& s) {
  using Tx = typename E::X;
  const int64_t path = pb.depth + 1, n_nodes = (int64_t{2} << pb.depth) - 1;
  using Tq = typename E::XIn;
  const Tq* const xs = static_cast<const Tq*>(pb.x);
  for (int64_t i = 0; i < n; ++i) s.order[i] = i;
  std::fill(s.local.begin(), s.local.begin() + n, int64_t{0});
  for (int64_t level = 0; level < path; ++level) {
    Chunk<Tq> c;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = s.order[j];
      add_pair_at<E>(pb, c, xs + (b0 + i) * pb.x_stride, tree * n_nodes + s.local[i],
                     &s.local[i], z + i * stride + level, nd + i * stride + level);
    }
    if (c.n > 0) flush_chunk<E>(pb, c);
    if (level + 1 == path) break;
    const int64_t first = (int64_t{2} << level) - 1, width = int64_t{2} << level;
    std::fill(s.start.begin(), s.start.begin() + width + 1, int64_t{0});
    for (int64_t j = 0; j < n; ++j) ++s.start[s.local[s.order[j]] - first + 1];
    for (int64_t b = 1; b <= width; ++b) s.start[b] += s.start[b - 1];
    for (int64_t j = 0; j < n; ++j) s.next[s.start[s.local[s.order[j]] - first]++] = s.order[j];
    s.order.swap(s.next);
  }
}

// Several trees over many tokens, tree-major within blocks of knobs.block tokens as in
// run_tree_blocked, but each tree walks the whole block level by level in node order
// (walk_tree_sorted); its output rows are then applied token by token in leaf order, so
// neighbouring tokens share most of their path's rows. Bit-identical to run_tree_blocked (same
// logits, y accumulated tree by tree in path order).
template <class E>
FFF_TARGET static void run_tree_sorted(const Problem& pb, int64_t t0, int64_t t1) {
  using Tx = typename E::X;
  const int64_t path = pb.depth + 1, P = pb.n_trees * path;
  const int64_t B = std::min(pb.knobs.block, t1 - t0);
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  std::vector<float> act(B * path);
  std::vector<int64_t> node(B * path);
  SortScratch s(B, pb.depth);
  BlockSums<Tx> out(static_cast<Tx*>(pb.y), pb.d, B);
  for (int64_t b0 = t0; b0 < t1; b0 += B) {
    const int64_t n = std::min(t1, b0 + B) - b0;
    out.b0 = b0;
    for (int64_t tree = 0; tree < pb.n_trees; ++tree) {
      walk_tree_sorted<E>(pb, tree, b0, n, act.data(), node.data(), path, s);
      gelu_all(act.data(), n * path);  // the block's paths are contiguous: full vectors
      for (int64_t j = 0; j < n; ++j) {
        const int64_t i = s.order[j], t = b0 + i;
        const float* a = act.data() + i * path;
        const int64_t* nd = node.data() + i * path;
        apply_output(a, nd, path, w_out, pb.s_out, pb.d, out.row(t), tree > 0);
        if (pb.nodes != nullptr)
          std::memcpy(pb.nodes + t * P + tree * path, nd, path * sizeof(int64_t));
      }
    }
    out.finish(n);
  }
}

// ---- The split walk (knobs.split): two passes over a whole call, each split between threads so
// that no thread reads all the weights. Pass 1 (walk_trees): each thread walks its share of the
// trees for every token (sorted walk, blocks of knobs.block tokens, 0: all), writing activations
// and node ids to the call's (T, K*(D+1)) arrays pb.act / pb.path_nodes. Pass 2 (output_cols):
// each thread applies every token's visited output rows to its share of y's columns. Per output
// element the multiply-adds are those of apply_output, in path order: bit-identical results.

// Pass 1 for trees [tree0, tree1).
template <class E>
FFF_TARGET static void walk_trees(const Problem& pb, int64_t tree0, int64_t tree1) {
  const int64_t path = pb.depth + 1, P = pb.n_trees * path, T = pb.tokens;
  const int64_t B = pb.knobs.block > 0 ? std::min(pb.knobs.block, T) : T;  // 0: the whole call
  SortScratch s(B, pb.depth);
  for (int64_t tree = tree0; tree < tree1; ++tree) {
    for (int64_t b0 = 0; b0 < T; b0 += B) {
      const int64_t n = std::min(T, b0 + B) - b0;
      float* z = pb.act + b0 * P + tree * path;
      walk_tree_sorted<E>(pb, tree, b0, n, z, pb.path_nodes + b0 * P + tree * path, P, s);
      for (int64_t i = 0; i < n; ++i) gelu_all(z + i * P, path);
    }
  }
}

// y[0:NV vectors] = sum_p act[p] * w[node[p] * ld + (0:NV vectors)]: apply_output's
// multiply-adds for one tile of columns; kPartial: the last vector has only n_last columns.
template <class Tw, class Ty, int NV, bool kPartial>
FFF_TARGET static void output_tile(const float* act, const int64_t* node, int64_t P,
                                   const Tw* w, const float* s_out, int64_t ld, Ty* y,
                                   int n_last) {
  V::R acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = V::zero();
  for (int64_t p = 0; p < P; ++p) {
    const V::R a = V::set1(out_coef<Tw>(act, node, p, s_out));
    const Tw* row = w + node[p] * ld;
    for (int j = 0; j < NV; ++j) {
      const V::R v =
          (kPartial && j == NV - 1) ? V::load_n(row + j * V::W, n_last) : V::load(row + j * V::W);
      acc[j] = V::fma(a, v, acc[j]);
    }
  }
  for (int j = 0; j < NV; ++j) {
    if (kPartial && j == NV - 1) {
      V::store_n(y + j * V::W, acc[j], n_last);
    } else {
      V::store(y + j * V::W, acc[j]);
    }
  }
}

template <class Tw, class Ty, int NV>
FFF_TARGET static void output_tile_any(const float* act, const int64_t* node, int64_t P,
                                       const Tw* w, const float* s_out, int64_t ld, Ty* y,
                                       int n_last) {
  if (n_last == V::W) {
    output_tile<Tw, Ty, NV, false>(act, node, P, w, s_out, ld, y, n_last);
  } else {
    output_tile<Tw, Ty, NV, true>(act, node, P, w, s_out, ld, y, n_last);
  }
}

// Pass 2 for the columns of vectors [v0, v1) (vector v: columns v*V::W .. +V::W, cut at d), in
// tiles of up to 8 vectors, token by token.
template <class E>
FFF_TARGET static void output_cols(const Problem& pb, int64_t v0, int64_t v1) {
  using Tw = typename E::Out;
  using Ty = typename E::X;
  const int64_t P = pb.n_trees * (pb.depth + 1), d = pb.d;
  const Tw* w_out = static_cast<const Tw*>(pb.w_out);
  const int64_t c1 = std::min(v1 * V::W, d);
  for (int64_t t = 0; t < pb.tokens; ++t) {
    const float* a = pb.act + t * P;
    const int64_t* nd = pb.path_nodes + t * P;
    for (int64_t k = v0 * V::W; k < c1; k += 8 * V::W) {
      const int64_t len = std::min<int64_t>(8 * V::W, c1 - k);
      const int nv = static_cast<int>((len + V::W - 1) / V::W);
      const int n_last = static_cast<int>(len - (nv - 1) * V::W);
      Ty* y = static_cast<Ty*>(pb.y) + t * d + k;
      const Tw* w = w_out + k;
      switch (nv) {
        case 8: output_tile_any<Tw, Ty, 8>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 7: output_tile_any<Tw, Ty, 7>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 6: output_tile_any<Tw, Ty, 6>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 5: output_tile_any<Tw, Ty, 5>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 4: output_tile_any<Tw, Ty, 4>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 3: output_tile_any<Tw, Ty, 3>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        case 2: output_tile_any<Tw, Ty, 2>(a, nd, P, w, pb.s_out, d, y, n_last); break;
        default: output_tile_any<Tw, Ty, 1>(a, nd, P, w, pb.s_out, d, y, n_last); break;
      }
    }
  }
}

// ---- One tree (K = 1, e.g. 1x11): a group of G tokens as a template argument, with fixed-size
// arrays and the GELU inside the walk (the generic walk's bookkeeping measured ~3-6% slower
// here). The same operations per token as the generic walk, so the same results.

// Levels [first, last) of the one tree for G tokens, level-synchronously. local[i] is token
// i's node on entry and on exit. Writes act[i][level] = GELU(logit), node[i][level] = node id.
template <class E, int G>
FFF_TARGET static void walk_one(const Problem& pb, const typename E::XIn* const* x,
                                int64_t first, int64_t last, int64_t* local, float* const* act,
                                int64_t* const* node) {
  using Tin = typename E::In;
  const Tin* w_in = static_cast<const Tin*>(pb.w_in);
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  for (int64_t level = first; level < last; ++level) {
    const Tin* rows[G];
    for (int i = 0; i < G; ++i) {
      rows[i] = w_in + local[i] * pb.d;
      if (pb.knobs.prefetch) prefetch_row(w_out + local[i] * pb.d, pb.d);
    }
    float logits[G];
    dot_group<typename E::XIn, Tin, G>(x, rows, pb.d, logits);
    for (int i = 0; i < G; ++i) {
      const float z = node_logit<E>(pb, local[i], logits[i], x[i]);
      act[i][level] = gelu(z);
      node[i][level] = local[i];
      // Right iff z > 0: an exact 0 and NaN go left (the comparison is false for both).
      local[i] = 2 * local[i] + 1 + (z > 0.0f ? 1 : 0);
    }
  }
}

// Groups of G tokens from [t0, t1), the last one topped up by repeating a valid token (only
// valid tokens are written); act/node hold G*(D+1) entries.
template <class E, int G>
FFF_TARGET static void run_groups_one(const Problem& pb, int64_t t0, int64_t t1, float* act,
                                      int64_t* node) {
  using Tx = typename E::X;
  const int64_t P = pb.depth + 1;
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  using Tq = typename E::XIn;
  const Tq* const xs = static_cast<const Tq*>(pb.x);
  Tx* const ys = static_cast<Tx*>(pb.y);
  float* acts[G];
  int64_t* nodes[G];
  for (int i = 0; i < G; ++i) {
    acts[i] = act + i * P;
    nodes[i] = node + i * P;
  }
  for (int64_t t = t0; t < t1; t += G) {
    const int valid = static_cast<int>(t1 - t < G ? t1 - t : G);
    const Tq* x[G];
    for (int i = 0; i < G; ++i) x[i] = xs + (t + (i < valid ? i : 0)) * pb.x_stride;
    int64_t local[G] = {};
    walk_one<E, G>(pb, x, 0, P, local, acts, nodes);
    for (int i = 0; i < valid; ++i) {
      apply_output(acts[i], nodes[i], P, w_out, pb.s_out, pb.d, ys + (t + i) * pb.d);
      if (pb.nodes != nullptr) std::memcpy(pb.nodes + (t + i) * P, nodes[i], P * sizeof(int64_t));
    }
  }
}

// One deep tree over many tokens, in two phases so that the deep rows are reused while cached.
// The top `split` levels (few nodes, cached anyway) are walked in token order; tokens are then
// grouped by the node they reached (a counting sort), and the deep levels and the output are
// done bucket by bucket: a bucket's tokens share a small subtree (kDeepLevels levels, ~30 nodes
// for 1x11), whose rows are fetched once per bucket instead of once per token. Each token still
// sees exactly the same operations, so results are bit-identical to run_groups_one.
template <class E, int G>
FFF_TARGET static void run_bucketed(const Problem& pb, int64_t t0, int64_t t1) {
  using Tx = typename E::X;
  const int64_t n = t1 - t0, P = pb.depth + 1, split = P - kDeepLevels;
  using Tq = typename E::XIn;
  const Tq* const xs = static_cast<const Tq*>(pb.x);
  Tx* const ys = static_cast<Tx*>(pb.y);
  std::vector<float> act(n * P);
  std::vector<int64_t> node(n * P), local(n);
  float* acts[G];
  int64_t* nodes[G];
  const Tq* x[G];
  for (int64_t t = 0; t < n; t += G) {  // phase 1: top levels, token order
    int64_t loc[G] = {};
    for (int i = 0; i < G; ++i) {
      const int64_t j = t + i < n ? t + i : t;  // a short last group repeats token t
      x[i] = xs + (t0 + j) * pb.x_stride;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
    }
    walk_one<E, G>(pb, x, 0, split, loc, acts, nodes);
    for (int i = 0; i < G && t + i < n; ++i) local[t + i] = loc[i];
  }
  const std::vector<int64_t> order = bucket_order(local, split);
  const auto* w_out = static_cast<const typename E::Out*>(pb.w_out);
  for (int64_t b = 0; b < n; b += G) {  // phase 2: deep levels and output, bucket order
    int64_t loc[G];
    for (int i = 0; i < G; ++i) {
      const int64_t j = order[b + i < n ? b + i : b];
      x[i] = xs + (t0 + j) * pb.x_stride;
      acts[i] = act.data() + j * P;
      nodes[i] = node.data() + j * P;
      loc[i] = local[j];
    }
    walk_one<E, G>(pb, x, split, P, loc, acts, nodes);
    for (int i = 0; i < G && b + i < n; ++i) {
      const int64_t j = order[b + i];
      apply_output(acts[i], nodes[i], P, w_out, pb.s_out, pb.d, ys + (t0 + j) * pb.d);
    }
  }
  if (pb.nodes != nullptr) std::memcpy(pb.nodes + t0 * P, node.data(), n * P * sizeof(int64_t));
}

// Tokens [t0, t1) of a one-tree problem with G tokens walked together: bucketed when the tree
// is deep and the tokens many, else in groups; a lone token walks alone.
template <class E, int G>
FFF_TARGET static void run_one_tree(const Problem& pb, int64_t t0, int64_t t1) {
  if (use_buckets(pb, t1 - t0)) {
    run_bucketed<E, G>(pb, t0, t1);
    return;
  }
  const int64_t P = pb.depth + 1;
  std::vector<float> act(G * P);
  std::vector<int64_t> node(G * P);
  if (t1 - t0 == 1) {
    run_groups_one<E, 1>(pb, t0, t1, act.data(), node.data());
  } else {
    run_groups_one<E, G>(pb, t0, t1, act.data(), node.data());
  }
}

// Tokens [t0, t1) of the problem: one tree (run_one_tree); several trees tree-major in blocks
// (knobs.block) or token by token through all trees (run_groups), knobs.group tokens at a time.
template <class E>
FFF_TARGET static void run_tokens(const Problem& pb, int64_t t0, int64_t t1) {
  if (pb.n_trees == 1) {
    switch (pb.knobs.group) {
      case 1: run_one_tree<E, 1>(pb, t0, t1); return;
      case 2: run_one_tree<E, 2>(pb, t0, t1); return;
      case 8: run_one_tree<E, 8>(pb, t0, t1); return;
      default: run_one_tree<E, 4>(pb, t0, t1); return;
    }
  }
  if (pb.knobs.block > 0 && pb.n_trees > 1 && t1 - t0 > 1) {
    if (pb.knobs.sort) {
      run_tree_sorted<E>(pb, t0, t1);
      return;
    }
    run_tree_blocked<E>(pb, t0, t1);
    return;
  }
  const int64_t P = pb.n_trees * (pb.depth + 1);
  const int64_t G = std::min<int64_t>(pb.knobs.group, t1 - t0);
  std::vector<float> act(G * P);
  std::vector<int64_t> node(G * P), local(G * pb.n_trees);
  run_groups<E>(pb, t0, t1, G, act.data(), node.data(), local.data());
}

// This instruction set's entry points for element types E (see Runs).
template <class E>
static Runs runs_for() {
  return Runs{&run_tokens<E>, &walk_trees<E>, &output_cols<E>, V::W};
}
