// Sparse tables of one server (public config: tensorspark/tables.h;
// docs/sparse.md).
//
// Storage: a table is split into kStripes stripes by MixId(id) >> 58, each
// with its own reader/writer lock, an open-addressing index id -> slot and
// rows kept in fixed-size blocks (memory grows by a block, never by
// doubling a whole array). A stored row holds dim values, the optimizer's
// slots (dim floats each) and a little metadata (id, last touch, touch
// count, Adam's step, the snapshot epoch of its last change).
//
// Locking: Pull takes the shared lock of each stripe it reads (touch times
// and counts are relaxed atomics, so readers may update them); Push takes
// the unique locks of every stripe it touches, in increasing stripe order,
// so that it checks everything (ids, capacity) before changing anything:
// a push is all or nothing. TableStore's map lock is never held while a
// stripe lock is taken.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tensorspark/status.h"
#include "tensorspark/tables.h"
#include "tensorspark/types.h"

namespace tensorspark::storage {

inline constexpr uint32_t kStripeBits = 6;
inline constexpr uint32_t kStripes = 1u << kStripeBits;

// InvalidArgument naming the table and the first bad field.
[[nodiscard]] Status ValidateTableConfig(const TableConfig& config);
// Slot vectors per row of `kind` (sgd 0, adagrad 1, adam 2, ftrl 2).
int RowSlots(RowOptimizerKind kind);

// Counters of one table (STATS: table_<name>_<counter>; docs/sparse.md).
struct TableStats {
  uint64_t rows = 0;   // stored rows
  uint64_t bytes = 0;  // memory held by rows, slots, metadata and index
  uint64_t evictions = 0;
  uint64_t expired = 0;             // rows dropped by the TTL
  uint64_t admissions_refused = 0;  // pushed rows dropped before admission
  uint64_t rows_pulled = 0;         // ids served by Pull, in total
  uint64_t rows_pushed = 0;         // ids applied by Push, in total
  uint64_t rows_created = 0;
};

// One stored row as a snapshot sees it (views valid during the callback).
struct RowView {
  int64_t id = 0;
  std::span<const float> values;  // dim
  std::span<const float> slots;   // dim * RowSlots(kind), slot-major
  uint32_t step = 0;              // Adam's t of this row
  uint32_t touches = 0;
  uint32_t last_touch_s = 0;  // seconds since the table's epoch_unix_s
};

// A row to put back (Restore), same layout as RowView.
struct RowState {
  int64_t id = 0;
  std::vector<float> values;
  std::vector<float> slots;
  uint32_t step = 0;
  uint32_t touches = 0;
  uint32_t last_touch_s = 0;
};

class SparseTable {
 public:
  // `config` must pass ValidateTableConfig. `now_s` (tests) gives the
  // seconds since the Unix epoch used for touch times and the TTL; empty:
  // the system clock.
  explicit SparseTable(const TableConfig& config, std::function<uint64_t()> now_s = {});
  ~SparseTable();

  const TableConfig& config() const { return config_; }  // changed only by Reconfigure

  // Writes the row of each id (ids.size() * dim floats) into `out`: the
  // stored row or the initial value. Checks every id first: an id outside
  // a fixed vocabulary fails with kInvalidArgument naming the table, the id
  // and the range, and nothing is read. Counts the ids for admission and
  // touches stored rows (LRU, LFU, TTL). Duplicate ids are allowed.
  // Thread-safe.
  [[nodiscard]] Status Pull(std::span<const int64_t> ids, float* out);

  // Applies `values` (ids.size() * dim floats) to the rows of `ids`, which
  // must be unique (kInvalidArgument naming a repeated id): kGradient
  // through the table's optimizer (learning_rate > 0 overrides its rate
  // for this push), kDelta by adding; kParameters is kInvalidArgument.
  // New rows start from their initial value. Ids not yet admitted are
  // dropped. All or nothing: an out-of-range id or a table at capacity with
  // eviction off (kLimitExceeded: "table 'user' is full: 1000 rows
  // (capacity=1000, eviction off) ...") fails before any row changes.
  // Thread-safe.
  [[nodiscard]] Status Push(UpdateKind kind, float learning_rate, std::span<const int64_t> ids,
                            const float* values);

  // Takes a later TableConfig for the same table. dim (kShapeMismatch:
  // "table 'x' has dim 16 on the server, not 32"), vocab, seed,
  // initializer and init_scale must match (kInvalidArgument naming the
  // field); the optimizer, capacity, eviction, admission and TTL are
  // replaced. A new optimizer kind resets every row's slots. Thread-safe.
  [[nodiscard]] Status Reconfigure(const TableConfig& config);

  TableStats Stats() const;

  // Copies up to max_rows (>= 1) stored rows, from `cursor` on, into `ids`
  // and `values` (ids->size() * dim), and sets `next_cursor` to where the
  // next call continues (UINT64_MAX: done). The cursor is stripe << 32 |
  // row within the stripe; 0 starts. Every stored row is visited once only
  // while no push, eviction or expiry runs between the calls (EXPORT_ROWS).
  // Thread-safe.
  void Export(uint64_t cursor, uint32_t max_rows, std::vector<int64_t>* ids,
              std::vector<float>* values, uint64_t* next_cursor) const;

