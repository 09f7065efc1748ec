#include "optimizers/optimizers.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "optimizers/update_rules.h"
#include "protocol/crc32c.h"
#include "protocol/half.h"

namespace tensorspark::optimizers {

namespace {

// Elements per block of the fused update + CRC: the CRC reads each block
// right after the update wrote it, while it is still in L1/L2 (Adam touches
// four buffers, 4 * 32 KiB per block).
constexpr size_t kBlock = 8192;
// Smallest chunk handed to a pool thread: below this the hand-off costs
// more than it saves.
constexpr size_t kMinChunk = size_t{1} << 15;

std::string Num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  return buf;
}

Status Bad(const std::string& msg) {
  return Status(StatusCode::kInvalidArgument, "optimizer " + msg);
}

bool InUnitInterval(float v) { return v >= 0.0f && v < 1.0f; }  // false for NaN
bool NonNegative(float v) { return v >= 0.0f && std::isfinite(v); }

}  // namespace

// ---- configuration -------------------------------------------------------------

int NumSlots(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kMomentum:
    case OptimizerKind::kNesterov:
    case OptimizerKind::kAdagrad:
    case OptimizerKind::kRmsProp:
      return 1;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      return 2;
    case OptimizerKind::kSgd:
      break;
  }
  return 0;
}

const char* KindName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSgd:
      return "sgd";
    case OptimizerKind::kMomentum:
      return "momentum";
    case OptimizerKind::kNesterov:
      return "nesterov";
    case OptimizerKind::kAdagrad:
      return "adagrad";
    case OptimizerKind::kAdam:
      return "adam";
    case OptimizerKind::kAdamW:
      return "adamw";
    case OptimizerKind::kRmsProp:
      return "rmsprop";
  }
  return "unknown";
}

float SlotInit(const OptimizerConfig& config, int i) {
  return config.kind == OptimizerKind::kAdagrad && i == 0 ? config.initial_accumulator : 0.0f;
}

Status ValidateConfig(const OptimizerConfig& c) {
  const auto kind = static_cast<uint8_t>(c.kind);
  if (kind < static_cast<uint8_t>(OptimizerKind::kSgd) ||
      kind > static_cast<uint8_t>(OptimizerKind::kRmsProp)) {
    return Bad("kind " + std::to_string(kind) +
               " is unknown (1 = sgd, 2 = momentum, 3 = nesterov, 4 = adagrad, 5 = adam, "
               "6 = adamw, 7 = rmsprop)");
  }
  const std::string name = KindName(c.kind);
  if (!(c.learning_rate > 0.0f) || !std::isfinite(c.learning_rate)) {
    return Bad("learning_rate must be a finite number > 0 (got " + Num(c.learning_rate) + ")");
  }
  if (!InUnitInterval(c.beta1)) {
    return Bad(
        "beta1 (the momentum of momentum/nesterov, beta_1 of adam/adamw) must be in "
        "[0, 1) (got " +
        Num(c.beta1) + " for " + name + ")");
  }
  if (!InUnitInterval(c.beta2)) {
    return Bad("beta2 (beta_2 of adam/adamw, rho of rmsprop) must be in [0, 1) (got " +
               Num(c.beta2) + " for " + name + ")");
  }
  if (!NonNegative(c.epsilon)) {
    return Bad("epsilon must be a finite number >= 0 (got " + Num(c.epsilon) + ")");
  }
  if (!NonNegative(c.weight_decay)) {
    return Bad("weight_decay must be a finite number >= 0 (got " + Num(c.weight_decay) + ")");
  }
  if (!NonNegative(c.initial_accumulator)) {
    return Bad("initial_accumulator must be a finite number >= 0 (got " +
               Num(c.initial_accumulator) + ")");
  }
  return Status::OK();
}

bool KeepsSlots(const OptimizerConfig& from, const OptimizerConfig& to) {
  return from.kind == to.kind && from.beta1 == to.beta1 && from.beta2 == to.beta2;
}

