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
#include <cmath>
#include <type_traits>
#include <cstring>
#include <string>
#include <tuple>
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

#if defined(__AVX512F__)
// finish() for a tile's A x R vector accumulators, each summed across its lanes
template <int A, int R, typename Store>
void finish_vectors(__m512 (&acc)[A][R], int64_t m, int64_t n, Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) sums[i * ROWS + r] = _mm512_reduce_add_ps(acc[i][r]);
  finish(sums, A, R, m, n, store);
}
#endif

// How each weight kind is read: one vector of `STEP` weights (and the matching activations) at a
// time, whole or masked at a row's tail, and multiplied into float32 accumulators.
#if defined(__AVX512BF16__)
#define TPSERVE_BF16_VECTORS 1
struct Bf16 {
  using X = uint16_t;
  using W = uint16_t;
  using V = __m512bh;
  using Mask = __mmask32;
  static constexpr int64_t STEP = 32;
  static Mask tail(int64_t n) { return (Mask)((1ull << n) - 1); }
  static V load_w(const W* p) { return (V)_mm512_loadu_si512(p); }
  static V load_w(const W* p, Mask m) { return (V)_mm512_maskz_loadu_epi16(m, p); }
  static V load_x(const X* p) { return (V)_mm512_loadu_si512(p); }
  static V load_x(const X* p, Mask m) { return (V)_mm512_maskz_loadu_epi16(m, p); }
  static __m512 fma(__m512 acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
// Weights widened to float32 in registers, times float32 activations: what the kinds below share.
struct FloatActs {
  using X = float;
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t STEP = 16;
  static Mask tail(int64_t n) { return (Mask)((1u << n) - 1); }
  static V load_x(const X* p) { return _mm512_loadu_ps(p); }
  static V load_x(const X* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 fma(__m512 acc, V x, V w) { return _mm512_fmadd_ps(x, w, acc); }
};

#define TPSERVE_INT8_VECTORS 1
struct Int8 : FloatActs {
  using W = int8_t;
  static V load_w(const W* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static V load_w(const W* p, Mask m) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))); }
};
#endif

