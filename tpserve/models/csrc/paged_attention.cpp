// Decode attention over a paged KV cache, read in place through block tables.
//
// Each decode row's query attends to the keys its block table names, without first copying
// them into a per-row buffer: rows that share a long prompt's blocks read the same memory.
// One task per (part of at most PART keys, KV head), for all the query heads that KV head serves
// in every row that reads that part: its keys and values are read once for all of them (a prompt
// chunk's rows, one per token; streams sharing a cached system prompt's blocks); softmax in
// float32 (see attend_part).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fast_exp.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Keys per task. A long row's keys are cut into parts of this many, each part's softmax kept
// unnormalised with its maximum and sum, and the parts merged after (as flash-decoding does), so
// one long row among short ones (a prompt admitted in one-token chunks beside decoding streams)
// spreads over every thread instead of loading one. Fixed, so a row's result never depends on
// what else is in the batch or on the thread count.
constexpr int64_t PART = 256;

// Each position's offset in the cache, found once (a division each).
inline void locate(const int64_t* table, int64_t block, int64_t block_stride, int64_t token_stride, int64_t first,
                   int64_t last, std::vector<int64_t>& where) {
  where.resize(last - first);
  for (int64_t p = first; p < last; ++p) where[p - first] = table[p / block] * block_stride + (p % block) * token_stride;
}

// One query's scores over a part's `n` keys, of which it sees [a, b), to their exponentials less
// the largest (`most`; their sum `total`), zeros where it sees none (-inf and 0 when none at all).
inline void exp_scores(float* sj, int64_t n, int64_t a, int64_t b, float& most, float& total) {
  float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t i = a; i < b; ++i) top = std::max(top, sj[i]);
  for (int64_t i = 0; i < std::min(a, n); ++i) sj[i] = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = a; i < b; ++i) {
    const float e = fast_exp(sj[i] - top);  // (std::exp would be a scalar call per score)
    sj[i] = e;
    sum += e;
  }
  for (int64_t i = std::max<int64_t>(b, 0); i < n; ++i) sj[i] = 0.f;
  most = top;
  total = sum;
}

// One part: the `nq` queries `qf` (float32 [nq, dim], already scaled) that read one KV head's keys
// at positions [first, last) of one sequence (`kp`, `vp`: the cache at this KV head; a position's
// token is at table[p / block] * block_stride + (p % block) * token_stride). Query j sees only the
// positions [lo[j], hi[j]) (the rows of a prompt chunk see different numbers of keys). Three
// passes, each over contiguous data the compiler vectorizes: the scores (each key read once for all
// queries), their exponentials less each query's maximum, then the values (each read once for all
// queries) into `acc` [nq, dim], unnormalised; `most` and `total` [nq] get each query's largest
// score and sum of exponentials (-inf and 0 where it sees none of these keys). `D`: the head size
// when known at compile time (0: `dim`).
template <typename T, int D>
void attend_part(const float* qf, int64_t nq, const int64_t* lo, const int64_t* hi, const T* kp, const T* vp,
                 const int64_t* table, int64_t block, int64_t block_stride, int64_t token_stride, int64_t first,
                 int64_t last, int64_t dim_rt, std::vector<float>& score, std::vector<int64_t>& where, float* acc,
                 float* most, float* total) {
  const int64_t dim = D ? D : dim_rt, n = last - first;
  locate(table, block, block_stride, token_stride, first, last, where);
  score.resize(nq * n);
  float* sc = score.data();
  for (int64_t p = first; p < last; ++p) {
    const T* k = kp + where[p - first];
    for (int64_t j = 0; j < nq; ++j) {
      const float* qj = qf + j * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qj[d] * static_cast<float>(k[d]);
      sc[j * n + p - first] = s;
    }
  }
  for (int64_t j = 0; j < nq; ++j)
    exp_scores(sc + j * n, n, std::max<int64_t>(lo[j], first) - first, std::min<int64_t>(hi[j], last) - first,
               most[j], total[j]);
  std::fill(acc, acc + nq * dim, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const T* v = vp + where[i];
    for (int64_t j = 0; j < nq; ++j) {
      const float w = sc[j * n + i];
      float* aj = acc + j * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) aj[d] += w * static_cast<float>(v[d]);
    }
  }
}

