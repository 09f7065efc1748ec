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

// What the values of a push mean, and so how the server combines them.
enum class UpdateKind : uint8_t {
  // Full parameter values, folded in with the Mean combiner:
  // w = ((n - 1) * w + new) / n, n = PushOptions::mean_window.
  kParameters = 1,
  // The worker's change since its last pull: w += delta.
  kDelta = 2,
  // A gradient, applied by SGD: w -= learning_rate * g.
  kGradient = 3,
};

// Options of one push.
struct PushOptions {
  // SGD step size; must be > 0 for kGradient, ignored otherwise.
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

// One named counter of the server's statistics.
using StatEntry = std::pair<std::string, uint64_t>;

}  // namespace tensorspark