#if !defined(TPSERVE_BF16_VECTORS) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Without AVX512-BF16: each bf16 weight widened to float32 (its bits shifted up 16) and multiplied
// with float32 activations. Two cheap instructions per 16 weights keep the loop bound by memory,
// so bf16 still reads half of fp32's bytes per token.
#define TPSERVE_BF16_WIDE 1
struct Bf16Wide : FloatActs {
  using W = uint16_t;
  static V widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static V load_w(const W* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
  static V load_w(const W* p, Mask m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};
#endif

#if defined(__AVX512F__)
// A activation rows times R weight rows, in A*R vector accumulators.
template <typename Kind, int A, int R, typename Store>
void vector_tile(const typename Kind::X* x, int64_t ldx, const typename Kind::W* w, int64_t K, int64_t m, int64_t n,
                 Store&& store) {
  using V = typename Kind::V;
  constexpr int64_t per_line = 64 / sizeof(typename Kind::W);  // weights per cache line: one prefetch each
  __m512 acc[A][R];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + Kind::STEP <= K; k += Kind::STEP) {
    V wv[R];
    for (int r = 0; r < R; ++r) {
      if (k % per_line == 0) _mm_prefetch((const char*)(w + (n + r) * K + k) + AHEAD, _MM_HINT_T0);
      wv[r] = Kind::load_w(w + (n + r) * K + k);
    }
    for (int i = 0; i < A; ++i) {
      const V xv = Kind::load_x(x + (m + i) * ldx + k);
      for (int r = 0; r < R; ++r) acc[i][r] = Kind::fma(acc[i][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const auto tail = Kind::tail(K - k);
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = Kind::load_w(w + (n + r) * K + k, tail);
    for (int i = 0; i < A; ++i) {
      const V xv = Kind::load_x(x + (m + i) * ldx + k, tail);
      for (int r = 0; r < R; ++r) acc[i][r] = Kind::fma(acc[i][r], xv, wv[r]);
    }
  }
  finish_vectors<A, R>(acc, m, n, store);
}
#endif

// The same sums in plain C++ (the compiler vectorises the inner loop), for CPUs without them.
template <int A, int R, typename X, typename W, typename ToFloat, typename Store>
void plain_tile(const X* x, int64_t ldx, const W* w, int64_t K, int64_t m, int64_t n, ToFloat&& to_float,
                Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) {
      const X* xr = x + (m + i) * ldx;
      const W* wr = w + (n + r) * K;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += to_float(xr[k]) * to_float(wr[k]);
      sums[i * ROWS + r] = s;
    }
  finish(sums, A, R, m, n, store);
}

struct AsFloat {
  float operator()(uint16_t v) const { return bf16_to_float(v); }  // bf16 bits
  float operator()(float v) const { return v; }
  float operator()(int8_t v) const { return static_cast<float>(v); }
};

// x is bf16 bits where the CPU multiplies bf16 natively, else float32 (widened once per call)
template <int A, int R, typename X, typename Store>
void bf16_tile(const X* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
#if defined(TPSERVE_BF16_VECTORS)
  vector_tile<Bf16, A, R>(x, ldx, w, K, m, n, store);
#elif defined(TPSERVE_BF16_WIDE)
  vector_tile<Bf16Wide, A, R>(x, ldx, w, K, m, n, store);
#else
  plain_tile<A, R>(x, ldx, w, K, m, n, AsFloat{}, store);
#endif
}

template <int A, int R, typename Store>
void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m, int64_t n, Store&& store) {
#if defined(TPSERVE_INT8_VECTORS)
  vector_tile<Int8, A, R>(x, ldx, w, K, m, n, store);
#else
  plain_tile<A, R>(x, ldx, w, K, m, n, AsFloat{}, store);
#endif
}

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
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
#if defined(TPSERVE_BF16_VECTORS)
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int64_t ldx = x.stride(0);
#else
  const at::Tensor xf = x.to(at::kFloat);  // contiguous: ldx below is its row stride
  const float* xp = xf.data_ptr<float>();
  const int64_t ldx = xf.stride(0);
#endif
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
  // one fused multiply-add, spelled out: the compiler may contract `v * s + b` in one tile size and
  // not another, and a row's result would then depend on how many rows came with it
  auto store = [&](int64_t m, int64_t n, float v) { op[m * N + n] = bp ? std::fma(v, sp[n], bp[n]) : v * sp[n]; };
  over_rows(N, [&](int64_t n0, int64_t n1) {
    sweep(M, n0, n1, [&](auto A, auto R, int64_t m, int64_t n) {
      int8_tile<decltype(A)::value, decltype(R)::value>(xp, K, wp, K, m, n, store);
    });
  });
  return float_out || x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ---- 4-bit weights in groups of 32, as GGUF's Q4_0 / Q4_1 blocks hold them ----------------------
//
// w = q * scale + min with q in 0..15; each group of 32 is 16 bytes, byte j holding element j in its
// low nibble and element j + 16 in its high one; scale and min are float16, one per row and group.
// As llama.cpp does, the activations are quantized to int8 per group of 32 (one float scale dx each),
// so a group's dot product is exact integer math: sum_j x_j w_j = scale * dx * sum_j q_j xq_j
// + min * dx * sum_j xq_j. With AVX512-VNNI one instruction multiplies and adds 64 such pairs.

constexpr int64_t QGROUP = 32;

// One activation matrix quantized per group, laid out as the vector loop reads it: per block of four
// groups, 64 bytes of the groups' first halves (group gi's at 16 * gi), 64 of their second halves,
// and 16 float lanes of dx (lane l: group l / 4's); and per group dx * sum(xq), which the groups'
// mins multiply. Zero past the last group (to whole blocks of 16 groups), so loops read whole vectors.
struct QActs {
  int64_t blocks, groups;      // blocks of 4 groups; groups rounded up to a multiple of 16
  std::vector<int8_t> lo, hi;  // [M, blocks * 64]
  std::vector<float> dx;       // [M, blocks * 16]
  std::vector<float> xs;       // [M, groups]
};

// One group of 32 activations to int8 (symmetric, its largest |x| to 127); returns its scale dx.
template <typename X>
float quantize_group(const X* x, int8_t* xq) {
  float xg[QGROUP];
  float amax = 0.f;
  for (int64_t j = 0; j < QGROUP; ++j) {
    xg[j] = AsFloat{}(x[j]);
    amax = std::max(amax, std::abs(xg[j]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t j = 0; j < QGROUP; ++j)
    xq[j] = static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, xg[j] * inv))));
  return amax / 127.f;
}