#if defined(__AVX512F__)
// The same part in AVX-512 for head sizes of 64 and 128 (float32, bf16 or fp16 caches): scores 16
// keys at a time, each key's dot products for a query left as a vector and the 16 vectors summed
// into one vector of 16 scores by a tree of shuffles (a per-score horizontal sum cost twice its
// multiplies); values into accumulators held in registers for up to 4 queries at once. Each score
// and each sum is computed in one fixed order, wherever its key falls among the 16.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// lane i of the result: the sum of v[i]'s 16 lanes
inline __m512 sum16(const __m512* v) {
  __m512 s[8], w[4], y[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44), _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
}

// a head's D values of one token, a cache line at a time
template <int Hint, typename T, int D>
inline void prefetch_head(const T* p) {
  for (int64_t o = 0; o < D; o += 64 / static_cast<int64_t>(sizeof(T)))
    _mm_prefetch(reinterpret_cast<const char*>(p + o), static_cast<_mm_hint>(Hint));
}

template <typename T, int D>
void attend_part_avx512(const float* qf, int64_t nq, const int64_t* lo, const int64_t* hi, const T* kp,
                        const T* vp, const int64_t* table, int64_t block, int64_t block_stride, int64_t token_stride,
                        int64_t first, int64_t last, std::vector<float>& score, std::vector<int64_t>& where,
                        float* acc, float* most, float* total) {
  constexpr int V = D / 16;  // vectors per head
  const int64_t n = last - first, n16 = (n + 15) / 16 * 16;
  locate(table, block, block_stride, token_stride, first, last, where);
  score.resize(nq * n16);
  float* sc = score.data();
  for (int64_t i = 0; i < std::min<int64_t>(n, 16); ++i) prefetch_head<_MM_HINT_T0, T, D>(kp + where[i]);
  for (int64_t t = 0; t < n; t += 16) {
    const int64_t m = std::min<int64_t>(16, n - t);
    // The next tile's keys to L1 and this tile's values to L2, while this tile's scores compute: a
    // head's slice of a token is a few lines in every token_stride, which the hardware prefetcher
    // alone followed at ~8 GB/s (cache cold, 8 rows over 279 keys), the scores then waiting on it
    for (int64_t i = t + 16; i < std::min<int64_t>(n, t + 32); ++i) prefetch_head<_MM_HINT_T0, T, D>(kp + where[i]);
    for (int64_t i = t; i < t + m; ++i) prefetch_head<_MM_HINT_T1, T, D>(vp + where[i]);
    __m512 key[16][V];
    for (int64_t i = 0; i < 16; ++i)
      for (int c = 0; c < V; ++c) key[i][c] = i < m ? load16(kp + where[t + i] + 16 * c) : _mm512_setzero_ps();
    for (int64_t j = 0; j < nq; ++j) {
      __m512 qv[V], dots[16];
      for (int c = 0; c < V; ++c) qv[c] = _mm512_loadu_ps(qf + j * D + 16 * c);
      for (int i = 0; i < 16; ++i) {
        __m512 d = _mm512_mul_ps(qv[0], key[i][0]);
        for (int c = 1; c < V; ++c) d = _mm512_fmadd_ps(qv[c], key[i][c], d);
        dots[i] = d;
      }
      _mm512_storeu_ps(sc + j * n16 + t, sum16(dots));
    }
  }
  for (int64_t j = 0; j < nq; ++j)
    exp_scores(sc + j * n16, n, std::max<int64_t>(lo[j], first) - first, std::min<int64_t>(hi[j], last) - first,
               most[j], total[j]);
  for (int64_t j0 = 0; j0 < nq; j0 += 4) {
    const int64_t qs = std::min<int64_t>(4, nq - j0);
    __m512 out[4][V];
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < V; ++c) out[j][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; ++i) {
      __m512 val[V];
      for (int c = 0; c < V; ++c) val[c] = load16(vp + where[i] + 16 * c);
      for (int64_t j = 0; j < qs; ++j) {
        const __m512 w = _mm512_set1_ps(sc[(j0 + j) * n16 + i]);
        for (int c = 0; c < V; ++c) out[j][c] = _mm512_fmadd_ps(w, val[c], out[j][c]);
      }
    }
    for (int64_t j = 0; j < qs; ++j)
      for (int c = 0; c < V; ++c) _mm512_storeu_ps(acc + (j0 + j) * D + 16 * c, out[j][c]);
  }
}
#endif

// Tests set this to run the plain loops that CPUs without AVX-512 run.
bool plain_loops = false;

