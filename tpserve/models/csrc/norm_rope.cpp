// RMSNorm and rotary embedding as one pass each, for eager decode on CPU.
//
// At a decode step's few rows these are tiny, and as torch ops they cost a dispatch per
// operation: transformers' RMSNorm in bf16 is eight ops (~25 us for 576 values), rope four.
// Here each is one call. The math is transformers': RMSNorm normalises in float32, rounds to
// the model's dtype, then multiplies by the weight; rope is x*cos + rotate_half(x)*sin with
// rotate_half's sign folded into `sin`, computed in float32 and rounded once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t rows, int64_t dim, double eps) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * dim;
      T* o = out + r * dim;
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t d = 0; d < dim; ++d) sq += static_cast<float>(xr[d]) * static_cast<float>(xr[d]);
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(dim) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const T normed = static_cast<T>(static_cast<float>(xr[d]) * inv);  // rounded, as transformers does
        o[d] = static_cast<T>(static_cast<float>(w[d]) * static_cast<float>(normed));
      }
    }
  });
}

template <typename T>
void rope_rows(const T* x, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens * heads, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / heads;
      const T* xr = x + i * dim;
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      T* o = out + i * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const int64_t other = d < half ? d + half : d - half;
        o[d] = static_cast<T>(static_cast<float>(xr[d]) * static_cast<float>(c[d]) +
                              static_cast<float>(xr[other]) * static_cast<float>(s[d]));
      }
    }
  });
}

}  // namespace

// x [rows, dim] (contiguous), weight [dim] in x's dtype
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.size(-1) == weight.numel() &&
              x.scalar_type() == weight.scalar_type(), "rms_norm: contiguous x [..., dim] and weight [dim] of one dtype");
  auto out = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, dim, eps);
  });
  return out;
}

// x [tokens, heads, dim] (contiguous); cos, sin [tokens, 1, dim] in x's dtype
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rope: contiguous x [T, H, D]");
  TORCH_CHECK(cos.numel() == x.size(0) * x.size(2) && sin.numel() == cos.numel() && x.size(2) % 2 == 0,
              "rope: cos and sin must be [T, 1, D] with an even D");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: one dtype");
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "transformers' RMSNorm in one pass");
  m.def("rope", &rope, "rotate-half rotary embedding in one pass");
}
