#include "storage/sparse_table.h"

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "protocol/crc32c.h"

namespace tensorspark {

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
// Irwin-Hall attempts per normal element before giving up with 0 (the odds
// of needing that are below 1e-20).
constexpr uint32_t kNormalAttempts = 16;

uint64_t Mix(uint64_t x) { return MixId(static_cast<int64_t>(x)); }

uint64_t InitBase(std::string_view table, uint64_t seed) {
  return Mix(static_cast<uint64_t>(protocol::Crc32c(table.data(), table.size())) ^
             (seed * kGolden));
}

// The 64 random bits number c of element j of the row keyed `r`.
uint64_t Draw(uint64_t r, uint32_t j, uint32_t c) {
  return Mix(r + kGolden * ((static_cast<uint64_t>(j) << 32) + c + 1));
}

void InitValues(uint64_t base, RowInitializer init, float scale, uint32_t dim, int64_t id,
                float* out) {
  if (init == RowInitializer::kZeros || scale == 0.0f) {
    std::fill(out, out + dim, 0.0f);
    return;
  }
  const uint64_t r = Mix(base ^ static_cast<uint64_t>(id));
  if (init == RowInitializer::kUniform) {
    for (uint32_t j = 0; j < dim; ++j) {
      const float u = static_cast<float>(Draw(r, j, 0) >> 40) * 0x1p-24f;
      out[j] = scale * (2.0f * u - 1.0f);
    }
    return;
  }
  for (uint32_t j = 0; j < dim; ++j) {
    float z = 0.0f;
    for (uint32_t a = 0; a < kNormalAttempts; ++a) {
      // Sum of 12 uniforms (k + 1/2) / 2^16, minus 6: exact in int64.
      int64_t sum = 0;
      for (uint32_t c = 0; c < 3; ++c) {
        const uint64_t x = Draw(r, j, 3 * a + c);
        sum += static_cast<int64_t>(x & 0xFFFF) + static_cast<int64_t>((x >> 16) & 0xFFFF) +
               static_cast<int64_t>((x >> 32) & 0xFFFF) + static_cast<int64_t>(x >> 48);
      }
      const int64_t t = sum + 6 - 6 * 65536;  // z * 2^16
      if (t >= -2 * 65536 && t <= 2 * 65536) {
        z = static_cast<float>(t) * 0x1p-16f;
        break;
      }
    }
    out[j] = scale * z;
  }
}

}  // namespace

void RowInitialValues(std::string_view table, uint64_t seed, RowInitializer init, float scale,
                      uint32_t dim, std::span<const int64_t> ids, float* out) {
  const uint64_t base = InitBase(table, seed);
  for (size_t i = 0; i < ids.size(); ++i) {
    InitValues(base, init, scale, dim, ids[i], out + i * dim);
  }
}

namespace storage {

namespace {

constexpr uint32_t kNoRow = std::numeric_limits<uint32_t>::max();
// Target bytes of one block of rows (rounded to a power of two of rows).
constexpr uint64_t kBlockBytes = 16 * 1024;
constexpr uint32_t kMaxBlockShift = 12;
// Stored rows checked for expiry per touched stripe per push.
constexpr uint32_t kSweepPerPush = 8;
constexpr uint32_t kSketchDepth = 4;
// Stripes besides the new row's that an eviction samples.
constexpr uint32_t kEvictionProbes = 3;
constexpr uint32_t kMaxAdmitAfter = std::numeric_limits<uint16_t>::max();

bool Finite(float x) { return std::isfinite(x); }

Status Invalid(const TableConfig& c, const std::string& what) {
  return Status(StatusCode::kInvalidArgument, "table '" + c.name + "': " + what);
}

std::string Num(float x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(x));
  return buf;
}

uint32_t StripeOf(uint64_t h) { return static_cast<uint32_t>(h >> (64 - kStripeBits)); }

}  // namespace

int RowSlots(RowOptimizerKind kind) {
  switch (kind) {
    case RowOptimizerKind::kSgd:
      return 0;
    case RowOptimizerKind::kAdagrad:
      return 1;
    case RowOptimizerKind::kAdam:
    case RowOptimizerKind::kFtrl:
      return 2;
  }
  return 0;
}

Status ValidateTableConfig(const TableConfig& c) {
  if (c.name.empty() || c.name.size() > 1024) {
    return Status(StatusCode::kInvalidArgument,
                  "table name must be 1..1024 bytes, got " + std::to_string(c.name.size()));
  }
  if (c.dim < 1 || c.dim > kMaxTableDim) {
    return Invalid(c, "dim " + std::to_string(c.dim) + " is out of range [1, " +
                          std::to_string(kMaxTableDim) + "]");
  }
  if (c.vocab > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return Invalid(c, "vocab " + std::to_string(c.vocab) + " is larger than the int64 id range");
  }
  if (c.initializer != RowInitializer::kZeros && c.initializer != RowInitializer::kUniform &&
      c.initializer != RowInitializer::kNormal) {
    return Invalid(c, "unknown initializer " + std::to_string(static_cast<int>(c.initializer)) +
                          " (zeros=0, uniform=1, normal=2)");
  }
  if (!Finite(c.init_scale) || c.init_scale < 0) {
    return Invalid(c, "init_scale " + Num(c.init_scale) + " must be finite and >= 0");
  }
  const RowOptimizerConfig& o = c.optimizer;
  if (o.kind != RowOptimizerKind::kSgd && o.kind != RowOptimizerKind::kAdagrad &&
      o.kind != RowOptimizerKind::kAdam && o.kind != RowOptimizerKind::kFtrl) {
    return Invalid(c, "unknown row optimizer " + std::to_string(static_cast<int>(o.kind)) +
                          " (sgd=1, adagrad=2, adam=3, ftrl=4)");
  }
  if (!Finite(o.learning_rate) || o.learning_rate <= 0) {
    return Invalid(c, "learning_rate " + Num(o.learning_rate) + " must be finite and > 0");
  }
  if (!(o.beta1 >= 0 && o.beta1 < 1)) {
    return Invalid(c, "beta1 " + Num(o.beta1) + " must be in [0, 1)");
  }
  if (!(o.beta2 >= 0 && o.beta2 < 1)) {
    return Invalid(c, "beta2 " + Num(o.beta2) + " must be in [0, 1)");
  }
  const std::pair<const char*, float> nonneg[] = {{"epsilon", o.epsilon},
                                                  {"initial_accumulator", o.initial_accumulator},
                                                  {"l1", o.l1},
                                                  {"l2", o.l2},
                                                  {"beta", o.beta}};
  for (const auto& [field, v] : nonneg) {
    if (!Finite(v) || v < 0) {
      return Invalid(c, std::string(field) + " " + Num(v) + " must be finite and >= 0");
    }
  }
  if (!Finite(o.lr_power) || o.lr_power > 0) {
    return Invalid(c, "lr_power " + Num(o.lr_power) + " must be finite and <= 0");
  }
  if (o.kind == RowOptimizerKind::kFtrl && o.lr_power < 0 && o.initial_accumulator <= 0) {
    return Invalid(c, "ftrl needs initial_accumulator > 0 when lr_power < 0 (got " +
                          Num(o.initial_accumulator) + ")");
  }
  if (c.eviction != EvictionPolicy::kNone && c.eviction != EvictionPolicy::kLru &&
      c.eviction != EvictionPolicy::kLfu) {
    return Invalid(c, "unknown eviction policy " + std::to_string(static_cast<int>(c.eviction)) +
                          " (none=0, lru=1, lfu=2)");
  }
  if (c.admit_after > kMaxAdmitAfter) {
    return Invalid(c, "admit_after " + std::to_string(c.admit_after) + " is above " +
                          std::to_string(kMaxAdmitAfter));
  }
  return Status::OK();
}