// Rows whose block tables name the same blocks for a part's keys (a prompt chunk's rows, one per
// token; streams that share a cached system prompt) read that part together: its keys once for all
// their queries. At most this many rows a group.
constexpr int64_t GROUP_ROWS = 16;

// One part of keys, [first, last), with the rows reading it and their first query's place in
// acc / most / total for each KV head (`slot`, -1 where the head serves no query head).
struct Part {
  int64_t first, last;
  std::vector<int64_t> rows;
  std::vector<int64_t> slot;
};

template <typename T>
void decode_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& kv_of_q,
                 double scale, int64_t window, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t max_blocks = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* hp = kv_of_q.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t token_stride = kv_heads * dim, block_stride = block * token_stride;
  // the query heads each KV head serves: its keys and values are read once for all of them
  std::vector<std::vector<int64_t>> served(kv_heads);
  for (int64_t h = 0; h < heads; ++h) served[hp[h]].push_back(h);
  auto part_fn = [&](const float* qf, int64_t nq, const int64_t* lo, const int64_t* hi, const T* k, const T* v,
                     const int64_t* table, int64_t first, int64_t last, std::vector<float>& score,
                     std::vector<int64_t>& where, float* acc, float* most, float* total) {
#if defined(__AVX512F__)
    if constexpr (!std::is_same_v<T, double>) {
      if (!plain_loops && dim == 64)
        return attend_part_avx512<T, 64>(qf, nq, lo, hi, k, v, table, block, block_stride, token_stride, first, last,
                                         score, where, acc, most, total);
      if (!plain_loops && dim == 128)
        return attend_part_avx512<T, 128>(qf, nq, lo, hi, k, v, table, block, block_stride, token_stride, first,
                                          last, score, where, acc, most, total);
    }
#endif
    const auto plain = dim == 64 ? attend_part<T, 64> : dim == 128 ? attend_part<T, 128> : attend_part<T, 0>;
    plain(qf, nq, lo, hi, k, v, table, block, block_stride, token_stride, first, last, dim, score, where, acc, most,
          total);
  };

  // keys row r sees: [key_lo[r], key_hi[r]): its own and those before, all its blocks hold, inside the window
  std::vector<int64_t> key_lo(rows), key_hi(rows);
  for (int64_t r = 0; r < rows; ++r) {
    key_hi[r] = std::min(lp[r], max_blocks * block);
    key_lo[r] = window > 0 ? std::max<int64_t>(0, key_hi[r] - window) : 0;
  }
  // Parts begin at multiples of PART, so a row's parts are the same in any group and batch. Rows
  // share a part when their tables name the same blocks over its whole span (padding included):
  // the same memory, each query then masked to its own keys. `mine[r]`: (part, place in its rows).
  std::vector<Part> parts;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> mine(rows);
  std::unordered_map<uint64_t, int64_t> open;  // a part's span hash -> the part that rows may join
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t p0 = key_lo[r] / PART * PART; p0 < key_hi[r]; p0 += PART) {
      const int64_t b0 = p0 / block, b1 = std::min(max_blocks, (p0 + PART + block - 1) / block);
      const int64_t* span = tp + r * max_blocks;
      uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(p0);
      for (int64_t b = b0; b < b1; ++b) h = (h ^ static_cast<uint64_t>(span[b])) * 1099511628211ull;
      auto it = open.find(h);
      int64_t at = -1;
      if (it != open.end()) {
        const Part& cand = parts[it->second];
        const int64_t* other = tp + cand.rows[0] * max_blocks;
        if (static_cast<int64_t>(cand.rows.size()) < GROUP_ROWS && cand.first / PART * PART == p0 &&
            std::equal(span + b0, span + b1, other + b0))
          at = it->second;
      }
      const int64_t first = std::max(p0, key_lo[r]), last = std::min(key_hi[r], p0 + PART);
      if (at < 0) {
        at = static_cast<int64_t>(parts.size());
        parts.push_back({first, last, {}, {}});
        open[h] = at;
      }
      Part& pt = parts[at];
      pt.first = std::min(pt.first, first), pt.last = std::max(pt.last, last);
      mine[r].push_back({at, static_cast<int64_t>(pt.rows.size())});
      pt.rows.push_back(r);
    }
  }
  // one task per (part, KV head): `tasks[i]` = part * kv_heads + head
  std::vector<int64_t> tasks;
  int64_t slots = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(parts.size()); ++i) {
    parts[i].slot.assign(kv_heads, -1);
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      const int64_t nq = static_cast<int64_t>(parts[i].rows.size() * served[kvh].size());
      if (nq == 0) continue;
      parts[i].slot[kvh] = slots;
      slots += nq;
      tasks.push_back(i * kv_heads + kvh);
    }
  }
  const int64_t nt = static_cast<int64_t>(tasks.size());
  std::vector<float> acc(slots * dim), most(slots), total(slots);

  // tasks taken one at a time as threads come free: a long row's parts sit together in the list,
  // and an even static split would hand them all to one thread
