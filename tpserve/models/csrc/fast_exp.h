// exp(x) in float32 that the compiler vectorizes inside `#pragma omp simd` loops (std::exp is a
// scalar libm call there, ~20-40 cycles each, and softmax and SiLU make one per score or value).
//
// Cody-Waite range reduction, x = n ln2 + r with |r| <= ln2 / 2, then a degree-6 polynomial for
// e^r (Cephes' expf coefficients, about 1 ulp), scaled by 2^n built in the exponent bits.
// Arguments are clamped to [-87, 88], where float32 e^x is a normal number.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

static inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;  // ln2 in two parts, so n * ln2 is exact enough
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