// ---- stripes ---------------------------------------------------------------

namespace {

// An index slot: the low 32 bits of the id's hash (they also give its home
// position, so backward-shift deletion needs no rehash) and row + 1 (0: empty).
struct IndexEntry {
  uint32_t tag = 0;
  uint32_t row1 = 0;
};

struct Block {
  std::unique_ptr<float[]> data;  // rows * stride: values, then the slots
  std::unique_ptr<int64_t[]> ids;
  std::unique_ptr<uint32_t[]> last_touch;  // relaxed atomics under a shared lock
  std::unique_ptr<uint32_t[]> touches;     // relaxed atomics under a shared lock
  std::unique_ptr<uint32_t[]> epoch;
  std::unique_ptr<uint32_t[]> step;  // kAdam only
};

}  // namespace

struct SparseTable::Stripe {
  mutable std::shared_mutex mu;   // guards everything below
  std::vector<IndexEntry> index;  // empty or a power of two
  std::vector<Block> blocks;
  uint32_t rows = 0;
  uint32_t sweep = 0;  // TTL sweep cursor
  uint64_t rng = 0;    // eviction sampling (SplitMix64 state)

  // Layout, copied from the table (changed only under its config lock).
  uint32_t stride = 0;
  uint32_t shift = 0;
  bool has_step = false;

  uint32_t mask() const { return static_cast<uint32_t>(index.size() - 1); }
  const Block& B(uint32_t row) const { return blocks[row >> shift]; }
  Block& B(uint32_t row) { return blocks[row >> shift]; }
  uint32_t Off(uint32_t row) const { return row & ((1u << shift) - 1); }
  float* Data(uint32_t row) { return B(row).data.get() + uint64_t{Off(row)} * stride; }
  const float* Data(uint32_t row) const { return B(row).data.get() + uint64_t{Off(row)} * stride; }
  int64_t& Id(uint32_t row) { return B(row).ids[Off(row)]; }
  int64_t Id(uint32_t row) const { return B(row).ids[Off(row)]; }
  uint32_t& LastTouch(uint32_t row) { return B(row).last_touch[Off(row)]; }
  uint32_t& Touches(uint32_t row) { return B(row).touches[Off(row)]; }
  uint32_t& Epoch(uint32_t row) { return B(row).epoch[Off(row)]; }
  uint32_t LoadLastTouch(uint32_t row) const {
    return std::atomic_ref<uint32_t>(B(row).last_touch[Off(row)]).load(std::memory_order_relaxed);
  }
  uint32_t LoadTouches(uint32_t row) const {
    return std::atomic_ref<uint32_t>(B(row).touches[Off(row)]).load(std::memory_order_relaxed);
  }
  uint32_t Step(uint32_t row) const { return has_step ? B(row).step[Off(row)] : 0; }

  uint32_t Find(uint64_t h, int64_t id) const {
    if (index.empty()) return kNoRow;
    const uint32_t tag = static_cast<uint32_t>(h);
    const uint32_t m = mask();
    for (uint32_t p = tag & m;; p = (p + 1) & m) {
      const IndexEntry& e = index[p];
      if (e.row1 == 0) return kNoRow;
      if (e.tag == tag && Id(e.row1 - 1) == id) return e.row1 - 1;
    }
  }

  // Find() for the ids at order positions [b, e) of `sc` into rows[b..e),
  // in chunks whose index entries and rows are prefetched together, so
  // the cache misses of a chunk overlap instead of following each other.
  template <typename ScratchT>
  void FindBatch(const ScratchT& sc, std::span<const int64_t> ids, uint32_t b, uint32_t e,
                 uint32_t* rows) const {
    if (index.empty()) {
      std::fill(rows + b, rows + e, kNoRow);
      return;
    }
    constexpr uint32_t kChunk = 32;
    const uint32_t m = mask();
    for (uint32_t c = b; c < e; c += kChunk) {
      const uint32_t ce = std::min(e, c + kChunk);
      for (uint32_t k = c; k < ce; ++k) {
        __builtin_prefetch(&index[static_cast<uint32_t>(sc.hash[sc.order[k]]) & m]);
      }
      // Candidates by tag alone; their rows are prefetched.
      for (uint32_t k = c; k < ce; ++k) {
        const uint32_t tag = static_cast<uint32_t>(sc.hash[sc.order[k]]);
        uint32_t cand = kNoRow;
        for (uint32_t p = tag & m;; p = (p + 1) & m) {
          const IndexEntry& x = index[p];
          if (x.row1 == 0) break;
          if (x.tag == tag) {
            cand = x.row1 - 1;
            break;
          }
        }
        rows[k] = cand;
        if (cand == kNoRow) continue;
        const Block& blk = B(cand);
        const uint32_t off = Off(cand);
        const float* d = blk.data.get() + uint64_t{off} * stride;
        __builtin_prefetch(&blk.ids[off]);
        __builtin_prefetch(d);
        __builtin_prefetch(d + stride - 1);
        __builtin_prefetch(&blk.last_touch[off]);
        __builtin_prefetch(&blk.touches[off]);
      }
      for (uint32_t k = c; k < ce; ++k) {
        const int64_t id = ids[sc.order[k]];
        if (rows[k] != kNoRow && Id(rows[k]) != id) rows[k] = Find(sc.hash[sc.order[k]], id);
      }
    }
  }

  // Position in `index` of the entry that points at `row` (which exists).
  uint32_t EntryOf(uint32_t row) const {
    const uint32_t tag = static_cast<uint32_t>(MixId(Id(row)));
    const uint32_t m = mask();
    uint32_t p = tag & m;
    while (index[p].row1 != row + 1) p = (p + 1) & m;
    return p;
  }

  static void Place(std::vector<IndexEntry>& index, IndexEntry e) {
    const uint32_t m = static_cast<uint32_t>(index.size() - 1);
    uint32_t p = e.tag & m;
    while (index[p].row1 != 0) p = (p + 1) & m;
    index[p] = e;
  }

