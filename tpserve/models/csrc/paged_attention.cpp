// Decode attention over a paged KV cache, read in place through block tables.
//
// Each decode row's query attends to the keys its block table names, without first copying
// them into a per-row buffer: rows that share a long prompt's blocks read the same memory.
// One task per (row, query head); softmax is computed online, block by block, in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(dim), acc(dim), score(block);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / heads, h = task % heads, kvh = hp[h];
      const int64_t len = lp[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      for (int64_t d = 0; d < dim; ++d) qf[d] = static_cast<float>(qp[(r * heads + h) * dim + d]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      float running_max = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t b = first / block; b * block < len && b < max_blocks; ++b) {
        const int64_t id = tp[r * max_blocks + b];
        const int64_t lo = std::max(first, b * block) - b * block, hi = std::min(len - b * block, block);
        const T* kb = kp + id * block_stride + kvh * dim;
        const T* vb = vp + id * block_stride + kvh * dim;
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t t = lo; t < hi; ++t) {
          const T* krow = kb + t * token_stride;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qf[d] * static_cast<float>(krow[d]);
          score[t] = s;
          block_max = std::max(block_max, s);
        }
        if (hi <= lo) continue;
        const float new_max = std::max(running_max, block_max);
        const float rescale = std::exp(running_max - new_max);
        total *= rescale;
        float* ap = acc.data();
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) ap[d] *= rescale;
        for (int64_t t = lo; t < hi; ++t) {
          const float p = std::exp(score[t] - new_max);
          total += p;
          const T* vrow = vb + t * token_stride;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ap[d] += p * static_cast<float>(vrow[d]);
        }
        running_max = new_max;
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < dim; ++d) op[(r * heads + h) * dim + d] = static_cast<T>(acc[d] * inv);
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