#pragma omp parallel num_threads(at::get_num_threads()) if (nt > 1)
  {
    std::vector<float> qf, score;
    std::vector<int64_t> where, lo, hi;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nt; ++i) {
      const Part& pt = parts[tasks[i] / kv_heads];
      const int64_t kvh = tasks[i] % kv_heads;
      const std::vector<int64_t>& group = served[kvh];
      const int64_t g = static_cast<int64_t>(group.size()), nr = static_cast<int64_t>(pt.rows.size());
      const int64_t nq = nr * g;
      qf.resize(nq * dim), lo.resize(nq), hi.resize(nq);
      for (int64_t x = 0; x < nr; ++x) {
        const int64_t r = pt.rows[x];
        for (int64_t j = 0; j < g; ++j) {
          const int64_t at = x * g + j;
          lo[at] = key_lo[r], hi[at] = key_hi[r];
          for (int64_t d = 0; d < dim; ++d)
            qf[at * dim + d] = static_cast<float>(qp[(r * heads + group[j]) * dim + d]) * static_cast<float>(scale);
        }
      }
      const int64_t s = pt.slot[kvh];
      part_fn(qf.data(), nq, lo.data(), hi.data(), kp + kvh * dim, vp + kvh * dim, tp + pt.rows[0] * max_blocks,
              pt.first, pt.last, score, where, acc.data() + s * dim, most.data() + s, total.data() + s);
    }
  }

  // each (row, KV head): its parts' sums rescaled to the largest maximum, in part order
  at::parallel_for(0, rows * kv_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / kv_heads, kvh = t % kv_heads;
      const std::vector<int64_t>& group = served[kvh];
      const int64_t g = static_cast<int64_t>(group.size());
      for (int64_t j = 0; j < g; ++j) {
        float top = -std::numeric_limits<float>::infinity();
        for (const auto& [i, x] : mine[r]) top = std::max(top, most[parts[i].slot[kvh] + x * g + j]);
        std::fill(sum.begin(), sum.end(), 0.f);
        float z = 0.f;
        for (const auto& [i, x] : mine[r]) {
          const int64_t k = parts[i].slot[kvh] + x * g + j;
          if (total[k] == 0.f) continue;  // it saw none of this part's keys
          const float f = std::exp(most[k] - top);  // 1 for the part holding the maximum
          const float* a = acc.data() + k * dim;
          z += f * total[k];
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) sum[d] += f * a[d];
        }
        const float inv = z > 0.f ? 1.f / z : 0.f;  // no keys (an empty window): zeros
        T* o = op + (r * heads + group[j]) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(sum[d] * inv);
      }
    }
  });
}

}  // namespace

// q [rows, heads, dim]; k_cache, v_cache [blocks, block_size, kv_heads, dim]; tables [rows,
// max_blocks] int64; lens [rows] int64 (keys each row sees); kv_of_q [heads] int64.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& kv_of_q,
                        double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the cache must have one dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && kv_of_q.numel() == q.size(1), "paged_decode: head sizes differ");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && kv_of_q.scalar_type() == at::kLong,
              "paged_decode: tables, lens and kv_of_q must be int64");
  TORCH_CHECK(tables.size(0) == q.size(0) && lens.numel() == q.size(0), "paged_decode: one table and length per row");
  at::Tensor qc = q.contiguous(), tc = tables.contiguous(), lc = lens.contiguous(), hc = kv_of_q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the cache must be contiguous");
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_rows<scalar_t>(qc, k_cache, v_cache, tc, lc, hc, scale, window, out);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, py::call_guard<py::gil_scoped_release>(), "decode attention over a paged KV cache");
  m.def("use_plain_loops", [](bool on) { plain_loops = on; }, "run the loops CPUs without AVX-512 run (for tests)");
}
