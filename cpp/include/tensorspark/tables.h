// Sparse embedding tables on the parameter server (docs/sparse.md).
//
// A table maps int64 ids to rows of `dim` float32 values. Only the rows a
// request names travel: a worker pulls the rows of its batch's unique ids
// and pushes their gradients (or deltas); the server applies a per-row
// optimizer whose state lives beside each row. A row that was never
// written reads as its initial value, a pure function of (table, id, seed),
// so every server, a restarted server and every shard agree on it without
// storing it: rows are stored on their first update only.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace tensorspark {

// Per-row optimizer of a table. Formulas (g: the row's summed gradient, all
// element-wise; a row's state changes only when a push names the row, so
// Adam is "lazy"):
//   kSgd      w -= lr * g
//   kAdagrad  a += g^2;  w -= lr * g / sqrt(a + epsilon)    (Keras 3; a starts at
//             initial_accumulator)
//   kAdam     t += 1 (per row);  m += (1 - beta1) * (g - m);  v += (1 - beta2) * (g^2 - v);
//             w -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)
//   kFtrl     Keras 3 FTRL-proximal (learning_rate_power = lr_power <= 0, l1, l2,
//             l2_shrinkage = 0, beta): slots n (starts at initial_accumulator) and z:
//               n' = n + g^2;  sigma = (n'^-p - n^-p) / lr  (p = lr_power)
//               z += g - sigma * w;  n = n'
//               q = n^-p / lr + 2 * (l2 + beta / (2 * lr))
//               w = |z| > l1 ? (sign(z) * l1 - z) / q : 0
// A delta push (UpdateKind::kDelta) adds the values to the rows and leaves
// the optimizer state alone.
enum class RowOptimizerKind : uint8_t { kSgd = 1, kAdagrad = 2, kAdam = 3, kFtrl = 4 };

struct RowOptimizerConfig {
  RowOptimizerKind kind = RowOptimizerKind::kSgd;
  float learning_rate = 0.01f;       // finite, > 0
  float beta1 = 0.9f;                // kAdam, [0, 1)
  float beta2 = 0.999f;              // kAdam, [0, 1)
  float epsilon = 1e-7f;             // kAdagrad, kAdam; finite, >= 0
  float initial_accumulator = 0.1f;  // kAdagrad, kFtrl; finite, >= 0 (kFtrl: > 0 when lr_power < 0)
  float l1 = 0.0f;                   // kFtrl; finite, >= 0
  float l2 = 0.0f;                   // kFtrl; finite, >= 0
  float lr_power = -0.5f;            // kFtrl; finite, <= 0
  float beta = 0.0f;                 // kFtrl; finite, >= 0
};

// The initial value of a row never written: element j of row `id` is
// InitialValue(...) (tables.h, RowInitialValues), deterministic in
// (table name, seed, id, j).
enum class RowInitializer : uint8_t {
  kZeros = 0,
  kUniform = 1,  // uniform in [-scale, scale) (Keras Embedding's default: scale 0.05)
  kNormal = 2,   // normal with stddev `scale`, truncated at 2 stddev
};

// Which stored row goes when a table at capacity must store a new one.
// Eviction is approximate, as in Redis: of kEvictionSample rows sampled from
// the new row's stripe and from each of a few other stripes, the least
// recently touched (kLru) or least often touched (kLfu) goes. An evicted row reads as its initial
// value again.
enum class EvictionPolicy : uint8_t { kNone = 0, kLru = 1, kLfu = 2 };
inline constexpr uint32_t kEvictionSample = 16;

// Largest row width.
inline constexpr uint32_t kMaxTableDim = 65536;

struct TableConfig {
  std::string name;  // 1..1024 bytes, like a variable name
  uint32_t dim = 0;  // 1..kMaxTableDim
  // Fixed vocabulary: ids in [0, vocab). 0: dynamic, any int64 id.
  uint64_t vocab = 0;
  uint64_t seed = 0;
  RowInitializer initializer = RowInitializer::kUniform;
  float init_scale = 0.05f;  // finite, >= 0
  RowOptimizerConfig optimizer;
  // Most stored rows (0: no limit). At capacity with kNone a push that
  // would store a new row fails with kLimitExceeded, naming the table.
  uint64_t capacity = 0;
  EvictionPolicy eviction = EvictionPolicy::kNone;
  // Admission: an id gets a stored row only once requests (pulls or
  // pushes, each request counting an id once) have named it this many
  // times; until then it reads as its initial value and pushes to it are
  // dropped (counted as admissions refused). 0 or 1: at once. Counts are
  // kept in a count-min sketch, so an id may be admitted a little early,
  // never late.
  uint32_t admit_after = 0;
  // Rows untouched (not pulled or pushed) for this many seconds are
  // dropped and read as initial values again. 0: never.
  uint32_t ttl_s = 0;
};

// A table as LIST_TABLES reports it: its config and the rows it stores.
struct TableInfo {
  TableConfig config;
  uint64_t rows = 0;
};

// The documented id hash (docs/sparse.md, "Sharding"): the SplitMix64
// finalizer of the id's two's-complement bits.
inline uint64_t MixId(int64_t id) {
  uint64_t z = static_cast<uint64_t>(id);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
// The server (0..num_servers-1) that holds row `id` of every table.
inline uint32_t ServerOfId(int64_t id, uint32_t num_servers) {
  return static_cast<uint32_t>(MixId(id) % num_servers);
}

// The documented id of a string (docs/protocol.md, "String ids"): 64-bit
// FNV-1a of its bytes (UTF-8 for text), then MixId, masked to 63 bits so
// ids are non-negative.
inline int64_t HashStringId(std::string_view s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (char c : s) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ULL;
  }
  return static_cast<int64_t>(MixId(static_cast<int64_t>(h)) & 0x7FFFFFFFFFFFFFFFULL);
}

// Initial values of the rows `ids` of a table (out: ids.size() * dim
// floats), exactly what a server returns for rows it has not stored.
void RowInitialValues(std::string_view table, uint64_t seed, RowInitializer init, float scale,
                      uint32_t dim, std::span<const int64_t> ids, float* out);

}  // namespace tensorspark