template <typename X>
QActs quantize_acts(const X* x, int64_t M, int64_t K) {
  const int64_t G = K / QGROUP;
  QActs q;
  q.blocks = (G + 3) / 4;
  q.groups = (G + 15) / 16 * 16;
  q.lo.assign(M * q.blocks * 64, 0);
  q.hi.assign(M * q.blocks * 64, 0);
  q.dx.assign(M * q.blocks * 16, 0.f);
  q.xs.assign(M * q.groups, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      int8_t xq[QGROUP];
      const float d = quantize_group(x + m * K + g * QGROUP, xq);
      const int64_t b = g / 4, gi = g % 4;
      std::memcpy(q.lo.data() + (m * q.blocks + b) * 64 + 16 * gi, xq, 16);
      std::memcpy(q.hi.data() + (m * q.blocks + b) * 64 + 16 * gi, xq + 16, 16);
      int sum = 0;
      for (int64_t j = 0; j < QGROUP; ++j) sum += xq[j];
      for (int64_t t = 0; t < 4; ++t) q.dx[(m * q.blocks + b) * 16 + 4 * gi + t] = d;
      q.xs[m * q.groups + g] = d * static_cast<float>(sum);
    }
  }
  return q;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define TPSERVE_Q4_VECTORS 1
// up to 16 float16 values from p (zeros past `count`), as floats
inline __m512 load16h(const uint16_t* p, int64_t count) {
  const __m256i h = count >= 16 ? _mm256_loadu_si256((const __m256i*)p)
                                : _mm256_maskz_loadu_epi16((__mmask16)((1u << count) - 1), p);
  return _mm512_cvtph_ps(h);
}

template <int A, int R, typename Store>
void q4_vector_tile(const QActs& xa, const uint8_t* qw, const uint16_t* sc, const uint16_t* mn, int64_t G, int64_t m,
                    int64_t n, Store&& store) {
  const int64_t row = G * 16;  // bytes of one weight row
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[A][R];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  // the min term first: sum over groups of min * dx * sum(xq), 16 groups a vector
  for (int64_t g = 0; g < G; g += 16) {
    for (int r = 0; r < R; ++r) {
      const __m512 mv = load16h(mn + (n + r) * G + g, G - g);
      for (int i = 0; i < A; ++i) acc[i][r] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(xa.xs.data() + (m + i) * xa.groups + g), acc[i][r]);
    }
  }
  // then the scaled integer dot products, a block of four groups (64 bytes of weights) at a time; the
  // scales of 16 groups are converted once and each block's four spread over their groups' lanes
  const __m512i spread[4] = {
      _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
      _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
      _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
      _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
  for (int r = 0; r < R; ++r) {
    const uint8_t* wr = qw + (n + r) * row;
    __m512 s16 = _mm512_setzero_ps();
    for (int64_t b = 0; b < xa.blocks; ++b) {
      const int64_t groups = std::min<int64_t>(4, G - 4 * b);
      if (b % 4 == 0) s16 = load16h(sc + (n + r) * G + 4 * b, G - 4 * b);
      const uint8_t* wp = wr + b * 64;
      _mm_prefetch((const char*)wp + AHEAD, _MM_HINT_T0);
      const __m512i w = groups == 4 ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8((1ull << (16 * groups)) - 1, wp);
      const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
      const __m512 sv = _mm512_permutexvar_ps(spread[b % 4], s16);
      for (int i = 0; i < A; ++i) {
        const int64_t at = (m + i) * xa.blocks + b;
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xa.lo.data() + at * 64));
        d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xa.hi.data() + at * 64));
        const __m512 sdx = _mm512_mul_ps(sv, _mm512_loadu_ps(xa.dx.data() + at * 16));
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sdx, acc[i][r]);
      }
    }
  }
  finish_vectors<A, R>(acc, m, n, store);
}
#endif

