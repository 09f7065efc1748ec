// float32 <-> fp16 / bf16 conversion for the compact wire encodings.
//
// Both round to nearest, ties to even. fp16 keeps 11 significant bits
// (relative error <= 2^-11 for normal values, |x| in [6.1e-5, 65504]; larger
// values become infinity); bf16 keeps float32's range with 8 significant
// bits (relative error <= 2^-8, so bf16 cannot promise 1e-3 per element). NaN stays NaN. The loops
// take any length; fp16 uses the F16C instructions when the CPU has them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensorspark::protocol {

void FloatToHalf(const float* in, uint16_t* out, size_t n);
void HalfToFloat(const uint16_t* in, float* out, size_t n);
void FloatToBFloat16(const float* in, uint16_t* out, size_t n);
void BFloat16ToFloat(const uint16_t* in, float* out, size_t n);

// Portable one-value versions (also the fallback of the loops above).
uint16_t FloatToHalfScalar(float f);
float HalfToFloatScalar(uint16_t h);

}  // namespace tensorspark::protocol