  void GrowIndexFor(uint32_t n) {
    if (uint64_t{n} * 4 <= uint64_t{index.size()} * 3) return;
    size_t cap = std::max<size_t>(16, index.size());
    while (uint64_t{n} * 4 > uint64_t{cap} * 3) cap *= 2;
    std::vector<IndexEntry> next(cap);
    for (const IndexEntry& e : index) {
      if (e.row1 != 0) Place(next, e);
    }
    index.swap(next);
  }

  void AddBlock() {
    const size_t n = size_t{1} << shift;
    Block b;
    b.data = std::make_unique_for_overwrite<float[]>(n * stride);
    b.ids = std::make_unique_for_overwrite<int64_t[]>(n);
    b.last_touch = std::make_unique_for_overwrite<uint32_t[]>(n);
    b.touches = std::make_unique_for_overwrite<uint32_t[]>(n);
    b.epoch = std::make_unique_for_overwrite<uint32_t[]>(n);
    if (has_step) b.step = std::make_unique_for_overwrite<uint32_t[]>(n);
    blocks.push_back(std::move(b));
  }

  // A new row for `id` (metadata zeroed, data unset).
  uint32_t Append(uint64_t h, int64_t id) {
    GrowIndexFor(rows + 1);
    if ((rows >> shift) >= blocks.size()) AddBlock();
    const uint32_t row = rows++;
    Id(row) = id;
    LastTouch(row) = 0;
    Touches(row) = 0;
    Epoch(row) = 0;
    if (has_step) B(row).step[Off(row)] = 0;
    Place(index, IndexEntry{static_cast<uint32_t>(h), row + 1});
    return row;
  }

  // Removes `row`: backward-shift deletion of its entry, then the last row
  // moves into its place.
  void Remove(uint32_t row) {
    const uint32_t m = mask();
    uint32_t hole = EntryOf(row);
    for (uint32_t p = (hole + 1) & m;; p = (p + 1) & m) {
      const IndexEntry e = index[p];
      if (e.row1 == 0) break;
      const uint32_t home = e.tag & m;
      // Move e into the hole unless its home lies cyclically in (hole, p].
      if (((p - home) & m) >= ((p - hole) & m)) {
        index[hole] = e;
        hole = p;
      }
    }
    index[hole] = IndexEntry{};
    const uint32_t last = rows - 1;
    if (row != last) {
      index[EntryOf(last)].row1 = row + 1;
      std::memcpy(Data(row), Data(last), sizeof(float) * stride);
      Id(row) = Id(last);
      LastTouch(row) = LastTouch(last);
      Touches(row) = Touches(last);
      Epoch(row) = Epoch(last);
      if (has_step) B(row).step[Off(row)] = B(last).step[Off(last)];
    }
    --rows;
    // Keep one spare block so a row count hovering at a block edge does not
    // allocate and free a block on every push.
    while (blocks.size() >= 2 &&
           (size_t{rows} + (size_t{2} << shift)) <= (blocks.size() << shift)) {
      blocks.pop_back();
    }
  }

  void Reset() {
    std::vector<IndexEntry>().swap(index);
    std::vector<Block>().swap(blocks);
    rows = 0;
    sweep = 0;
  }

  uint64_t Bytes() const {
    const uint64_t per_row = uint64_t{stride} * 4 + 8 + 4 * (has_step ? 4 : 3);
    return (uint64_t{blocks.size()} << shift) * per_row + index.size() * sizeof(IndexEntry);
  }
};

// Per-thread buffers of one request, so a request allocates nothing per id.
struct SparseTable::Scratch {
  std::vector<uint64_t> hash;    // per id
  std::vector<uint32_t> order;   // positions of ids, grouped by stripe
  std::vector<uint32_t> row;     // per order position: found row or kNoRow
  std::vector<Action> action;    // per order position (Push)
  std::vector<int64_t> missing;  // ids a pull read as initial (admission counts)
  std::array<uint32_t, kStripes + 1> start{};
  // Open-addressing set of the push's ids: keys valid where gen == cur_gen.
  std::vector<int64_t> set_keys;
  std::vector<uint32_t> set_gen;
  uint32_t cur_gen = 0;
  uint32_t set_mask = 0;

  void Group(std::span<const int64_t> ids) {
    const size_t n = ids.size();
    hash.resize(n);
    order.resize(n);
    std::array<uint32_t, kStripes> count{};
    for (size_t i = 0; i < n; ++i) {
      hash[i] = MixId(ids[i]);
      ++count[StripeOf(hash[i])];
    }
    start[0] = 0;
    for (uint32_t s = 0; s < kStripes; ++s) start[s + 1] = start[s] + count[s];
    std::array<uint32_t, kStripes> fill;
    std::copy(start.begin(), start.begin() + kStripes, fill.begin());
    for (size_t i = 0; i < n; ++i) order[fill[StripeOf(hash[i])]++] = static_cast<uint32_t>(i);
  }

  // Builds the set of `ids` (after Group); returns the position of the
  // first id seen twice, or -1.
  int64_t BuildSet(std::span<const int64_t> ids) {
    size_t cap = 16;
    while (cap < ids.size() * 2) cap *= 2;
    if (set_keys.size() < cap || ++cur_gen == 0) {
      set_keys.assign(std::max(cap, set_keys.size()), 0);
      set_gen.assign(set_keys.size(), 0);
      cur_gen = 1;
    }
    set_mask = static_cast<uint32_t>(cap - 1);
    for (size_t i = 0; i < ids.size(); ++i) {
      for (uint32_t p = static_cast<uint32_t>(hash[i]) & set_mask;; p = (p + 1) & set_mask) {
        if (set_gen[p] != cur_gen) {
          set_gen[p] = cur_gen;
          set_keys[p] = ids[i];
          break;
        }
        if (set_keys[p] == ids[i]) return static_cast<int64_t>(i);
      }
    }
    return -1;
  }

  bool InSet(int64_t id) const {
    for (uint32_t p = static_cast<uint32_t>(MixId(id)) & set_mask;; p = (p + 1) & set_mask) {
      if (set_gen[p] != cur_gen) return false;
      if (set_keys[p] == id) return true;
    }
  }
};

enum class SparseTable::Action : uint8_t { kUpdate, kNew, kReset, kDrop };

namespace {

// Locks the stripes `mask` names, in increasing order; unlocks on scope exit.
template <typename StripeT>
class StripeLocks {
 public:
  StripeLocks(StripeT* stripes, uint64_t mask) : stripes_(stripes), mask_(mask) {
    for (uint64_t m = mask_; m != 0; m &= m - 1) stripes_[std::countr_zero(m)].mu.lock();
  }
  ~StripeLocks() {
    for (uint64_t m = mask_; m != 0; m &= m - 1) stripes_[std::countr_zero(m)].mu.unlock();
  }
  StripeLocks(const StripeLocks&) = delete;
  StripeLocks& operator=(const StripeLocks&) = delete;

