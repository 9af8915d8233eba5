// Small fused steps of a decoder layer, one pass each, for eager steps on CPU.
//
// At a decode step's few rows these are tiny, and as torch ops they cost a dispatch per
// operation (transformers' bf16 RMSNorm is eight ops, ~25 us for 576 values; rope four; writing
// K and V into the paged cache two more), which at 30 layers is a large part of a token. Here
// each is one call:
//   rms_norm       transformers' RMSNorm: normalise in float32, round to the model's dtype, times the weight;
//   add_rms_norm   the residual sum x + h (rounded as torch's add; a float32 h rounded to x's dtype first,
//                  as a row-parallel sum is) and its RMSNorm;
//   rope           x*cos + rotate_half(x)*sin, rotate_half's sign folded into `sin`, in float32, rounded once;
//   rope_store     rope on the q and k parts of a fused q/k/v projection's output, k and v written to
//                  their paged-cache slots, q returned;
//   silu_mul       silu(gate) * up from a fused gate/up projection's output, each rounded as torch's ops.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "bf16_bits.h"
#include "fast_exp.h"

namespace {

template <typename T>
void rms_row(const T* x, const T* w, T* o, int64_t dim, double eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < dim; ++d) sq += to_f(x[d]) * to_f(x[d]);
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(dim) + static_cast<float>(eps));
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    const T normed = from_f<T>(to_f(x[d]) * inv);  // rounded, as transformers does
    o[d] = from_f<T>(to_f(w[d]) * to_f(normed));
  }
}

template <typename T>
void rope_row(const T* x, const T* c, const T* s, T* o, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    const int64_t other = d < half ? d + half : d - half;
    o[d] = from_f<T>(to_f(x[d]) * to_f(c[d]) + to_f(x[other]) * to_f(s[d]));
  }
}

// H is T, or float: a row-parallel sum not yet rounded, rounded here to T first, as `.to(T)` would
template <typename T, typename H>
void add_row(const T* x, const H* h, T* out, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    if constexpr (std::is_same_v<H, T>) out[d] = from_f<T>(to_f(x[d]) + to_f(h[d]));
    else out[d] = from_f<T>(to_f(x[d]) + to_f(from_f<T>(h[d])));
  }
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t width) {
#pragma omp simd
  for (int64_t d = 0; d < width; ++d) {
    const float g = to_f(gate[d]);
    const T s = from_f<T>(g / (1.f + fast_exp(-g)));  // rounded, as torch's silu
    out[d] = from_f<T>(to_f(s) * to_f(up[d]));
  }
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1 && x.is_contiguous(), what, ": a contiguous CPU tensor [..., dim]");
}

void check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t tokens, int64_t dim, at::ScalarType t,
                       const char* what) {
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * dim && sin.numel() == cos.numel(),
              what, ": cos and sin must be contiguous [tokens, 1, head_dim]");
  TORCH_CHECK(dim % 2 == 0, what, ": the head size must be even");
  TORCH_CHECK(cos.scalar_type() == t && sin.scalar_type() == t, what, ": cos and sin must have x's dtype");
}

}  // namespace

// x [rows, dim] (contiguous), weight [dim] in x's dtype
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.is_contiguous() && x.size(-1) == weight.numel() && x.scalar_type() == weight.scalar_type(),
              "rms_norm: weight must be contiguous [dim] in x's dtype");
  auto out = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * dim, wp, op + r * dim, dim, eps);
    });
  });
  return out;
}

// (x + h, rms_norm(x + h)): the residual stream after a sub-layer and the next sub-layer's input
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& h, const at::Tensor& weight,
                                                double eps) {
  check_rows(x, "add_rms_norm");
  const bool float_h = h.scalar_type() == at::kFloat;
  TORCH_CHECK(h.sizes() == x.sizes() && h.is_contiguous() && (float_h || h.scalar_type() == x.scalar_type()),
              "add_rms_norm: h must be contiguous, of x's shape, in x's dtype or float32");
  TORCH_CHECK(weight.is_contiguous() && x.size(-1) == weight.numel() && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: weight must be contiguous [dim] in x's dtype");
  auto sum = at::empty_like(x), out = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = dim ? x.numel() / dim : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t *sp = sum.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
    const void* hp = h.data_ptr();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (float_h)
          add_row(xp + r * dim, static_cast<const float*>(hp) + r * dim, sp + r * dim, dim);
        else
          add_row(xp + r * dim, static_cast<const scalar_t*>(hp) + r * dim, sp + r * dim, dim);
        rms_row(sp + r * dim, wp, op + r * dim, dim, eps);
      }
    });
  });
  return {sum, out};
}

