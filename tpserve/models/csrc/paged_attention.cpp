// Decode attention over a paged KV cache, read in place through block tables.
//
// Each decode row's query attends to the keys its block table names, without first copying
// them into a per-row buffer: rows that share a long prompt's blocks read the same memory.
// One task per (row, KV head, part of at most PART keys), for all the query heads that KV head
// serves, so its keys and values are read once per row; softmax in float32 (see attend_part).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace {

// Keys per task. A long row's keys are cut into parts of this many, each part's softmax kept
// unnormalised with its maximum and sum, and the parts merged after (as flash-decoding does), so
// one long row among short ones (a prompt admitted in one-token chunks beside decoding streams)
// spreads over every thread instead of loading one. Fixed, so a row's result never depends on
// what else is in the batch or on the thread count.
constexpr int64_t PART = 256;

// One part: the `g` query heads `qf` (float32 [g, dim], already scaled) that one KV head serves,
// against that head's keys at positions [first, last) of one sequence (`kp`, `vp`: the cache at
// this KV head; a position's token is at table[p / block] * block_stride + (p % block) * token_stride).
// Three passes, each over contiguous data the compiler vectorizes: the scores (each key read once
// for all g heads), their exponentials less each head's maximum, then the values (each read once
// for all g heads) into `acc` [g, dim], unnormalised; `most` and `total` [g] get each head's
// largest score and sum of exponentials. `D`: the head size when known at compile time (0: `dim`).
template <typename T, int D>
void attend_part(const float* qf, int64_t g, const T* kp, const T* vp, const int64_t* table, int64_t block,
                 int64_t block_stride, int64_t token_stride, int64_t first, int64_t last, int64_t dim_rt,
                 std::vector<float>& score, std::vector<int64_t>& where, float* acc, float* most, float* total) {
  const int64_t dim = D ? D : dim_rt, n = last - first;
  where.resize(n);  // each position's offset in the cache, found once (a division each)
  for (int64_t p = first; p < last; ++p) where[p - first] = table[p / block] * block_stride + (p % block) * token_stride;
  score.resize(g * n);
  float* sc = score.data();
  std::fill(most, most + g, -std::numeric_limits<float>::infinity());
  for (int64_t p = first; p < last; ++p) {
    const T* k = kp + where[p - first];
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qf + j * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qj[d] * static_cast<float>(k[d]);
      sc[j * n + p - first] = s;
      most[j] = std::max(most[j], s);
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* sj = sc + j * n;
    const float top = most[j];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const float e = fast_exp(sj[i] - top);  // (std::exp would be a scalar call per score)
      sj[i] = e;
      sum += e;
    }
    total[j] = sum;
  }
  std::fill(acc, acc + g * dim, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const T* v = vp + where[i];
    for (int64_t j = 0; j < g; ++j) {
      const float w = sc[j * n + i];
      float* aj = acc + j * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) aj[d] += w * static_cast<float>(v[d]);
    }
  }
}

struct Part {
  int64_t row, kv_head, first, last;
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
  int64_t g_max = 0;
  for (int64_t h = 0; h < heads; ++h) served[hp[h]].push_back(h);
  for (const auto& s : served) g_max = std::max<int64_t>(g_max, s.size());
  const auto part_fn = dim == 64 ? attend_part<T, 64> : dim == 128 ? attend_part<T, 128> : attend_part<T, 0>;

  // every (row, KV head)'s keys, in parts; `begins[t]`: the first part of task t = row * kv_heads + kv_head
  std::vector<Part> parts;
  std::vector<int64_t> begins(rows * kv_heads + 1);
  for (int64_t r = 0; r < rows; ++r) {
    // keys the row sees: its own and those before, all its blocks hold, inside the window
    const int64_t len = std::min(lp[r], max_blocks * block);
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    for (int64_t kvh = 0; kvh < kv_heads; ++kvh) {
      begins[r * kv_heads + kvh] = static_cast<int64_t>(parts.size());
      if (served[kvh].empty()) continue;
      for (int64_t p = first; p < len; p += PART) parts.push_back({r, kvh, p, std::min(len, p + PART)});
    }
  }
  begins[rows * kv_heads] = static_cast<int64_t>(parts.size());
  const int64_t np = static_cast<int64_t>(parts.size());
  std::vector<float> acc(np * g_max * dim), most(np * g_max), total(np * g_max);

  // parts taken one at a time as threads come free: a long row's parts sit together at its place
  // in the list, and an even static split would hand them all to one thread
#pragma omp parallel num_threads(at::get_num_threads()) if (np > 1)
  {
    std::vector<float> qf(g_max * dim), score;
    std::vector<int64_t> where;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < np; ++i) {
      const Part& pt = parts[i];
      const std::vector<int64_t>& group = served[pt.kv_head];
      const int64_t g = static_cast<int64_t>(group.size());
      for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < dim; ++d)
          qf[j * dim + d] = static_cast<float>(qp[(pt.row * heads + group[j]) * dim + d]) * static_cast<float>(scale);
      part_fn(qf.data(), g, kp + pt.kv_head * dim, vp + pt.kv_head * dim, tp + pt.row * max_blocks, block,
              block_stride, token_stride, pt.first, pt.last, dim, score, where, acc.data() + i * g_max * dim,
              most.data() + i * g_max, total.data() + i * g_max);
    }
  }

  // each (row, KV head): its parts' sums rescaled to the largest maximum, in part order
  at::parallel_for(0, rows * kv_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / kv_heads, kvh = t % kv_heads, p0 = begins[t], p1 = begins[t + 1];
      const std::vector<int64_t>& group = served[kvh];
      for (int64_t j = 0; j < static_cast<int64_t>(group.size()); ++j) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = p0; i < p1; ++i) top = std::max(top, most[i * g_max + j]);
        std::fill(sum.begin(), sum.end(), 0.f);
        float z = 0.f;
        for (int64_t i = p0; i < p1; ++i) {
          const float f = std::exp(most[i * g_max + j] - top);  // 1 for the part holding the maximum
          const float* a = acc.data() + (i * g_max + j) * dim;
          z += f * total[i * g_max + j];
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
}
