#include "protocol/half.h"

#include <cpuid.h>
#include <immintrin.h>

#include <cstring>

namespace tensorspark::protocol {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

bool HasF16c() {
  // F16C from CPUID leaf 1: clang before 16 rejects __builtin_cpu_supports("f16c").
  static const bool has = [] {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0 && __builtin_cpu_supports("avx");
  }();
  return has;
}

__attribute__((target("avx,f16c"))) void FloatToHalfF16c(const float* in, uint16_t* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(in + i);
    __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = FloatToHalfScalar(in[i]);
}

__attribute__((target("avx,f16c"))) void HalfToFloatF16c(const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) out[i] = HalfToFloatScalar(in[i]);
}

}  // namespace

uint16_t FloatToHalfScalar(float f) {
  const uint32_t x = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // Inf or NaN (NaN keeps a quiet payload bit)
    return sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u);
  }
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: Inf
  if (abs < 0x38800000u) {                        // below fp16's normal range
    // Subnormal: value = m * 2^-24. Shift with round-to-nearest-even.
    if (abs < 0x33000000u) return sign;  // under half the smallest subnormal
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped bits.
  uint32_t h = (abs - 0x38000000u) >> 13;
  const uint32_t rem = abs & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into exponent
  return sign | static_cast<uint16_t>(h);
}

float HalfToFloatScalar(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return FromBits(sign | 0x7F800000u | (mant << 13));  // Inf/NaN
  if (exp != 0) return FromBits(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return FromBits(sign);  // +-0
  // Subnormal: normalize.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return FromBits(sign | static_cast<uint32_t>(112 - e) << 23 | ((mant & 0x3FFu) << 13));
}

void FloatToHalf(const float* in, uint16_t* out, size_t n) {
  if (HasF16c()) return FloatToHalfF16c(in, out, n);
  for (size_t i = 0; i < n; ++i) out[i] = FloatToHalfScalar(in[i]);
}

void HalfToFloat(const uint16_t* in, float* out, size_t n) {
  if (HasF16c()) return HalfToFloatF16c(in, out, n);
  for (size_t i = 0; i < n; ++i) out[i] = HalfToFloatScalar(in[i]);
}

void FloatToBFloat16(const float* __restrict in, uint16_t* __restrict out, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t x = Bits(in[i]);
    // NaN: keep it NaN (rounding could carry it into Inf).
    const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
    const uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
    out[i] = static_cast<uint16_t>(nan ? (x >> 16) | 0x40u : rounded >> 16);
  }
}

void BFloat16ToFloat(const uint16_t* __restrict in, float* __restrict out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = FromBits(static_cast<uint32_t>(in[i]) << 16);
}

}  // namespace tensorspark::protocol