// The same integer sums, group by group, in plain C++.
template <int A, int R, typename Store>
void q4_plain_tile(const QActs& xa, const uint8_t* qw, const uint16_t* sc, const uint16_t* mn, int64_t G, int64_t m,
                   int64_t n, Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t at = (m + i) * xa.blocks + g / 4, gi = g % 4;
        const int8_t* lo = xa.lo.data() + at * 64 + 16 * gi;
        const int8_t* hi = xa.hi.data() + at * 64 + 16 * gi;
        const uint8_t* wq = qw + (n + r) * G * 16 + g * 16;
        int d = 0;
#pragma omp simd reduction(+ : d)
        for (int j = 0; j < 16; ++j) d += (wq[j] & 15) * lo[j] + (wq[j] >> 4) * hi[j];
        const float dx = xa.dx[at * 16 + 4 * gi], xs = xa.xs[(m + i) * xa.groups + g];
        s += static_cast<float>(d) * dx * half_to_float(sc[(n + r) * G + g]) + half_to_float(mn[(n + r) * G + g]) * xs;
      }
      sums[i * ROWS + r] = s;
    }
  finish(sums, A, R, m, n, store);
}

// What q4_linear and q8_linear share: x's rows quantized by `quantize` (bf16 read in place, any
// other dtype as a float32 copy), every tile of the [M, N] result by `tile(A, R, acts, m, n, store)`,
// plus the bias, in bf16 when x is bf16 (unless `float_out`), else float32 and then x's dtype.
template <typename Quantize, typename Tile>
at::Tensor grouped_linear(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, bool float_out,
                          Quantize&& quantize, Tile&& tile) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool bf16 = x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && x.stride(0) == K;
  const at::Tensor xf = bf16 ? x : x.to(at::kFloat).contiguous();
  const auto acts = bf16 ? quantize(reinterpret_cast<const uint16_t*>(xf.data_ptr<at::BFloat16>()))
                         : quantize(xf.data_ptr<float>());
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const bool float_result = float_out || !bf16;
  auto out = at::empty({M, N}, x.options().dtype(float_result ? at::kFloat : at::kBFloat16));
  auto run = [&](auto* op) {
    auto store = [&](int64_t m, int64_t n, float v) {
      op[m * N + n] = static_cast<std::remove_pointer_t<decltype(op)>>(bp ? v + bp[n] : v);
    };
    over_rows(N, [&](int64_t n0, int64_t n1) {
      sweep(M, n0, n1, [&](auto A, auto R, int64_t m, int64_t n) { tile(A, R, acts, m, n, store); });
    });
  };
  if (float_result) run(out.data_ptr<float>());
  else run(out.data_ptr<at::BFloat16>());
  return float_result && !float_out && x.scalar_type() != at::kFloat ? out.to(x.scalar_type()) : out;
}