// ---- kernels --------------------------------------------------------------------
// Plain loops over restrict pointers: -O3 vectorizes each of them (sqrt
// needs -fno-math-errno, set for this file in CMakeLists.txt). No FMA
// contraction or fast-math: results are the IEEE float32 results of the
// formulas as written, the same on every thread and chunking.

void MomentumApply(float* __restrict w, float* __restrict m, const float* __restrict g,
                   size_t count, float lr, float mu) {
  for (size_t i = 0; i < count; ++i) {
    const float mi = mu * m[i] + g[i];
    m[i] = mi;
    w[i] -= lr * mi;
  }
}

void NesterovApply(float* __restrict w, float* __restrict m, const float* __restrict g,
                   size_t count, float lr, float mu) {
  for (size_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float mi = mu * m[i] + gi;
    m[i] = mi;
    w[i] -= lr * (gi + mu * mi);
  }
}

void AdagradApply(float* __restrict w, float* __restrict a, const float* __restrict g, size_t count,
                  float lr, float eps) {
  for (size_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float ai = a[i] + gi * gi;
    a[i] = ai;
    w[i] -= lr * gi / (std::sqrt(ai) + eps);
  }
}

void AdamApply(float* __restrict w, float* __restrict m, float* __restrict v,
               const float* __restrict g, size_t count, float alpha, float one_minus_b1,
               float one_minus_b2, float eps, float decay) {
  // Two loops rather than a branch inside one, so each stays branch-free.
  if (decay > 0.0f) {
    for (size_t i = 0; i < count; ++i) {
      const float gi = g[i];
      const float mi = m[i] + (gi - m[i]) * one_minus_b1;
      const float vi = v[i] + (gi * gi - v[i]) * one_minus_b2;
      m[i] = mi;
      v[i] = vi;
      float wi = w[i];
      wi -= decay * wi;
      w[i] = wi - alpha * mi / (std::sqrt(vi) + eps);
    }
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float mi = m[i] + (gi - m[i]) * one_minus_b1;
    const float vi = v[i] + (gi * gi - v[i]) * one_minus_b2;
    m[i] = mi;
    v[i] = vi;
    w[i] -= alpha * mi / (std::sqrt(vi) + eps);
  }
}

void RmsPropApply(float* __restrict w, float* __restrict v, const float* __restrict g, size_t count,
                  float lr, float rho, float eps) {
  const float one_minus_rho = 1.0f - rho;
  for (size_t i = 0; i < count; ++i) {
    const float gi = g[i];
    const float vi = rho * v[i] + one_minus_rho * (gi * gi);
    v[i] = vi;
    w[i] -= lr * gi / std::sqrt(vi + eps);
  }
}

// ---- one resolved update -------------------------------------------------------------

Update OptimizerUpdate(const OptimizerConfig& c, float lr, uint64_t step) {
  Update u;
  u.lr = lr;
  u.epsilon = c.epsilon;
  switch (c.kind) {
    case OptimizerKind::kSgd:
      u.rule = Rule::kSgd;
      break;
    case OptimizerKind::kMomentum:
    case OptimizerKind::kNesterov:
      u.rule = c.kind == OptimizerKind::kMomentum ? Rule::kMomentum : Rule::kNesterov;
      u.beta1 = c.beta1;
      break;
    case OptimizerKind::kAdagrad:
      u.rule = Rule::kAdagrad;
      break;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: {
      u.rule = Rule::kAdam;
      u.one_minus_b1 = 1.0f - c.beta1;
      u.one_minus_b2 = 1.0f - c.beta2;
      // Bias correction in double: beta^t for large t and 1 - beta^t for
      // small t lose digits in float.
      const double t = static_cast<double>(step);
      const double b1t = std::pow(static_cast<double>(c.beta1), t);
      const double b2t = std::pow(static_cast<double>(c.beta2), t);
      u.alpha = static_cast<float>(static_cast<double>(lr) * std::sqrt(1.0 - b2t) / (1.0 - b1t));
      if (c.kind == OptimizerKind::kAdamW) u.decay = lr * c.weight_decay;
      break;
    }
    case OptimizerKind::kRmsProp:
      u.rule = Rule::kRmsProp;
      u.beta2 = c.beta2;
      break;
  }
  return u;
}

