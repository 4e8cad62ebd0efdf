// The attention walk of attention_cpu.cpp for one instruction set. Included once per set, inside
// that set's namespace, after it defines ATTN_TARGET (its target attribute) and V (its vector
// ops: R, W, zero, set1, load, load_n, store, store_n, add, sub, mul, max, fma, first_or,
// reduce_add, reduce_max, exp_nonpositive). Not a standalone header.

// Softmax weights of the NQ queries q[0..NQ) (hd floats each) over the l keys (transposed in kt,
// hd rows of lpad, zero past l) into probs[r * lpad + j]; inv_sum[r] = 1 / (sum of row r).
template <int NQ>
ATTN_TARGET void query_probs(const float* const* q, const float* kt, int64_t l, int64_t lpad,
                             int64_t hd, float scale, float* probs, float* inv_sum) {
  typename V::R row_max[NQ];
  for (int r = 0; r < NQ; ++r) row_max[r] = V::set1(-INFINITY);
  for (int64_t j = 0; j < l; j += V::W) {
    typename V::R acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = V::zero();
    for (int64_t c = 0; c < hd; ++c) {
      const typename V::R k = V::load(kt + c * lpad + j);
      for (int r = 0; r < NQ; ++r) acc[r] = V::fma(V::set1(q[r][c]), k, acc[r]);
    }
    const int live = static_cast<int>(std::min<int64_t>(l - j, V::W));
    for (int r = 0; r < NQ; ++r) {
      acc[r] = V::mul(acc[r], V::set1(scale));
      V::store(probs + r * lpad + j, acc[r]);
      row_max[r] = V::max(row_max[r], V::first_or(acc[r], live, -INFINITY));
    }
  }
  for (int r = 0; r < NQ; ++r) {
    float* row = probs + r * lpad;
    const typename V::R m = V::set1(V::reduce_max(row_max[r]));
    typename V::R total = V::zero();
    for (int64_t j = 0; j < l; j += V::W) {
      const int live = static_cast<int>(std::min<int64_t>(l - j, V::W));
      const typename V::R p =
          V::first_or(V::exp_nonpositive(V::sub(V::load(row + j), m)), live, 0.0f);
      V::store(row + j, p);
      total = V::add(total, p);
    }
    inv_sum[r] = 1.0f / V::reduce_add(total);
  }
}

// out[r][0..hd) = inv_sum[r] * sum_j probs[r * lpad + j] v_j, v_j = v + j * stride.
template <int NQ>
ATTN_TARGET void weighted_values(const float* probs, int64_t lpad, const float* v,
                                 int64_t stride, int64_t l, int64_t hd, const float* inv_sum,
                                 float* const* out) {
  for (int64_t c = 0; c < hd; c += V::W) {
    const int live = static_cast<int>(std::min<int64_t>(hd - c, V::W));
    typename V::R acc[NQ];
    for (int r = 0; r < NQ; ++r) acc[r] = V::zero();
    for (int64_t j = 0; j < l; ++j) {
      const typename V::R vj = V::load_n(v + j * stride + c, live);
      for (int r = 0; r < NQ; ++r) acc[r] = V::fma(V::set1(probs[r * lpad + j]), vj, acc[r]);
    }
    for (int r = 0; r < NQ; ++r)
      V::store_n(out[r] + c, V::mul(acc[r], V::set1(inv_sum[r])), live);
  }
}

// Queries i0 .. i0 + NQ of one text's one head (keys already transposed into s.keys_t).
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
  const int64_t lpad = (l + V::W - 1) / V::W * V::W;
  s.reserve(hd, lpad, kQueries);
  transpose_keys(qkv + start * 3 * d + at.k, 3 * d, l, lpad, hd, s.keys_t.data());
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

// Every (text, head) task of one call, on torch's thread pool.
ATTN_TARGET void run(const Call& call) {
  at::parallel_for(0, call.n_texts * call.n_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / call.n_heads, h = task % call.n_heads;
      if (call.lengths[n] == 0) continue;
      text_head(call.qkv, call.out, call.starts[n], call.lengths[n], call.hd, call.d,
                offsets_of(h, call.hd, call.d, call.layout), s);
    }
  });
}