 private:
  StripeT* stripes_;
  uint64_t mask_;
};

Status CheckRange(const TableConfig& c, std::span<const int64_t> ids) {
  if (c.vocab == 0) return Status::OK();
  const uint64_t vocab = c.vocab;
  for (int64_t id : ids) {
    if (static_cast<uint64_t>(id) >= vocab) {  // negative ids wrap above vocab
      return Status(StatusCode::kInvalidArgument,
                    "table '" + c.name + "': id " + std::to_string(id) + " is out of range [0, " +
                        std::to_string(vocab) +
                        ") of its fixed vocabulary (ids must be 0 <= id < input_dim)");
    }
  }
  return Status::OK();
}

uint64_t SystemNow() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// One row's optimizer step (g: its gradient). `alpha` is Adam's step size
// for this row's new t.
struct RowUpdate {
  RowOptimizerKind kind;
  uint32_t dim;
  float lr;
  RowOptimizerConfig o;
  // Adam's alpha by step, direct-mapped: rows of a push mostly share a few
  // steps, and two std::pow per row would dominate a narrow row's update.
  std::array<uint32_t, 64> alpha_t{};
  std::array<float, 64> alpha{};

  float Alpha(uint32_t t) {
    const uint32_t k = t & 63;
    if (alpha_t[k] != t) {
      const double b1t = std::pow(static_cast<double>(o.beta1), static_cast<double>(t));
      const double b2t = std::pow(static_cast<double>(o.beta2), static_cast<double>(t));
      alpha[k] = static_cast<float>(static_cast<double>(lr) * std::sqrt(1.0 - b2t) / (1.0 - b1t));
      alpha_t[k] = t;
    }
    return alpha[k];
  }
};

void ApplyGradient(RowUpdate& u, float* w, const float* g, uint32_t* step) {
  const uint32_t dim = u.dim;
  const float lr = u.lr;
  switch (u.kind) {
    case RowOptimizerKind::kSgd:
      for (uint32_t j = 0; j < dim; ++j) w[j] -= lr * g[j];
      return;
    case RowOptimizerKind::kAdagrad: {
      float* a = w + dim;
      const float eps = u.o.epsilon;
      for (uint32_t j = 0; j < dim; ++j) {
        a[j] += g[j] * g[j];
        w[j] -= lr * g[j] / std::sqrt(a[j] + eps);
      }
      return;
    }
    case RowOptimizerKind::kAdam: {
      float* m = w + dim;
      float* v = w + 2 * dim;
      const uint32_t t = *step == std::numeric_limits<uint32_t>::max() ? *step : *step + 1;
      *step = t;
      const double b1t = std::pow(static_cast<double>(u.o.beta1), static_cast<double>(t));
      const double b2t = std::pow(static_cast<double>(u.o.beta2), static_cast<double>(t));
      const float alpha =
          static_cast<float>(static_cast<double>(lr) * std::sqrt(1.0 - b2t) / (1.0 - b1t));
      const float c1 = 1.0f - u.o.beta1;
      const float c2 = 1.0f - u.o.beta2;
      const float eps = u.o.epsilon;
      for (uint32_t j = 0; j < dim; ++j) {
        m[j] += (g[j] - m[j]) * c1;
        v[j] += (g[j] * g[j] - v[j]) * c2;
        w[j] -= (m[j] * alpha) / (std::sqrt(v[j]) + eps);
      }
      return;
    }
    case RowOptimizerKind::kFtrl: {
      float* n = w + dim;
      float* z = w + 2 * dim;
      const float p = -u.o.lr_power;  // >= 0
      const float l1 = u.o.l1;
      const float l2r = u.o.l2 + u.o.beta / (2.0f * lr);
      const bool root = p == 0.5f;
      for (uint32_t j = 0; j < dim; ++j) {
        const float n1 = n[j] + g[j] * g[j];
        const float pn1 = root ? std::sqrt(n1) : std::pow(n1, p);
        const float pn0 = root ? std::sqrt(n[j]) : std::pow(n[j], p);
        z[j] += g[j] - (pn1 - pn0) / lr * w[j];
        const float q = pn1 / lr + 2.0f * l2r;
        w[j] = (std::clamp(z[j], -l1, l1) - z[j]) / q;
        n[j] = n1;
      }
      return;
    }
  }
}

}  // namespace

// ---- SparseTable -------------------------------------------------------------

SparseTable::SparseTable(const TableConfig& config, std::function<uint64_t()> now_s)
    : config_(config), now_s_(now_s ? std::move(now_s) : std::function<uint64_t()>(SystemNow)) {
  epoch_unix_s_ = now_s_();
  init_base_ = InitBase(config_.name, config_.seed);
  stripes_ = std::make_unique<Stripe[]>(kStripes);
  for (uint32_t s = 0; s < kStripes; ++s) {
    stripes_[s].rng = Mix(init_base_ + s);
  }
  Relayout();
  AllocSketch();
}

SparseTable::~SparseTable() = default;

uint32_t SparseTable::NowRel() const {
  const uint64_t now = now_s_();
  if (now <= epoch_unix_s_) return 0;
  return static_cast<uint32_t>(
      std::min<uint64_t>(now - epoch_unix_s_, std::numeric_limits<uint32_t>::max()));
}

bool SparseTable::Expired(uint32_t last_touch, uint32_t now) const {
  return config_.ttl_s != 0 && now >= last_touch && now - last_touch >= config_.ttl_s;
}

void SparseTable::InitRow(int64_t id, float* row) const {
  InitValues(init_base_, config_.initializer, config_.init_scale, config_.dim, id, row);
  InitSlots(row);
}

void SparseTable::InitSlots(float* row) const {
  const uint32_t dim = config_.dim;
  const RowOptimizerKind kind = config_.optimizer.kind;
  const float a0 = (kind == RowOptimizerKind::kAdagrad || kind == RowOptimizerKind::kFtrl)
                       ? config_.optimizer.initial_accumulator
                       : 0.0f;
  std::fill(row + dim, row + dim * (1 + slots_), 0.0f);
  if (slots_ > 0) std::fill(row + dim, row + 2 * dim, a0);
}

