// The element-wise update rules of a PUSH (docs/protocol.md, "PUSH and the
// update rules"). Callers hold the variable's unique lock; buffers must not
// overlap.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensorspark::optimizers {

// Mean combiner: w = ((n - 1) * w + v) / n, n >= 1.
void MeanCombine(float* __restrict w, const float* __restrict v, size_t count, uint32_t n);

// Delta combiner: w += d.
void DeltaApply(float* __restrict w, const float* __restrict d, size_t count);

// SGD: w -= lr * g.
void SgdApply(float* __restrict w, const float* __restrict g, size_t count, float lr);

}  // namespace tensorspark::optimizers
