// Conversions between a kernel's element type and float32. bf16 goes by its bits, rounding to
// nearest even with NaN kept as c10::BFloat16 does, but without its NaN branch, which kept the
// compiler from vectorising `omp simd` loops: a bf16 SiLU of 1,536 values took 12 us against
// float32's 1.5 us.

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

template <>
inline float to_f(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_f(float f) {
  return static_cast<T>(f);
}

template <>
inline c10::BFloat16 from_f(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded), c10::BFloat16::from_bits());
}