// x [M, K] float/bf16 (rows contiguous), qweight [N, K / 2] uint8, scale and min [N, K / 32] float16,
// bias [N] -> [M, N] in x's dtype (or float32 with `float_out`); bf16 is read and written as it is,
// with no converted copies (a decode step makes hundreds of these calls)
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minv,
                     const c10::optional<at::Tensor>& bias, bool float_out) {
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "q4_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "q4_linear: x must be [M, K] and the weight [N, K / 2]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = K / QGROUP;
  TORCH_CHECK(K % QGROUP == 0, "q4_linear: the input width ", K, " is not a multiple of the group size 32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.size(1) * 2 == K && qweight.is_contiguous(),
              "q4_linear: the weight must be contiguous uint8 [N, K / 2] (two 4-bit values a byte)");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minv.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  minv.is_contiguous() && scale.numel() == N * G && minv.numel() == N * G,
              "q4_linear: scale and min must be contiguous float16 [N, K / 32]");
  if (bias.has_value()) TORCH_CHECK(bias->numel() == N, "q4_linear: bias must have one value per output row");
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(minv.data_ptr<at::Half>());
  return grouped_linear(
      x, N, bias, float_out, [&](const auto* xp) { return quantize_acts(xp, M, K); },
      [&](auto A, auto R, const QActs& xa, int64_t m, int64_t n, auto&& store) {
#if defined(TPSERVE_Q4_VECTORS)
        q4_vector_tile<decltype(A)::value, decltype(R)::value>(xa, wp, sp, mp, G, m, n, store);
#else
        q4_plain_tile<decltype(A)::value, decltype(R)::value>(xa, wp, sp, mp, G, m, n, store);
#endif
      });
}

// ---- int8 weights in groups of 32 with a float16 scale each, as GGUF's Q8_0 blocks hold them ----
//
// w = q * scale. The activations are quantized per group of 32 as above, then offset by 128: VNNI
// multiplies unsigned bytes by signed ones, and sum_j (xq_j + 128) q_j = sum_j xq_j q_j + 128 sum_j q_j,
// where sum_j q_j is one more dot product, with ones, per weight block (not per activation row).

struct Q8Acts {
  int64_t blocks;            // of 64 inputs: two groups
  std::vector<uint8_t> xu;   // [M, blocks * 64]: xq + 128, in input order; 128 (a zero) past the end
  std::vector<float> dx;     // [M, blocks * 16]: lane l holds group 2b + l / 8's dx
};

template <typename X>
Q8Acts quantize_acts8(const X* x, int64_t M, int64_t K) {
  const int64_t G = K / QGROUP;
  Q8Acts q;
  q.blocks = (G + 1) / 2;
  q.xu.assign(M * q.blocks * 64, 128);
  q.dx.assign(M * q.blocks * 16, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      int8_t xq[QGROUP];
      const float d = quantize_group(x + m * K + g * QGROUP, xq);
      uint8_t* out = q.xu.data() + m * q.blocks * 64 + g * QGROUP;
      for (int64_t j = 0; j < QGROUP; ++j) out[j] = static_cast<uint8_t>(128 + xq[j]);
      for (int64_t t = 0; t < 8; ++t) q.dx[(m * q.blocks + g / 2) * 16 + 8 * (g % 2) + t] = d;
    }
  return q;
}

#if defined(TPSERVE_Q4_VECTORS)
template <int A, int R, typename Store>
void q8_vector_tile(const Q8Acts& xa, const int8_t* qw, const uint16_t* sc, int64_t G, int64_t m, int64_t n,
                    Store&& store) {
  const int64_t K = G * QGROUP;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i spread[8];  // block b % 8 of 16 groups' scales: its two groups, each over eight lanes
  for (int t = 0; t < 8; ++t)
    spread[t] = _mm512_set_epi32(2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1, 2 * t + 1,
                                 2 * t, 2 * t, 2 * t, 2 * t, 2 * t, 2 * t, 2 * t, 2 * t);
  __m512 acc[A][R];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    const int8_t* wr = qw + (n + r) * K;
    __m512 s16 = _mm512_setzero_ps();
    for (int64_t b = 0; b < xa.blocks; ++b) {
      const int64_t groups = std::min<int64_t>(2, G - 2 * b);
      if (b % 8 == 0) s16 = load16h(sc + (n + r) * G + 2 * b, G - 2 * b);
      const int8_t* wp = wr + b * 64;
      _mm_prefetch((const char*)wp + AHEAD, _MM_HINT_T0);
      const __m512i w = groups == 2 ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8((1ull << 32) - 1, wp);
      const __m512i offset = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, w), 7);
      const __m512 sv = _mm512_permutexvar_ps(spread[b % 8], s16);
      for (int i = 0; i < A; ++i) {
        const int64_t at = (m + i) * xa.blocks + b;
        const __m512i d = _mm512_sub_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xa.xu.data() + at * 64), w), offset);
        acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, _mm512_loadu_ps(xa.dx.data() + at * 16)),
                                    acc[i][r]);
      }
    }
  }
  finish_vectors<A, R>(acc, m, n, store);
}
#endif