  // ---- snapshots (storage/snapshot.h) ----
  // Epochs mark which rows changed since a snapshot: every change stamps
  // the row with the current epoch. BeginSnapshot() returns the current
  // epoch E and moves on to E + 1, so rows changed from then on belong to
  // the next snapshot. ForEachRow(since) visits, stripe by stripe under the
  // shared lock, the stored rows changed in epochs >= since (0: all rows).
  uint32_t BeginSnapshot();
  void ForEachRow(uint32_t since, const std::function<void(const RowView&)>& fn) const;
  // Ids removed (evicted or expired) in epochs >= since, and whether that
  // log still reaches back to `since` (false: it was trimmed, write a full
  // snapshot).
  bool RemovedSince(uint32_t since, std::vector<int64_t>* ids) const;
  // Seconds since the Unix epoch that last_touch_s counts from.
  uint64_t epoch_unix_s() const { return epoch_unix_s_; }
  // Puts rows back: an upsert of each row (values, slots, step, touches,
  // last touch; last_touch_s relative to `epoch_unix_s`), then removes
  // `removed`. Used on an empty table for a full snapshot and then once
  // per increment. kInvalidArgument on a row of the wrong size or an id
  // outside the vocabulary (nothing changed). Not concurrent with requests.
  [[nodiscard]] Status Restore(std::vector<RowState>&& rows, std::span<const int64_t> removed,
                               uint64_t epoch_unix_s);
  // Drops every stored row (for a restore over a used table).
  void Clear();

 private:
  struct Stripe;
  struct Scratch;
  enum class Action : uint8_t;

  uint32_t NowRel() const;
  bool Expired(uint32_t last_touch, uint32_t now) const;
  void InitRow(int64_t id, float* row) const;
  void InitSlots(float* row) const;
  // Rebuilds every stripe's blocks for the current optimizer (slots reset).
  void Relayout();
  void AllocSketch();
  uint32_t SketchEstimate(uint64_t h) const;
  void SketchCount(uint64_t h);
  void LogRemoved(int64_t id, uint32_t epoch);
  // Removes one row not named by the push in `sc` (which holds the stripes
  // `held`), sampled from stripe `home` and a few others; returns the
  // stripe it came from, or -1 if none.
  int EvictOne(uint32_t home, const Scratch& sc, uint64_t held, uint32_t epoch);
  // Removes up to `n` expired rows of `st` from its sweep cursor on.
  void Sweep(Stripe& st, uint32_t now, uint32_t epoch, uint32_t n);

  TableConfig config_;
  uint64_t epoch_unix_s_ = 0;
  std::function<uint64_t()> now_s_;
  std::unique_ptr<Stripe[]> stripes_;
  std::atomic<uint32_t> epoch_{1};
  // Shared by requests for their whole call, unique in Reconfigure: guards
  // the mutable fields of config_, the row layout and the sketch pointer.
  // Taken before any stripe lock.
  mutable std::shared_mutex config_mu_;
  uint64_t init_base_ = 0;    // per-table key of RowInitialValues
  uint32_t slots_ = 0;        // slot vectors per row
  uint32_t stride_ = 0;       // floats per stored row: dim * (1 + slots_)
  uint32_t block_shift_ = 0;  // log2 of rows per block
  // Stored rows, including rows a push has reserved but not yet written.
  std::atomic<uint64_t> rows_{0};
  std::atomic<uint64_t> evictions_{0}, expired_{0}, refused_{0}, pulled_{0}, pushed_{0},
      created_{0};
  // Count-min sketch of admission sightings: 4 rows of sketch_mask_ + 1
  // saturating counters, updated with relaxed atomics.
  std::vector<uint16_t> sketch_;
  uint64_t sketch_mask_ = 0;
  mutable std::mutex removed_mu_;                      // guards removed_ and removed_trimmed_
  std::vector<std::pair<uint32_t, int64_t>> removed_;  // (epoch, id), oldest first
  uint32_t removed_trimmed_ = 0;                       // highest epoch of a trimmed entry
};

// The tables of one server, by name.
class TableStore {
 public:
  explicit TableStore(uint64_t max_tables = 1024) : max_tables_(max_tables) {}

  // Creates the table or, when it exists, Reconfigure()s it. `created`
  // (may be null) tells which. kLimitExceeded past max_tables.
  [[nodiscard]] Status CreateOrCheck(const TableConfig& config, bool* created);
  // kNotFound: "no table 'x' on this server (create it first)".
  [[nodiscard]] Status Lookup(std::string_view name, SparseTable** out) const;
  // Every table in creation order.
  void All(std::vector<SparseTable*>* out) const;
  uint64_t size() const;
  // Replaces every table (restore); the caller guarantees no request uses
  // the store during the call.
  void ReplaceAll(std::vector<std::unique_ptr<SparseTable>>&& tables);

 private:
  const uint64_t max_tables_;
  mutable std::shared_mutex mu_;  // guards the map and the order
  std::unordered_map<std::string, std::unique_ptr<SparseTable>> by_name_;
  std::vector<SparseTable*> ordered_;
};

}  // namespace tensorspark::storage