void SparseTable::Relayout() {
  const uint32_t slots = static_cast<uint32_t>(RowSlots(config_.optimizer.kind));
  const uint32_t stride = config_.dim * (1 + slots);
  const bool has_step = config_.optimizer.kind == RowOptimizerKind::kAdam;
  const uint64_t row_bytes = uint64_t{stride} * 4 + 24;
  uint32_t shift = 0;
  while (shift < kMaxBlockShift && (row_bytes << (shift + 1)) <= kBlockBytes) ++shift;
  slots_ = slots;
  stride_ = stride;
  block_shift_ = shift;
  for (uint32_t s = 0; s < kStripes; ++s) {
    Stripe& st = stripes_[s];
    std::unique_lock lock(st.mu);
    if (st.rows == 0) {
      st.blocks.clear();
      st.stride = stride;
      st.shift = shift;
      st.has_step = has_step;
      continue;
    }
    Stripe next;
    next.stride = stride;
    next.shift = shift;
    next.has_step = has_step;
    next.index = std::move(st.index);
    const uint32_t n = st.rows;
    while ((size_t{next.blocks.size()} << shift) < n) next.AddBlock();
    for (uint32_t r = 0; r < n; ++r) {
      float* to = next.Data(r);
      std::memcpy(to, st.Data(r), sizeof(float) * config_.dim);
      InitSlots(to);
      next.Id(r) = st.Id(r);
      next.LastTouch(r) = st.LastTouch(r);
      next.Touches(r) = st.Touches(r);
      next.Epoch(r) = epoch_.load(std::memory_order_relaxed);
      if (has_step) next.B(r).step[next.Off(r)] = 0;
    }
    st.index = std::move(next.index);
    st.blocks = std::move(next.blocks);
    st.stride = stride;
    st.shift = shift;
    st.has_step = has_step;
  }
}

void SparseTable::AllocSketch() {
  if (config_.admit_after <= 1) {
    sketch_ = {};
    sketch_mask_ = 0;
    return;
  }
  // About two counters per row the table may hold (a million for a table
  // without a capacity), so collisions admit few ids early.
  uint64_t width = 1u << 12;
  const uint64_t want = config_.capacity ? config_.capacity * 2 : (uint64_t{1} << 20);
  while (width < want && width < (uint64_t{1} << 22)) width *= 2;
  if (sketch_.size() == width * kSketchDepth) return;
  sketch_.assign(width * kSketchDepth, 0);
  sketch_mask_ = width - 1;
}

uint32_t SparseTable::SketchEstimate(uint64_t h) const {
  const uint64_t h2 = Mix(h ^ kGolden);
  const uint64_t a = h2 & 0xFFFFFFFF, b = (h2 >> 32) | 1;
  uint32_t est = kMaxAdmitAfter;
  for (uint32_t d = 0; d < kSketchDepth; ++d) {
    const uint64_t i = d * (sketch_mask_ + 1) + ((a + d * b) & sketch_mask_);
    // Read-only use of a counter others may increment.
    const uint16_t c = std::atomic_ref<uint16_t>(const_cast<uint16_t&>(sketch_[i]))
                           .load(std::memory_order_relaxed);
    est = std::min<uint32_t>(est, c);
  }
  return est;
}

void SparseTable::SketchCount(uint64_t h) {
  const uint64_t h2 = Mix(h ^ kGolden);
  const uint64_t a = h2 & 0xFFFFFFFF, b = (h2 >> 32) | 1;
  for (uint32_t d = 0; d < kSketchDepth; ++d) {
    std::atomic_ref<uint16_t> c(sketch_[d * (sketch_mask_ + 1) + ((a + d * b) & sketch_mask_)]);
    uint16_t v = c.load(std::memory_order_relaxed);
    while (v != kMaxAdmitAfter &&
           !c.compare_exchange_weak(v, static_cast<uint16_t>(v + 1), std::memory_order_relaxed)) {
    }
  }
}

void SparseTable::LogRemoved(int64_t id, uint32_t epoch) {
  std::lock_guard lock(removed_mu_);
  removed_.emplace_back(epoch, id);
  const size_t limit = std::max<uint64_t>(1024, rows_.load(std::memory_order_relaxed) / 2);
  if (removed_.size() > limit) {
    const size_t drop = removed_.size() / 2;
    for (size_t i = 0; i < drop; ++i)
      removed_trimmed_ = std::max(removed_trimmed_, removed_[i].first);
    removed_.erase(removed_.begin(), removed_.begin() + static_cast<ptrdiff_t>(drop));
  }
}

int SparseTable::EvictOne(uint32_t home, const Scratch& sc, uint64_t held, uint32_t epoch) {
  const bool lfu = config_.eviction == EvictionPolicy::kLfu;
  uint32_t best_stripe = kStripes, best = kNoRow;
  uint64_t best_key = std::numeric_limits<uint64_t>::max();
  uint64_t locked = 0;  // stripes try-locked here
  Stripe& hs = stripes_[home];
  // Stripes this push does not hold are only try-locked, so the lock order
  // cannot deadlock; a busy stripe is skipped.
  auto use = [&](uint32_t s) {
    const uint64_t bit = uint64_t{1} << s;
    if ((held | locked) & bit) return true;
    if (!stripes_[s].mu.try_lock()) return false;
    locked |= bit;
    return true;
  };
  auto sample = [&](uint32_t s) {
    Stripe& st = stripes_[s];
    auto consider = [&](uint32_t r) {
      if (sc.InSet(st.Id(r))) return;
      const uint64_t lt = st.LastTouch(r), tc = st.Touches(r);
      const uint64_t key = lfu ? (tc << 32 | lt) : (lt << 32 | tc);
      if (key < best_key) {
        best_key = key;
        best_stripe = s;
        best = r;
      }
    };
    if (st.rows <= kEvictionSample) {
      for (uint32_t r = 0; r < st.rows; ++r) consider(r);
      return;
    }
    for (uint32_t k = 0; k < kEvictionSample; ++k) {
      hs.rng += kGolden;
      consider(static_cast<uint32_t>((Mix(hs.rng) >> 32) * st.rows >> 32));
    }
  };
  // The new row's stripe and a few others, so that a stripe holding only
  // hot rows does not lose one while colder rows sit elsewhere.
  sample(home);
  for (uint32_t k = 0; k < kEvictionProbes; ++k) {
    hs.rng += kGolden;
    const uint32_t s = static_cast<uint32_t>(Mix(hs.rng) >> (64 - kStripeBits));
    if (s != home && use(s)) sample(s);
  }
  // Nothing found (a small table): take the first stripe with a row to spare.
  for (uint32_t s = 0; s < kStripes && best == kNoRow; ++s) {
    if (use(s)) sample(s);
  }
  int evicted = -1;
  if (best != kNoRow) {
    Stripe& st = stripes_[best_stripe];
    LogRemoved(st.Id(best), epoch);
    st.Remove(best);
    rows_.fetch_sub(1, std::memory_order_relaxed);
    evictions_.fetch_add(1, std::memory_order_relaxed);
    evicted = static_cast<int>(best_stripe);
  }
  for (uint64_t m = locked; m != 0; m &= m - 1) stripes_[std::countr_zero(m)].mu.unlock();
  return evicted;
}

