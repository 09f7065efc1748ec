// Server-side optimizers (docs/protocol.md, "Server-side optimizers") and
// the driver that applies any update rule of a PUSH to one tensor, in
// chunks on several threads when the tensor is large.
//
// Kernels are plain loops over __restrict pointers that -O3 vectorizes; each
// works on `count` elements starting at the pointers it is given, so a
// caller can split a tensor into [begin, end) chunks. Every element's result
// depends only on that element, so chunking never changes a result bit.
// Callers hold the variable's unique lock; buffers must not overlap.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/thread_pool.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::optimizers {

// ---- configuration -------------------------------------------------------------

// The largest slot count of any kind (Adam's m and v).
inline constexpr int kMaxSlots = 2;

// Number of float32 slot vectors `kind` keeps beside a variable (0..2).
int NumSlots(OptimizerKind kind);
// Lower-case name ("adam"), "unknown" for a value outside the enum.
const char* KindName(OptimizerKind kind);
// Initial value of slot `i` (Adagrad's accumulator starts at
// initial_accumulator, everything else at 0).
float SlotInit(const OptimizerConfig& config, int i);

// InvalidArgument naming the first bad field: unknown kind, learning_rate
// not finite or <= 0, beta1/beta2 outside [0, 1), epsilon, weight_decay or
// initial_accumulator negative or not finite.
[[nodiscard]] Status ValidateConfig(const OptimizerConfig& config);

// True when a variable's slots stay valid going from `from` to `to`: same
// kind and betas (learning rate, epsilon, weight decay and the initial
// accumulator may change).
bool KeepsSlots(const OptimizerConfig& from, const OptimizerConfig& to);

// ---- kernels --------------------------------------------------------------------

// m = mu * m + g;  w -= lr * m
void MomentumApply(float* __restrict w, float* __restrict m, const float* __restrict g,
                   size_t count, float lr, float mu);
// m = mu * m + g;  w -= lr * (g + mu * m)
void NesterovApply(float* __restrict w, float* __restrict m, const float* __restrict g,
                   size_t count, float lr, float mu);
// a += g^2;  w -= lr * g / (sqrt(a) + eps)
void AdagradApply(float* __restrict w, float* __restrict a, const float* __restrict g, size_t count,
                  float lr, float eps);
// m += (1 - b1) * (g - m);  v += (1 - b2) * (g^2 - v);  w -= alpha * m / (sqrt(v) + eps),
// with alpha the bias-corrected step lr * sqrt(1 - b2^t) / (1 - b1^t) and
// one_minus_b1 = 1 - b1, one_minus_b2 = 1 - b2. decay > 0 (AdamW, = lr *
// weight_decay) first applies w -= decay * w.
void AdamApply(float* __restrict w, float* __restrict m, float* __restrict v,
               const float* __restrict g, size_t count, float alpha, float one_minus_b1,
               float one_minus_b2, float eps, float decay);
// v = rho * v + (1 - rho) * g^2;  w -= lr * g / sqrt(v + eps)
void RmsPropApply(float* __restrict w, float* __restrict v, const float* __restrict g, size_t count,
                  float lr, float rho, float eps);

// ---- one resolved update -------------------------------------------------------------

enum class Rule : uint8_t {
  kMean,   // PUSH kind 1
  kDelta,  // PUSH kind 2
  kSgd,    // PUSH kind 3 without optimizer, or with kSgd
  kMomentum,
  kNesterov,
  kAdagrad,
  kAdam,  // also AdamW (decay > 0)
  kRmsProp,
};

// Everything one push needs to update one variable, with the per-step
// scalars (Adam's bias correction) already computed.
struct Update {
  Rule rule = Rule::kSgd;
  uint32_t mean_window = 1;   // kMean
  float lr = 0.0f;            // kSgd, kMomentum, kNesterov, kAdagrad, kRmsProp
  float beta1 = 0.0f;         // momentum (kMomentum, kNesterov)
  float beta2 = 0.0f;         // rho (kRmsProp)
  float one_minus_b1 = 0.0f;  // kAdam
  float one_minus_b2 = 0.0f;  // kAdam, kRmsProp (1 - rho)
  float epsilon = 0.0f;
  float alpha = 0.0f;  // kAdam: bias-corrected step size
  float decay = 0.0f;  // kAdam: lr * weight_decay (AdamW), else 0
};

// The Update of an optimizer step with learning rate `lr` (the configured
// one or a push's override); `step` is Adam's t for this step (>= 1).
Update OptimizerUpdate(const OptimizerConfig& config, float lr, uint64_t step);

// How the pushed tensor is stored: float32, or the 2-byte wire encodings
// (protocol/half.h), decoded block by block inside the update.
enum class Source : uint8_t { kFloat32, kFp16, kBf16 };

// The buffers of one variable: values, slots (null where the rule keeps
// none) and the pushed tensor: `x` for kFloat32, `x16` otherwise.
struct Buffers {
  float* w = nullptr;
  float* slot0 = nullptr;
  float* slot1 = nullptr;
  const float* x = nullptr;
  const uint16_t* x16 = nullptr;
  Source source = Source::kFloat32;
};

// Applies `u` to elements [begin, end); `x` holds the pushed values of
// exactly that range (b.x and b.x16 are not read).
void ApplyRange(const Update& u, const Buffers& b, size_t begin, size_t end, const float* x);
// Applies `u` to elements [begin, end) of a float32 push.
inline void ApplyRange(const Update& u, const Buffers& b, size_t begin, size_t end) {
  ApplyRange(u, b, begin, end, b.x + begin);
}

// Decodes `count` elements of a 2-byte source into float32 (kFloat32 is
// not a valid `source` here).
void DecodeSource(Source source, const uint16_t* in, float* out, size_t count);

// Tensors with at least this many elements are split across the pool.
// Measured on 2 cores (bench/update_apply.cc): from 256K elements two
// threads beat one for every rule, the hand-off costing a few microseconds.
inline constexpr size_t kDefaultParallelMinElements = size_t{1} << 18;

// Applies `u` to all `count` elements and returns the CRC-32C of the new
// values, computed block by block while each block is still in cache. A
// 2-byte source is decoded one block at a time into a stack buffer right
// before the block's update, so it is read once and never expanded whole.
// With a pool of parallelism > 1 and count >= parallel_min, the tensor is
// split into chunks run on the pool (each decoding its own range); each
// chunk's CRC is combined in order (Crc32cCombine), so the result equals
// the serial one bit for bit.
uint32_t ApplyWithCrc(const Update& u, const Buffers& b, size_t count, ThreadPool* pool,
                      size_t parallel_min = kDefaultParallelMinElements);

}  // namespace tensorspark::optimizers