// x [tokens, heads, dim] (contiguous); cos, sin [tokens, 1, dim] in x's dtype
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "rope: contiguous x [T, H, D]");
  check_rope_tables(cos, sin, x.size(0), x.size(2), x.scalar_type(), "rope");
  auto out = at::empty_like(x);
  const int64_t heads = x.size(1), dim = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *cp = cos.data_ptr<scalar_t>(), *sp = sin.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * heads, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / heads;
        rope_row(xp + i * dim, cp + t * dim, sp + t * dim, op + i * dim, dim);
      }
    });
  });
  return out;
}

// qkv [tokens, (heads + 2 kv_heads) * dim]: each token's q heads, then k heads, then v heads, as
// a fused projection gives them; cos, sin [tokens, 1, dim]; slots [tokens] int64 (block * block_size
// + offset); k_cache, v_cache [blocks, block_size, kv_heads, dim]. Writes rope(k) and v to each
// token's slot and returns rope(q) [tokens, heads, dim].
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                      at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.is_contiguous(), "rope_store: contiguous qkv [T, width]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.size(2) == kv_heads,
              "rope_store: k_cache and v_cache must be contiguous [blocks, block_size, kv_heads, dim]");
  const int64_t tokens = qkv.size(0), dim = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "rope_store: qkv has ", qkv.size(1), " columns, not (",
              heads, " + 2 x ", kv_heads, ") heads x ", dim);
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "rope_store: the cache must have qkv's dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens,
              "rope_store: one int64 slot per token");
  check_rope_tables(cos, sin, tokens, dim, qkv.scalar_type(), "rope_store");
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "rope_store: slot ", slot[t], " is outside the cache's ", capacity);
  auto q = at::empty({tokens, heads, dim}, qkv.options());
  const int64_t width = qkv.size(1), row_heads = heads + 2 * kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_store", [&] {
    const scalar_t *xp = qkv.data_ptr<scalar_t>(), *cp = cos.data_ptr<scalar_t>(), *sp = sin.data_ptr<scalar_t>();
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k_cache.data_ptr<scalar_t>(), *vp = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens * row_heads, 256, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / row_heads, h = i % row_heads;
        const scalar_t* x = xp + t * width + h * dim;
        if (h < heads) {
          rope_row(x, cp + t * dim, sp + t * dim, qp + (t * heads + h) * dim, dim);
        } else if (h < heads + kv_heads) {
          rope_row(x, cp + t * dim, sp + t * dim, kp + (slot[t] * kv_heads + h - heads) * dim, dim);
        } else {
          std::memcpy(vp + (slot[t] * kv_heads + h - heads - kv_heads) * dim, x, dim * sizeof(scalar_t));
        }
      }
    });
  });
  return q;
}

// gate_up [rows, 2 * width] (gate's columns, then up's) -> silu(gate) * up [rows, width]
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: gate_up must be [rows, 2 * width]");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2;
  auto out = at::empty({rows, width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* xp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) silu_mul_row(xp + r * 2 * width, xp + r * 2 * width + width, op + r * width, width);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>(), "transformers' RMSNorm in one pass");
  m.def("add_rms_norm", &add_rms_norm, py::call_guard<py::gil_scoped_release>(), "the residual sum and its RMSNorm in one pass");
  m.def("rope", &rope, py::call_guard<py::gil_scoped_release>(), "rotate-half rotary embedding in one pass");
  m.def("rope_store", &rope_store, py::call_guard<py::gil_scoped_release>(), "rope on a fused projection's q and k, k and v into their cache slots");
  m.def("silu_mul", &silu_mul, py::call_guard<py::gil_scoped_release>(), "silu(gate) * up from a fused gate/up output");
}
