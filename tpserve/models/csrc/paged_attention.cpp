// Decode attention over a paged KV cache, read in place through block tables.
//
// Each decode row's query attends to the keys its block table names, without first copying
// them into a per-row buffer: rows that share a long prompt's blocks read the same memory.
// One task per (row, KV head), for all the query heads that KV head serves, so its keys and values
// are read once per row; softmax is computed online, block by block, in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fast_exp.h"

namespace {

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

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, score, running_max, total, block_max;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kvh = task % kv_heads;
      const std::vector<int64_t>& group = served[kvh];
      const int64_t g = static_cast<int64_t>(group.size());
      if (g == 0) continue;
      qf.assign(g * dim, 0.f);
      acc.assign(g * dim, 0.f);
      score.assign(g * block, 0.f);
      running_max.assign(g, -std::numeric_limits<float>::infinity());
      total.assign(g, 0.f);
      block_max.assign(g, 0.f);
      for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < dim; ++d)
          qf[j * dim + d] = static_cast<float>(qp[(r * heads + group[j]) * dim + d]) * scale;
      const int64_t len = lp[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      for (int64_t b = first / block; b * block < len && b < max_blocks; ++b) {
        const int64_t id = tp[r * max_blocks + b];
        const int64_t lo = std::max(first, b * block) - b * block, hi = std::min(len - b * block, block);
        if (hi <= lo) continue;
        const T* kb = kp + id * block_stride + kvh * dim;
        const T* vb = vp + id * block_stride + kvh * dim;
        std::fill(block_max.begin(), block_max.end(), -std::numeric_limits<float>::infinity());
        for (int64_t t = lo; t < hi; ++t) {
          const T* krow = kb + t * token_stride;
          for (int64_t j = 0; j < g; ++j) {
            const float* qj = qf.data() + j * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qj[d] * static_cast<float>(krow[d]);
            score[j * block + t] = s;
            block_max[j] = std::max(block_max[j], s);
          }
        }
        for (int64_t j = 0; j < g; ++j) {
          const float new_max = std::max(running_max[j], block_max[j]);
          const float rescale = std::exp(running_max[j] - new_max);
          total[j] *= rescale;
          float* aj = acc.data() + j * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) aj[d] *= rescale;
          float* sj = score.data() + j * block;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = lo; t < hi; ++t) {
            const float p = fast_exp(sj[t] - new_max);  // (std::exp would be a scalar call per score)
            sj[t] = p;
            sum += p;
          }
          total[j] += sum;
          running_max[j] = new_max;
        }
        for (int64_t t = lo; t < hi; ++t) {
          const T* vrow = vb + t * token_stride;
          for (int64_t j = 0; j < g; ++j) {
            const float p = score[j * block + t];
            float* aj = acc.data() + j * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) aj[d] += p * static_cast<float>(vrow[d]);
          }
        }
      }
      for (int64_t j = 0; j < g; ++j) {
        const float inv = total[j] > 0.f ? 1.f / total[j] : 0.f;
        for (int64_t d = 0; d < dim; ++d)
          op[(r * heads + group[j]) * dim + d] = static_cast<T>(acc[j * dim + d] * inv);
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
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
}
