// Value types shared by the client and server APIs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tensorspark {

// Element type of a tensor. Wire protocol v1 carries float32 only; the field
// exists so later versions can add types without a new header layout.
enum class DType : uint8_t { kFloat32 = 1 };

// How a client's pushes and pulls carry tensor values on the wire (the
// variables are float32 on the server either way; docs/protocol.md, flags).
//   kFloat32   4 bytes per element, exact.
//   kFloat16   IEEE half, 2 bytes, round to nearest even: relative error
//              <= 2^-11 (4.9e-4) for |x| in [6.1e-5, 65504]. Larger values
//              become +-inf and smaller ones lose precision down to 0
//              (subnormals, then zero below ~6e-8): scale values into range.
//   kBFloat16  bfloat16, 2 bytes: keeps float32's range but only 8
//              significant bits, relative error <= 2^-8 (3.9e-3), so it does
//              NOT meet 1e-3 per element; use it for gradients or deltas
//              where the range matters more than the precision.
// The encodings halve the bytes on the wire; the server decodes pushes into
// float32 and encodes pulls from its float32 values.
enum class WireEncoding : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What the values of a push mean, and so how the server combines them.
enum class UpdateKind : uint8_t {
  // Full parameter values, folded in with the Mean combiner:
  // w = ((n - 1) * w + new) / n, n = PushOptions::mean_window.
  kParameters = 1,
  // The worker's change since its last pull: w += delta.
  kDelta = 2,
  // A gradient, applied by the variable's server-side optimizer
  // (OptimizerConfig), or by plain SGD, w -= learning_rate * g, when none is
  // set.
  kGradient = 3,
};

// Options of one push.
struct PushOptions {
  // Step size of a kGradient push, ignored otherwise. > 0 overrides the
  // configured optimizer's learning rate for this push only; 0 uses it. A
  // variable without an optimizer needs > 0 (plain SGD).
  float learning_rate = 0.0f;
  // n of the Mean combiner (usually the number of workers); must be >= 1 for
  // kParameters, ignored otherwise.
  uint32_t mean_window = 1;
};

// A read-only view of a named float32 tensor owned by the caller.
// The data must stay valid and unchanged until the call that takes it returns.
struct TensorView {
  std::string_view name;
  std::span<const int64_t> shape;
  std::span<const float> data;  // row-major, size == product of shape
};

// A caller-owned buffer that a pull fills in place (no intermediate copy).
struct MutableTensorView {
  std::string_view name;
  std::span<float> data;  // size must equal the variable's element count
};

// Name, type and shape of a variable held by the server.
struct VariableInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;

  int64_t NumElements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// A tensor that owns its values (used by PullAll).
struct Tensor {
  VariableInfo info;
  std::vector<float> values;
};

// A server-side optimizer: how a gradient push (UpdateKind::kGradient)
// changes a variable. The formulas follow the TensorFlow training ops and
// Keras 3 (g is the pushed gradient, lr the learning rate, all element-wise;
// slots start at 0 unless noted):
//   kSgd       w -= lr * g
//   kMomentum  m = beta1 * m + g;  w -= lr * m                  (beta1 = momentum)
//   kNesterov  m = beta1 * m + g;  w -= lr * (g + beta1 * m)
//   kAdagrad   a += g^2;  w -= lr * g / (sqrt(a) + epsilon)     (a starts at initial_accumulator)
//   kAdam      t += 1;  m += (1 - beta1) * (g - m);  v += (1 - beta2) * (g^2 - v);
//              lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t);  w -= lr_t * m / (sqrt(v) + epsilon)
//   kAdamW     w -= lr * weight_decay * w, then the kAdam step
//   kRmsProp   v = beta2 * v + (1 - beta2) * g^2;  w -= lr * g / sqrt(v + epsilon)  (beta2 = rho)
// Adam's lr_t is the bias correction m_hat = m / (1 - beta1^t),
// v_hat = v / (1 - beta2^t) folded into the step size, with epsilon added to
// sqrt(v) rather than sqrt(v_hat), exactly as tf.raw_ops.ApplyAdam and
// keras.optimizers.Adam do. t counts the gradient pushes applied to that
// variable since its slots were (re)set.
enum class OptimizerKind : uint8_t {
  kSgd = 1,
  kMomentum = 2,
  kNesterov = 3,
  kAdagrad = 4,
  kAdam = 5,
  kAdamW = 6,
  kRmsProp = 7,
};

// The optimizer of one or more variables (Client::SetOptimizer). Fields a
// kind does not use are ignored but must still be in range. Slots (m, v, a)
// are kept beside each variable on the server; changing only learning_rate,
// epsilon, weight_decay or initial_accumulator keeps them, changing kind,
// beta1 or beta2 resets them (and Adam's t).
struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSgd;
  float learning_rate = 0.01f;  // finite, > 0
  float beta1 = 0.9f;           // [0, 1): Adam's beta_1, or the momentum of kMomentum/kNesterov
  float beta2 = 0.999f;         // [0, 1): Adam's beta_2, or RMSProp's rho
  float epsilon = 1e-7f;        // finite, >= 0
  float weight_decay = 0.0f;    // finite, >= 0: kAdamW's decoupled decay
  float initial_accumulator = 0.0f;  // finite, >= 0: kAdagrad's starting a
};

// How the server keeps the workers that JOINed the run in step
// (docs/consistency.md). Connections that never join are never waited for.
enum class ConsistencyMode : uint8_t {
  // Pushes are applied on arrival and pulls return at once.
  kAsync = 0,
  // Synchronous rounds: a member's push joins the open round; when every
  // live member has pushed, the server applies the round's average and a
  // member's next pull (or push) waits until then.
  kSync = 1,
  // Stale synchronous parallel: pushes are applied on arrival; a member at
  // clock c pulls only once every live member's clock is >= c - staleness.
  kBoundedStaleness = 2,
};

// The run's consistency settings (Client::Configure).
struct RunConfig {
  ConsistencyMode mode = ConsistencyMode::kAsync;
  uint32_t staleness = 0;             // kBoundedStaleness: allowed clock lag
  float heartbeat_timeout_s = 30.0f;  // finite, > 0: silent members are dropped
  float wait_timeout_s = 600.0f;      // finite, > 0: longest pull/push wait
};

// One named counter of the server's statistics.
using StatEntry = std::pair<std::string, uint64_t>;

// One live member as the server reports it (Client::Reports): its identity,
// clock and progress, and the latest stack dump it sent (REPORT), for a
// hang watchdog. Ages are milliseconds, measured by the server.
struct WorkerReport {
  // report_age_ms of a member that never sent a report.
  static constexpr uint64_t kNoReport = UINT64_MAX;

  int32_t partition = 0;
  int32_t attempt = 0;
  uint64_t clock = 0;
  uint64_t steps = 0;            // of its latest progress report
  uint64_t progress_age_ms = 0;  // since `steps` last increased, or its JOIN
  uint64_t report_age_ms = kNoReport;
  std::string text;  // UTF-8 as the worker sent it (not validated); empty if none
};

// One snapshot file in a server's snapshot_dir (Client::Snapshots;
// docs/snapshots.md).
struct SnapshotInfo {
  uint64_t tag = 0;      // the driver's tag (Client::Snapshot); 0: untagged (timed, final, old)
  uint64_t version = 0;  // the model version it holds
  std::string name;      // file name in the server's snapshot_dir
};

}  // namespace tensorspark