void SparseTable::Sweep(Stripe& st, uint32_t now, uint32_t epoch, uint32_t n) {
  for (uint32_t k = 0; k < n && st.rows > 0; ++k) {
    if (st.sweep >= st.rows) st.sweep = 0;
    const uint32_t r = st.sweep;
    if (Expired(st.LastTouch(r), now)) {
      LogRemoved(st.Id(r), epoch);
      st.Remove(r);  // the last row moved into r: look at r again
      rows_.fetch_sub(1, std::memory_order_relaxed);
      expired_.fetch_add(1, std::memory_order_relaxed);
    } else {
      ++st.sweep;
    }
  }
}

Status SparseTable::Pull(std::span<const int64_t> ids, float* out) {
  if (ids.empty()) return Status::OK();
  TS_RETURN_IF_ERROR(CheckRange(config_, ids));
  thread_local Scratch sc;
  sc.Group(ids);
  sc.missing.clear();
  sc.row.resize(ids.size());
  std::shared_lock config_lock(config_mu_);
  const uint32_t dim = config_.dim;
  const bool admission = config_.admit_after > 1;
  const uint32_t now = NowRel();
  for (uint32_t s = 0; s < kStripes; ++s) {
    const uint32_t b = sc.start[s], e = sc.start[s + 1];
    if (b == e) continue;
    Stripe& st = stripes_[s];
    std::shared_lock lock(st.mu);
    st.FindBatch(sc, ids, b, e, sc.row.data());
    for (uint32_t k = b; k < e; ++k) {
      const uint32_t i = sc.order[k];
      uint32_t r = sc.row[k];
      if (r != kNoRow && Expired(st.LoadLastTouch(r), now)) r = kNoRow;
      sc.row[k] = r;
      if (r == kNoRow) continue;
      std::memcpy(out + size_t{i} * dim, st.Data(r), sizeof(float) * dim);
      std::atomic_ref<uint32_t>(st.LastTouch(r)).store(now, std::memory_order_relaxed);
      std::atomic_ref<uint32_t> touches(st.Touches(r));
      if (touches.load(std::memory_order_relaxed) != std::numeric_limits<uint32_t>::max()) {
        touches.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
  // Initial values outside the stripe locks.
  for (uint32_t k = 0; k < ids.size(); ++k) {
    if (sc.row[k] != kNoRow) continue;
    const uint32_t i = sc.order[k];
    InitValues(init_base_, config_.initializer, config_.init_scale, dim, ids[i],
               out + size_t{i} * dim);
    if (admission) sc.missing.push_back(ids[i]);
  }
  if (admission && !sc.missing.empty()) {
    // A request counts an id once.
    std::sort(sc.missing.begin(), sc.missing.end());
    const auto end = std::unique(sc.missing.begin(), sc.missing.end());
    for (auto it = sc.missing.begin(); it != end; ++it) SketchCount(MixId(*it));
  }
  pulled_.fetch_add(ids.size(), std::memory_order_relaxed);
  return Status::OK();
}

Status SparseTable::Push(UpdateKind kind, float learning_rate, std::span<const int64_t> ids,
                         const float* values) {
  if (kind != UpdateKind::kGradient && kind != UpdateKind::kDelta) {
    return Status(StatusCode::kInvalidArgument,
                  "table '" + config_.name +
                      "': a push takes gradients or deltas, not parameter values (kind " +
                      std::to_string(static_cast<int>(kind)) + ")");
  }
  if (ids.empty()) return Status::OK();
  if (!(std::isfinite(learning_rate) && learning_rate >= 0)) {
    return Status(StatusCode::kInvalidArgument, "table '" + config_.name + "': learning_rate " +
                                                    Num(learning_rate) +
                                                    " must be finite and >= 0 (0: the table's)");
  }
  TS_RETURN_IF_ERROR(CheckRange(config_, ids));
  thread_local Scratch sc;
  sc.Group(ids);
  const int64_t dup = sc.BuildSet(ids);
  if (dup >= 0) {
    return Status(StatusCode::kInvalidArgument,
                  "table '" + config_.name + "': id " + std::to_string(ids[dup]) +
                      " appears more than once in one push (sum the gradients of repeated ids "
                      "into one row first)");
  }
  const size_t n = ids.size();
  sc.row.resize(n);
  sc.action.resize(n);

  std::shared_lock config_lock(config_mu_);
  uint64_t mask = 0;
  for (uint32_t s = 0; s < kStripes; ++s) {
    if (sc.start[s] != sc.start[s + 1]) mask |= uint64_t{1} << s;
  }
  StripeLocks<Stripe> locks(stripes_.get(), mask);
  const uint32_t epoch = epoch_.load(std::memory_order_relaxed);
  const uint32_t now = NowRel();
  const uint32_t dim = config_.dim;
  const uint32_t admit_after = config_.admit_after;

  // Look everything up; nothing changes until the capacity check passed.
  std::array<uint32_t, kStripes> fresh{};
  uint64_t total_new = 0, stored = 0;
  for (uint64_t m = mask; m != 0; m &= m - 1) {
    const uint32_t s = static_cast<uint32_t>(std::countr_zero(m));
    Stripe& st = stripes_[s];
    st.FindBatch(sc, ids, sc.start[s], sc.start[s + 1], sc.row.data());
    for (uint32_t k = sc.start[s]; k < sc.start[s + 1]; ++k) {
      const uint32_t i = sc.order[k];
      const uint32_t r = sc.row[k];
      if (r != kNoRow) {
        sc.action[k] = Expired(st.LastTouch(r), now) ? Action::kReset : Action::kUpdate;
        ++stored;
      } else if (admit_after <= 1 || SketchEstimate(sc.hash[i]) + 1 >= admit_after) {
        sc.action[k] = Action::kNew;
        ++fresh[s];
        ++total_new;
      } else {
        sc.action[k] = Action::kDrop;
      }
    }
  }
  if (total_new > 0) {
    const uint64_t cap = config_.capacity;
    const uint64_t before = rows_.fetch_add(total_new, std::memory_order_relaxed);
    if (cap != 0 && before + total_new > cap) {
      if (config_.eviction == EvictionPolicy::kNone || stored + total_new > cap) {
        rows_.fetch_sub(total_new, std::memory_order_relaxed);
        if (config_.eviction == EvictionPolicy::kNone) {
          return Status(StatusCode::kLimitExceeded,
                        "table '" + config_.name + "' is full: " + std::to_string(before) +
                            " rows (capacity=" + std::to_string(cap) +
                            ", eviction off) and the push would add " + std::to_string(total_new) +
                            " more; raise capacity or set eviction='lru'");
        }
        return Status(StatusCode::kLimitExceeded,
                      "table '" + config_.name + "': one push names " +
                          std::to_string(stored + total_new) + " rows, more than its capacity " +
                          std::to_string(cap) + "; push fewer ids at a time or raise capacity");
      }
      // One eviction per new row over capacity. Rows of this push are never
      // evicted. Should no stripe have a row to spare (all busy), the table
      // runs over capacity until a later push evicts.
      uint64_t need = before + total_new - cap;
      uint64_t evicted_mask = 0;
      for (uint64_t m = mask; m != 0 && need > 0; m &= m - 1) {
        const uint32_t s = static_cast<uint32_t>(std::countr_zero(m));
        for (uint64_t k = fresh[s] < need ? fresh[s] : need; k > 0; --k, --need) {
          const int e = EvictOne(s, sc, mask, epoch);
          if (e < 0) break;
          evicted_mask |= uint64_t{1} << e;
        }
      }
      // Eviction moved rows: look up again where it did.
      for (uint64_t m = evicted_mask; m != 0; m &= m - 1) {
        const uint32_t s = static_cast<uint32_t>(std::countr_zero(m));
        for (uint32_t k = sc.start[s]; k < sc.start[s + 1]; ++k) {
          if (sc.row[k] != kNoRow)
            sc.row[k] = stripes_[s].Find(sc.hash[sc.order[k]], ids[sc.order[k]]);
        }
      }
    }
  }

  RowUpdate u{config_.optimizer.kind, dim,
              learning_rate > 0 ? learning_rate : config_.optimizer.learning_rate,
              config_.optimizer};
  const bool admission = admit_after > 1;
  uint64_t applied = 0, refused = 0, created = 0, reset = 0;
  for (uint64_t m = mask; m != 0; m &= m - 1) {
    const uint32_t s = static_cast<uint32_t>(std::countr_zero(m));
    Stripe& st = stripes_[s];
    for (uint32_t k = sc.start[s]; k < sc.start[s + 1]; ++k) {
      const uint32_t i = sc.order[k];
      uint32_t r = sc.row[k];
      switch (sc.action[k]) {
        case Action::kDrop:
          SketchCount(sc.hash[i]);
          ++refused;
          continue;
        case Action::kNew:
          if (admission) SketchCount(sc.hash[i]);
          r = st.Append(sc.hash[i], ids[i]);
          InitRow(ids[i], st.Data(r));
          ++created;
          break;
        case Action::kReset:
          InitRow(ids[i], st.Data(r));
          st.Touches(r) = 0;
          if (st.has_step) st.B(r).step[st.Off(r)] = 0;
          ++reset;
          break;
        case Action::kUpdate:
          break;
      }
      float* w = st.Data(r);
      const float* v = values + size_t{i} * dim;
      if (kind == UpdateKind::kDelta) {
        for (uint32_t j = 0; j < dim; ++j) w[j] += v[j];
      } else {
        uint32_t dummy = 0;
        ApplyGradient(u, w, v, st.has_step ? &st.B(r).step[st.Off(r)] : &dummy);
      }
      st.LastTouch(r) = now;
      if (st.Touches(r) != std::numeric_limits<uint32_t>::max()) ++st.Touches(r);
      st.Epoch(r) = epoch;
      ++applied;
    }
    if (config_.ttl_s != 0) Sweep(st, now, epoch, kSweepPerPush);
  }
  pushed_.fetch_add(applied, std::memory_order_relaxed);
  if (refused) refused_.fetch_add(refused, std::memory_order_relaxed);
  // An expired row pushed again counts as expired and created anew.
  if (created + reset) created_.fetch_add(created + reset, std::memory_order_relaxed);
  if (reset) expired_.fetch_add(reset, std::memory_order_relaxed);
  return Status::OK();
}

Status SparseTable::Reconfigure(const TableConfig& config) {
  TS_RETURN_IF_ERROR(ValidateTableConfig(config));
  const TableConfig& c = config_;  // immutable fields, read without the lock
  if (config.name != c.name) {
    return Status(StatusCode::kInvalidArgument,
                  "table '" + c.name + "' cannot be reconfigured as '" + config.name + "'");
  }
  if (config.dim != c.dim) {
    return Status(StatusCode::kShapeMismatch, "table '" + c.name + "' has dim " +
                                                  std::to_string(c.dim) + " on the server, not " +
                                                  std::to_string(config.dim));
  }
  auto differs = [&](const char* field, const std::string& have, const std::string& got) {
    return Status(StatusCode::kInvalidArgument,
                  "table '" + c.name + "' has " + field + " " + have + " on the server, not " +
                      got + " (a table's " + field + " cannot change; use a new table name)");
  };
  if (config.vocab != c.vocab) {
    return differs("vocab", std::to_string(c.vocab), std::to_string(config.vocab));
  }
  if (config.seed != c.seed) {
    return differs("seed", std::to_string(c.seed), std::to_string(config.seed));
  }
  if (config.initializer != c.initializer) {
    return differs("initializer", std::to_string(static_cast<int>(c.initializer)),
                   std::to_string(static_cast<int>(config.initializer)));
  }
  if (config.init_scale != c.init_scale) {
    return differs("init_scale", Num(c.init_scale), Num(config.init_scale));
  }
  std::unique_lock lock(config_mu_);
  const bool new_kind = config.optimizer.kind != config_.optimizer.kind;
  config_.optimizer = config.optimizer;
  config_.capacity = config.capacity;
  config_.eviction = config.eviction;
  config_.admit_after = config.admit_after;
  config_.ttl_s = config.ttl_s;
  if (new_kind) Relayout();
  AllocSketch();
  return Status::OK();
}

TableStats SparseTable::Stats() const {
  TableStats t;
  std::shared_lock config_lock(config_mu_);
  uint64_t rows = 0;
  for (uint32_t s = 0; s < kStripes; ++s) {
    std::shared_lock lock(stripes_[s].mu);
    t.bytes += stripes_[s].Bytes();
    rows += stripes_[s].rows;
  }
  t.bytes += sketch_.size() * sizeof(uint16_t);
  t.rows = rows;
  t.evictions = evictions_.load(std::memory_order_relaxed);
  t.expired = expired_.load(std::memory_order_relaxed);
  t.admissions_refused = refused_.load(std::memory_order_relaxed);
  t.rows_pulled = pulled_.load(std::memory_order_relaxed);
  t.rows_pushed = pushed_.load(std::memory_order_relaxed);
  t.rows_created = created_.load(std::memory_order_relaxed);
  return t;
}

uint32_t SparseTable::BeginSnapshot() { return epoch_.fetch_add(1); }

void SparseTable::ForEachRow(uint32_t since, const std::function<void(const RowView&)>& fn) const {
  std::shared_lock config_lock(config_mu_);
  const uint32_t dim = config_.dim;
  for (uint32_t s = 0; s < kStripes; ++s) {
    const Stripe& st = stripes_[s];
    std::shared_lock lock(st.mu);
    for (uint32_t r = 0; r < st.rows; ++r) {
      if (since != 0 && st.B(r).epoch[st.Off(r)] < since) continue;
      const float* d = st.Data(r);
      RowView v;
      v.id = st.Id(r);
      v.values = std::span<const float>(d, dim);
      v.slots = std::span<const float>(d + dim, size_t{dim} * slots_);
      v.step = st.Step(r);
      v.touches = st.LoadTouches(r);
      v.last_touch_s = st.LoadLastTouch(r);
      fn(v);
    }
  }
}

void SparseTable::Export(uint64_t cursor, uint32_t max_rows, std::vector<int64_t>* ids,
                         std::vector<float>* values, uint64_t* next_cursor) const {
  std::shared_lock config_lock(config_mu_);
  const uint32_t dim = config_.dim;
  ids->clear();
  values->clear();
  *next_cursor = UINT64_MAX;
  for (uint64_t s = cursor >> 32; s < kStripes; ++s) {
    const Stripe& st = stripes_[s];
    std::shared_lock lock(st.mu);
    for (uint64_t r = s == cursor >> 32 ? (cursor & 0xFFFFFFFFu) : 0; r < st.rows; ++r) {
      if (ids->size() == max_rows) {
        *next_cursor = s << 32 | r;
        return;
      }
      const float* d = st.Data(static_cast<uint32_t>(r));
      ids->push_back(st.Id(static_cast<uint32_t>(r)));
      values->insert(values->end(), d, d + dim);
    }
  }
}

bool SparseTable::RemovedSince(uint32_t since, std::vector<int64_t>* ids) const {
  std::lock_guard lock(removed_mu_);
  ids->clear();
  for (const auto& [epoch, id] : removed_) {
    if (epoch >= since) ids->push_back(id);
  }
  return removed_trimmed_ == 0 || since > removed_trimmed_;
}

Status SparseTable::Restore(std::vector<RowState>&& rows, std::span<const int64_t> removed,
                            uint64_t epoch_unix_s) {
  std::unique_lock config_lock(config_mu_);
  const uint32_t dim = config_.dim;
  const size_t want_slots = size_t{dim} * slots_;
  for (const RowState& row : rows) {
    if (row.values.size() != dim || row.slots.size() != want_slots) {
      return Status(StatusCode::kInvalidArgument,
                    "table '" + config_.name + "': restored row " + std::to_string(row.id) +
                        " has " + std::to_string(row.values.size()) + " values and " +
                        std::to_string(row.slots.size()) + " slot values, not " +
                        std::to_string(dim) + " and " + std::to_string(want_slots) +
                        " (snapshot of another table layout?)");
    }
    TS_RETURN_IF_ERROR(CheckRange(config_, std::span<const int64_t>(&row.id, 1)));
  }
  TS_RETURN_IF_ERROR(CheckRange(config_, removed));
  // A full restore into an empty table keeps the snapshot's clock base.
  if (rows_.load(std::memory_order_relaxed) == 0) epoch_unix_s_ = epoch_unix_s;
  const uint32_t epoch = epoch_.load(std::memory_order_relaxed);
  const int64_t shift = static_cast<int64_t>(epoch_unix_s) - static_cast<int64_t>(epoch_unix_s_);
  for (const RowState& row : rows) {
    const uint64_t h = MixId(row.id);
    Stripe& st = stripes_[StripeOf(h)];
    std::unique_lock lock(st.mu);
    uint32_t r = st.Find(h, row.id);
    if (r == kNoRow) {
      r = st.Append(h, row.id);
      rows_.fetch_add(1, std::memory_order_relaxed);
    }
    float* d = st.Data(r);
    std::copy(row.values.begin(), row.values.end(), d);
    std::copy(row.slots.begin(), row.slots.end(), d + dim);
    if (st.has_step) st.B(r).step[st.Off(r)] = row.step;
    st.Touches(r) = row.touches;
    st.LastTouch(r) = static_cast<uint32_t>(std::clamp<int64_t>(
        int64_t{row.last_touch_s} + shift, 0, std::numeric_limits<uint32_t>::max()));
    st.Epoch(r) = epoch;
  }
  for (int64_t id : removed) {
    const uint64_t h = MixId(id);
    Stripe& st = stripes_[StripeOf(h)];
    std::unique_lock lock(st.mu);
    const uint32_t r = st.Find(h, id);
    if (r == kNoRow) continue;
    st.Remove(r);
    rows_.fetch_sub(1, std::memory_order_relaxed);
  }
  rows.clear();
  return Status::OK();
}

void SparseTable::Clear() {
  std::unique_lock config_lock(config_mu_);
  for (uint32_t s = 0; s < kStripes; ++s) {
    std::unique_lock lock(stripes_[s].mu);
    stripes_[s].Reset();
  }
  rows_.store(0, std::memory_order_relaxed);
  std::lock_guard lock(removed_mu_);
  removed_.clear();
  removed_trimmed_ = 0;
}

// ---- TableStore --------------------------------------------------------------

Status TableStore::CreateOrCheck(const TableConfig& config, bool* created) {
  if (created) *created = false;
  TS_RETURN_IF_ERROR(ValidateTableConfig(config));
  SparseTable* existing = nullptr;
  {
    std::unique_lock lock(mu_);
    auto it = by_name_.find(config.name);
    if (it == by_name_.end()) {
      if (by_name_.size() >= max_tables_) {
        return Status(StatusCode::kLimitExceeded,
                      "cannot create table '" + config.name + "': the server holds " +
                          std::to_string(by_name_.size()) + " tables (max_tables=" +
                          std::to_string(max_tables_) + "); raise the server's table limit");
      }
      auto table = std::make_unique<SparseTable>(config);
      ordered_.push_back(table.get());
      by_name_.emplace(config.name, std::move(table));
      if (created) *created = true;
      return Status::OK();
    }
    existing = it->second.get();
  }
  // Tables are never removed while requests run, so the pointer stays valid.
  return existing->Reconfigure(config);
}

Status TableStore::Lookup(std::string_view name, SparseTable** out) const {
  std::shared_lock lock(mu_);
  auto it = by_name_.find(std::string(name));
  if (it == by_name_.end()) {
    *out = nullptr;
    return Status(StatusCode::kNotFound,
                  "no table '" + std::string(name) + "' on this server (create it first)");
  }
  *out = it->second.get();
  return Status::OK();
}

void TableStore::All(std::vector<SparseTable*>* out) const {
  std::shared_lock lock(mu_);
  *out = ordered_;
}

uint64_t TableStore::size() const {
  std::shared_lock lock(mu_);
  return by_name_.size();
}

void TableStore::ReplaceAll(std::vector<std::unique_ptr<SparseTable>>&& tables) {
  std::unique_lock lock(mu_);
  by_name_.clear();
  ordered_.clear();
  for (auto& t : tables) {
    ordered_.push_back(t.get());
    std::string name = t->config().name;
    by_name_[name] = std::move(t);
  }
  tables.clear();
}

}  // namespace storage
}  // namespace tensorspark