template <int A, int R, typename Store>
void q8_plain_tile(const Q8Acts& xa, const int8_t* qw, const uint16_t* sc, int64_t G, int64_t m, int64_t n,
                   Store&& store) {
  float sums[ACTS * ROWS];
  for (int i = 0; i < A; ++i)
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* xu = xa.xu.data() + (m + i) * xa.blocks * 64 + g * QGROUP;
        const int8_t* wq = qw + (n + r) * G * QGROUP + g * QGROUP;
        int d = 0;
#pragma omp simd reduction(+ : d)
        for (int j = 0; j < QGROUP; ++j) d += (static_cast<int>(xu[j]) - 128) * wq[j];
        s += static_cast<float>(d) * xa.dx[((m + i) * xa.blocks + g / 2) * 16 + 8 * (g % 2)] *
             half_to_float(sc[(n + r) * G + g]);
      }
      sums[i * ROWS + r] = s;
    }
  finish(sums, A, R, m, n, store);
}

// x [M, K] float/bf16, qweight [N, K] int8, scale [N, K / 32] float16, bias [N] -> [M, N] in x's dtype
// (or float32 with `float_out`)
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias, bool float_out) {
  check(x, qweight, bias, "q8_linear");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = K / QGROUP;
  TORCH_CHECK(K % QGROUP == 0, "q8_linear: the input width ", K, " is not a multiple of the group size 32");
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "q8_linear: the weight must be int8");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.numel() == N * G,
              "q8_linear: scale must be contiguous float16 [N, K / 32]");
  const int8_t* wp = qweight.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  return grouped_linear(
      x, N, bias, float_out, [&](const auto* xp) { return quantize_acts8(xp, M, K); },
      [&](auto A, auto R, const Q8Acts& xa, int64_t m, int64_t n, auto&& store) {
#if defined(TPSERVE_Q4_VECTORS)
        q8_vector_tile<decltype(A)::value, decltype(R)::value>(xa, wp, sp, G, m, n, store);
#else
        q8_plain_tile<decltype(A)::value, decltype(R)::value>(xa, wp, sp, G, m, n, store);
#endif
      });
}

// ---- dense copies for prefill: at many rows a dense product beats the group kernels, and
// dequantizing in torch ops (unpack, cat, scale, shift: a temporary per step) cost milliseconds a
// weight, more than the product it feeds ----

template <typename T>
void dequantize_rows(int64_t N, int64_t G, T* out, const uint8_t* qw, const uint16_t* sc, const uint16_t* mn) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float d = half_to_float(sc[n * G + g]), m = half_to_float(mn[n * G + g]);
        const uint8_t* q = qw + (n * G + g) * 16;
        T* o = out + (n * G + g) * QGROUP;
#pragma omp simd
        for (int64_t j = 0; j < 16; ++j) {  // byte j: element j in the low nibble, j + 16 in the high
          o[j] = static_cast<T>(static_cast<float>(q[j] & 15) * d + m);
          o[j + 16] = static_cast<T>(static_cast<float>(q[j] >> 4) * d + m);
        }
      }
  });
}

