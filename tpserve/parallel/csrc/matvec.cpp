// Products of a few activation rows with a bf16 or int8 weight, y = x W^T (+ b), for decode on CPU.
//
// At one to a few rows the product is bound by reading W. Stock BLAS paths stream bf16 and int8
// weights at half the speed they stream fp32 (they are built for many rows); here each thread walks
// its own contiguous run of W's rows once, a few rows at a time, and multiplies them with every
// activation row while they are in cache. bf16 uses AVX512-BF16 dot products (fp32 accumulation);
// int8 widens to fp32 and applies one scale per output row. Without those instructions the same
// loops run in plain C++ that the compiler vectorises.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS = 4;  // weight rows per pass: their streams run side by side
constexpr int64_t ACTS = 4;  // activation rows per pass, against the same weight rows
// Weight bytes to prefetch ahead of the loads: the hardware prefetcher alone left M=1 at ~65 % of
// the bandwidth; 8 KiB ahead (the next rows of the stream) brought it to ~95 % on a Xeon.
constexpr int64_t AHEAD = 8192;

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[m, n] for n in [n0, n1): float sums of x[m] . w[n] in `acc`, finished by `store`.
template <typename Store>
void finish(const float* acc, int64_t acts, int64_t rows, int64_t m, int64_t n, Store&& store) {
  for (int64_t i = 0; i < acts; ++i)
    for (int64_t r = 0; r < rows; ++r) store(m + i, n + r, acc[i * ROWS + r]);
}

#if defined(__AVX512BF16__)
template <int A, int R, typename Store>
void bf16_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
  __m512 acc[A][R];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch((const char*)(w + (n + r) * K + k) + AHEAD, _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r) * K + k);
    }
    for (int i = 0; i < A; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m + i) * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 tail = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n + r) * K + k);
    for (int i = 0; i < A; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + (m + i) * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) sums[i * ROWS + r] = _mm512_reduce_add_ps(acc[i][r]);
  finish(sums, A, R, m, n, store);
}
#else
template <int A, int R, typename Store>
void bf16_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) {
      const uint16_t* xr = x + (m + i) * ldx;
      const uint16_t* wr = w + (n + r) * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += bf16_to_float(xr[k]) * bf16_to_float(wr[k]);
      sums[i * ROWS + r] = s;
    }
  finish(sums, A, R, m, n, store);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <int A, int R, typename Store>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
  __m512 acc[A][R];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      if ((k & 63) == 0) _mm_prefetch((const char*)(w + (n + r) * K + k) + AHEAD, _MM_HINT_T0);
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (n + r) * K + k))));
    }
    for (int i = 0; i < A; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + (m + i) * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (k < K) {
    const __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, w + (n + r) * K + k)));
    for (int i = 0; i < A; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + (m + i) * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) sums[i * ROWS + r] = _mm512_reduce_add_ps(acc[i][r]);
  finish(sums, A, R, m, n, store);
}
#else
template <int A, int R, typename Store>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) {
      const float* xr = x + (m + i) * ldx;
      const int8_t* wr = w + (n + r) * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += xr[k] * static_cast<float>(wr[k]);
      sums[i * ROWS + r] = s;
    }
  finish(sums, A, R, m, n, store);
}
#endif

// Every (activation tile, weight row group) of rows [n0, n1), with the tile sizes as template
// arguments so the accumulators stay in registers.
template <typename Tile>
void sweep(int64_t M, int64_t n0, int64_t n1, Tile&& tile) {
  for (int64_t n = n0; n < n1; n += ROWS) {
    const bool whole = n + ROWS <= n1;
    for (int64_t m = 0; m < M; m += ACTS) {
      const int64_t a = std::min(ACTS, M - m);
      if (whole) {
        switch (a) {
          case 4: tile(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{}, m, n); break;
          case 3: tile(std::integral_constant<int, 3>{}, std::integral_constant<int, 4>{}, m, n); break;
          case 2: tile(std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{}, m, n); break;
          default: tile(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{}, m, n);
        }
      } else {
        for (int64_t r = n; r < n1; ++r) {
          switch (a) {
            case 4: tile(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{}, m, r); break;
            case 3: tile(std::integral_constant<int, 3>{}, std::integral_constant<int, 1>{}, m, r); break;
            case 2: tile(std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{}, m, r); break;
            default: tile(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{}, m, r);
          }
        }
      }
    }
  }
}

// Threads take contiguous runs of whole row groups, so each streams its own part of W.
template <typename Body>
void over_rows(int64_t N, Body&& body) {
  const int64_t groups = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) { body(g0 * ROWS, std::min(N, g1 * ROWS)); });
}

void check(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, what, ": x must be [M, K] and the weight [N, K]");
  TORCH_CHECK(x.size(1) == w.size(1), what, ": x has ", x.size(1), " features, the weight ", w.size(1));
  TORCH_CHECK(w.is_contiguous() && x.stride(1) == 1, what, ": the weight must be contiguous and x's rows too");
  if (bias.has_value()) TORCH_CHECK(bias->numel() == w.size(0), what, ": bias must have one value per output row");
}

}  // namespace

// x [M, K] bf16, w [N, K] bf16, bias [N] (any float dtype) -> [M, N] bf16, or float32 with
// `float_out` (a row-parallel rank's partial sums, rounded once after the all-reduce)
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool float_out) {
  check(x, w, bias, "bf16_linear");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_linear: bf16 x and weight");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  auto out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto run = [&](auto* op) {
    auto store = [&](int64_t m, int64_t n, float v) {
      op[m * N + n] = static_cast<std::remove_pointer_t<decltype(op)>>(bp ? v + bp[n] : v);
    };
    over_rows(N, [&](int64_t n0, int64_t n1) {
      sweep(M, n0, n1, [&](auto A, auto R, int64_t m, int64_t n) {
        bf16_tile<decltype(A)::value, decltype(R)::value>(xp, ldx, wp, K, m, n, store);
      });
    });
  };
  if (float_out) run(out.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>());
  return out;
}

// x [M, K] float/bf16/half, w [N, K] int8, scale [N] float, bias [N] -> [M, N] in x's dtype (or float)
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, bool float_out) {
  check(x, w, bias, "int8_linear");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_linear: the weight must be int8");
  TORCH_CHECK(scale.numel() == w.size(0), "int8_linear: one scale per output row");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const int8_t* wp = w.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  auto store = [&](int64_t m, int64_t n, float v) { op[m * N + n] = bp ? v * sp[n] + bp[n] : v * sp[n]; };
  over_rows(N, [&](int64_t n0, int64_t n1) {
    sweep(M, n0, n1, [&](auto A, auto R, int64_t m, int64_t n) {
      int8_tile<decltype(A)::value, decltype(R)::value>(xp, K, wp, K, m, n, store);
    });
  });
  return float_out || x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

bool native_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, "y = x W^T + b for a few bf16 rows");
  m.def("int8_linear", &int8_linear, "y = (x W^T) * scale + b with an int8 weight");
  m.def("native_bf16", &native_bf16, "whether bf16_linear uses AVX512-BF16 dot products");
}