void DecodeSource(Source source, const uint16_t* in, float* out, size_t count) {
  if (source == Source::kBf16) {
    protocol::BFloat16ToFloat(in, out, count);
  } else {
    protocol::HalfToFloat(in, out, count);
  }
}

void ApplyRange(const Update& u, const Buffers& b, size_t begin, size_t end, const float* x) {
  const size_t n = end - begin;
  float* w = b.w + begin;
  switch (u.rule) {
    case Rule::kMean:
      MeanCombine(w, x, n, u.mean_window);
      break;
    case Rule::kDelta:
      DeltaApply(w, x, n);
      break;
    case Rule::kSgd:
      SgdApply(w, x, n, u.lr);
      break;
    case Rule::kMomentum:
      MomentumApply(w, b.slot0 + begin, x, n, u.lr, u.beta1);
      break;
    case Rule::kNesterov:
      NesterovApply(w, b.slot0 + begin, x, n, u.lr, u.beta1);
      break;
    case Rule::kAdagrad:
      AdagradApply(w, b.slot0 + begin, x, n, u.lr, u.epsilon);
      break;
    case Rule::kAdam:
      AdamApply(w, b.slot0 + begin, b.slot1 + begin, x, n, u.alpha, u.one_minus_b1, u.one_minus_b2,
                u.epsilon, u.decay);
      break;
    case Rule::kRmsProp:
      RmsPropApply(w, b.slot0 + begin, x, n, u.lr, u.beta2, u.epsilon);
      break;
  }
}

namespace {

uint32_t ApplyBlocksWithCrc(const Update& u, const Buffers& b, size_t begin, size_t end) {
  uint32_t crc = 0;
  if (b.source == Source::kFloat32) {
    for (size_t off = begin; off < end; off += kBlock) {
      const size_t stop = std::min(end, off + kBlock);
      ApplyRange(u, b, off, stop, b.x + off);
      crc = protocol::Crc32cExtend(crc, b.w + off, (stop - off) * sizeof(float));
    }
    return crc;
  }
  // 32 KiB on the stack of whichever thread runs the chunk; stays in L1/L2
  // between its decode and the update that reads it.
  alignas(64) float decoded[kBlock];
  for (size_t off = begin; off < end; off += kBlock) {
    const size_t stop = std::min(end, off + kBlock);
    DecodeSource(b.source, b.x16 + off, decoded, stop - off);
    ApplyRange(u, b, off, stop, decoded);
    crc = protocol::Crc32cExtend(crc, b.w + off, (stop - off) * sizeof(float));
  }
  return crc;
}

}  // namespace

uint32_t ApplyWithCrc(const Update& u, const Buffers& b, size_t count, ThreadPool* pool,
                      size_t parallel_min) {
  const size_t threads = pool == nullptr ? 1 : pool->parallelism();
  if (threads <= 1 || count < std::max<size_t>(parallel_min, 2 * kMinChunk)) {
    return ApplyBlocksWithCrc(u, b, 0, count);
  }
  // About four chunks per thread, so a thread slowed by other work (another
  // connection's push, the OS) does not hold up the rest; whole blocks each.
  size_t chunk = (count + 4 * threads - 1) / (4 * threads);
  chunk = std::max(kMinChunk, (chunk + kBlock - 1) / kBlock * kBlock);
  const size_t chunks = (count + chunk - 1) / chunk;
  // Per-chunk CRCs combined afterwards cost O(log n) each, far cheaper than
  // a second, single-threaded pass over the values.
  std::vector<uint32_t> crcs(chunks);
  pool->ParallelFor(chunks, [&](size_t c) {
    const size_t begin = c * chunk;
    crcs[c] = ApplyBlocksWithCrc(u, b, begin, std::min(count, begin + chunk));
  });
  uint32_t crc = crcs[0];
  for (size_t c = 1; c < chunks; ++c) {
    const size_t len = std::min(count, (c + 1) * chunk) - c * chunk;
    crc = protocol::Crc32cCombine(crc, crcs[c], len * sizeof(float));
  }
  return crc;
}

}  // namespace tensorspark::optimizers