// qweight [N, K / 2] uint8, scale and min [N, K / 32] float16 -> the dense [N, K] weight q * scale + min
at::Tensor q4_dequantize(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minv,
                         at::ScalarType dtype) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  qweight.is_contiguous(), "q4_dequantize: qweight must be contiguous uint8 [N, K / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = K / QGROUP;
  TORCH_CHECK(K % QGROUP == 0, "q4_dequantize: the input width ", K, " is not a multiple of the group size 32");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minv.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  minv.is_contiguous() && scale.numel() == N * G && minv.numel() == N * G,
              "q4_dequantize: scale and min must be contiguous float16 [N, K / 32]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "q4_dequantize: float32 or bfloat16 out");
  auto out = at::empty({N, K}, qweight.options().dtype(dtype));
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(minv.data_ptr<at::Half>());
  if (dtype == at::kFloat) dequantize_rows(N, G, out.data_ptr<float>(), wp, sp, mp);
  else dequantize_rows(N, G, out.data_ptr<at::BFloat16>(), wp, sp, mp);
  return out;
}

// ---- each row's largest value and its index, for greedy decoding over the LM head's logits ------
//
// torch's argmax and max(dim) track an index per element and run about 8x slower than a plain
// maximum (49,152 logits: ~110 us against ~15). Here one vectorised pass finds the maximum (and
// whether there is a NaN), a second finds its first index, 64 values at a time. As torch's: the
// first of equal maxima, and a NaN counts as the maximum (the first NaN wins).
std::tuple<at::Tensor, at::Tensor> row_max(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "row_max: x must be a float32 CPU matrix with contiguous rows");
  const int64_t M = x.size(0), V = x.size(1), ld = x.stride(0);
  TORCH_CHECK(V > 0, "row_max: rows must not be empty");
  auto best = at::empty({M}, x.options());
  auto index = at::empty({M}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  float* bp = best.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = xp + m * ld;
      float top = -INFINITY;
      int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
      for (int64_t v = 0; v < V; ++v) {
        top = r[v] > top ? r[v] : top;
        nan |= r[v] != r[v];
      }
      int64_t at = 0;
      for (int64_t b = 0; b < V; b += 64) {
        const int64_t e = std::min(V, b + 64);
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t v = b; v < e; ++v) hit |= nan ? r[v] != r[v] : r[v] == top;
        if (!hit) continue;
        for (at = b; !(nan ? r[at] != r[at] : r[at] == top); ++at) {}
        break;
      }
      bp[m] = r[at];
      ip[m] = at;
    }
  });
  return {best, index};
}

bool native_q4() {
#if defined(TPSERVE_Q4_VECTORS)
  return true;
#else
  return false;
#endif
}

bool native_bf16() {
#if defined(TPSERVE_BF16_VECTORS)
  return true;
#else
  return false;
#endif
}

// How bf16_linear multiplies: "avx512bf16" (native dot products), "avx512f" (weights widened to
// float32 in registers) or "plain" (compiler-vectorised C++)
std::string bf16_path() {
#if defined(TPSERVE_BF16_VECTORS)
  return "avx512bf16";
#elif defined(TPSERVE_BF16_WIDE)
  return "avx512f";
#else
  return "plain";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_linear", &bf16_linear, py::call_guard<py::gil_scoped_release>(), "y = x W^T + b for a few bf16 rows");
  m.def("int8_linear", &int8_linear, py::call_guard<py::gil_scoped_release>(), "y = (x W^T) * scale + b with an int8 weight");
  m.def("q4_linear", &q4_linear, py::call_guard<py::gil_scoped_release>(), "y = x W^T + b with W in 4-bit groups of 32 (GGUF Q4_0 / Q4_1)");
  m.def("q8_linear", &q8_linear, py::call_guard<py::gil_scoped_release>(), "y = x W^T + b with W int8 in groups of 32 (GGUF Q8_0)");
  m.def("q4_dequantize", &q4_dequantize, py::call_guard<py::gil_scoped_release>(), "the dense weight of 4-bit groups of 32");
  m.def("row_max", &row_max, py::call_guard<py::gil_scoped_release>(), "each row's largest value and its first index (NaN first)");
  m.def("native_q4", &native_q4, "whether q4_linear uses AVX512-VNNI dot products");
  m.def("native_bf16", &native_bf16, "whether bf16_linear uses AVX512-BF16 dot products");
  m.def("bf16_path", &bf16_path, "how bf16_linear multiplies on this CPU");
}
