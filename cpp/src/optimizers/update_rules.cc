#include "optimizers/update_rules.h"

namespace tensorspark::optimizers {

// Plain loops over restrict pointers: -O3 vectorizes each of them.

void MeanCombine(float* __restrict w, const float* __restrict v, size_t count, uint32_t n) {
  if (n <= 1) {
    for (size_t i = 0; i < count; ++i) w[i] = v[i];
    return;
  }
  const float keep = static_cast<float>(n - 1);
  const float nf = static_cast<float>(n);
  // A true division (not * 1/n) keeps results identical to the spec formula;
  // the loop is memory-bound either way.
  for (size_t i = 0; i < count; ++i) w[i] = (keep * w[i] + v[i]) / nf;
}

void DeltaApply(float* __restrict w, const float* __restrict d, size_t count) {
  for (size_t i = 0; i < count; ++i) w[i] += d[i];
}

void SgdApply(float* __restrict w, const float* __restrict g, size_t count, float lr) {
  for (size_t i = 0; i < count; ++i) w[i] -= lr * g[i];
}

}  // namespace tensorspark::optimizers
