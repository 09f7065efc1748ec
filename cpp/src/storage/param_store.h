// The server's variables: name -> one contiguous float32 buffer each.
//
// Locking: `map_mu_` guards the name map, the registration-order list and
// the default optimizer (REGISTER takes it exclusively, lookups share it).
// Each Variable's `mu` guards its values and optimizer state (config,
// slots, step): pulls share it, pushes and SetOptimizer take it
// exclusively, one variable at a time, never while holding map_mu_.
// Variables are never removed (except all at once by Replace, which the
// server runs only while no request uses the store), so Variable pointers
// stay valid and may be used after map_mu_ is released. Code holding
// several variable locks at once must take them in increasing id() order.
// A snapshot (storage/snapshot.h) copies one variable at a time under its
// shared lock (CopyState) and writes the copy without any lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/thread_pool.h"
#include "optimizers/optimizers.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::storage {

// Everything the store holds of one variable: what a snapshot saves and
// ParamStore::Restore puts back, so a restored variable takes the same next
// step bit for bit.
struct VariableState {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
  std::optional<OptimizerConfig> optimizer;
  // Slots are state only once allocated (EnsureSlots): then slots[i] holds
  // numel floats for i < NumSlots(kind). Until then they are refilled from
  // the config at the next gradient push, and step is 0.
  bool slots_ready = false;
  uint64_t step = 0;
  std::vector<float> slots[optimizers::kMaxSlots];
};

class Variable {
 public:
  Variable(uint64_t id, std::string name, std::vector<int64_t> shape, uint64_t numel)
      : id_(id), name_(std::move(name)), shape_(std::move(shape)), values_(numel) {}
  // A variable restored from `state` (validated by the caller); computes crc().
  Variable(uint64_t id, VariableState&& state);

  uint64_t id() const { return id_; }  // registration order; the lock order
  const std::string& name() const { return name_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  uint64_t numel() const { return values_.size(); }
  // Guarded by mu().
  float* data() { return values_.data(); }
  const float* data() const { return values_.data(); }
  // CRC-32C of the values, kept up to date by every writer (guarded by
  // mu()), so a pull can checksum its response without reading the data.
  uint32_t crc() const { return crc_; }
  void set_crc(uint32_t crc) { crc_ = crc; }
  std::shared_mutex& mu() const { return mu_; }

  // ---- server-side optimizer; all guarded by mu() ----
  // The configured optimizer, if any (once set, a variable always has one).
  const std::optional<OptimizerConfig>& optimizer() const { return optimizer_; }
  // Sets the optimizer; resets the slots unless optimizers::KeepsSlots (a
  // change of learning rate alone keeps them). Slots no longer needed are
  // freed; the others are refilled by the next EnsureSlots.
  void SetOptimizer(const OptimizerConfig& config);
  // Allocates and initializes the slots of the configured optimizer if they
  // are not ready (the first gradient push after SetOptimizer). Fails with
  // kLimitExceeded, changing nothing, when memory is short.
  [[nodiscard]] Status EnsureSlots();
  // Slot i (empty until EnsureSlots) and Adam's step count t of the last
  // applied push (0 after a reset).
  std::span<const float> slot(int i) const { return slots_[i]; }
  float* mutable_slot(int i) { return slots_[i].empty() ? nullptr : slots_[i].data(); }
  uint64_t step() const { return step_; }
  bool slots_ready() const { return slots_ready_; }
  // Counts one more optimizer step and returns t.
  uint64_t NextStep() { return ++step_; }

  // Copies values and optimizer state into `out` (reusing its buffers)
  // under a shared lock, so the copy is one consistent state and pushes to
  // this variable wait only for the copy.
  void CopyState(VariableState* out) const;

 private:
  const uint64_t id_;
  const std::string name_;
  const std::vector<int64_t> shape_;
  mutable std::shared_mutex mu_;
  std::vector<float> values_;  // size fixed at construction
  uint32_t crc_ = 0;           // == Crc32c(values_) outside writers
  std::optional<OptimizerConfig> optimizer_;
  // numel() floats each for the first NumSlots(kind) slots once ready.
  std::vector<float> slots_[optimizers::kMaxSlots];
  bool slots_ready_ = false;
  uint64_t step_ = 0;
};

struct RegisterItem {
  std::string_view name;
  std::span<const int64_t> shape;
  const void* initial;  // numel float32 values, little-endian, any alignment
};

struct PushItem {
  std::string_view name;
  std::span<const int64_t> shape;
  const float* values;  // numel floats, float-aligned (source kFloat32)
  uint64_t numel;
  // Source kFp16/kBf16: numel 2-byte values, 2-byte aligned, decoded block
  // by block inside the update (values unused).
  const uint16_t* encoded = nullptr;
  optimizers::Source source = optimizers::Source::kFloat32;
};

class ParamStore {
 public:
  // Updates of tensors with at least `parallel_min_elements` elements are
  // split across `pool` (null: every update on the calling thread).
  explicit ParamStore(uint64_t max_variables, ThreadPool* pool = nullptr,
                      uint64_t parallel_min_elements = optimizers::kDefaultParallelMinElements)
      : max_variables_(max_variables), pool_(pool), parallel_min_(parallel_min_elements) {}

  // All-or-nothing: the first registration of a name wins (created = 0 for
  // names that exist with the same shape); a different shape fails with
  // kShapeMismatch, too many variables with kLimitExceeded, and then nothing
  // is registered. Names and shapes must have been validated by the caller.
  [[nodiscard]] Status Register(std::span<const RegisterItem> items, std::vector<uint8_t>* created);

  // Resolves every name (kNotFound names the first unknown one).
  [[nodiscard]] Status Lookup(std::span<const std::string_view> names,
                              std::vector<Variable*>* out) const;
  // Every variable in registration order.
  void All(std::vector<Variable*>* out) const;

  // Checks kind, options, names and shapes of the whole push, then applies
  // each tensor under its variable's unique lock (refreshing its crc()).
  // A gradient push applies each variable's optimizer (options.learning_rate
  // > 0 overrides its learning rate), or plain SGD where none is set, which
  // then needs learning_rate > 0; slots are allocated before anything is
  // applied. `version` receives the model version after this push.
  [[nodiscard]] Status Push(uint8_t kind, const PushOptions& options,
                            std::span<const PushItem> items, uint64_t* version);

  // Sets the optimizer of the named variables, or with no names of every
  // variable, including those registered later. Validates the config
  // (kInvalidArgument) and every name (kNotFound) before changing anything.
  [[nodiscard]] Status SetOptimizer(const OptimizerConfig& config,
                                    std::span<const std::string_view> names);

  // Fills an empty store (nothing registered yet) from a snapshot: the
  // variables in registration order, the default optimizer and the model
  // version, which later pushes continue from. Validates everything first
  // (kInvalidArgument: not empty, duplicate name, sizes that do not match
  // the shape, bad optimizer config; kLimitExceeded: over max_variables)
  // and changes nothing on failure.
  [[nodiscard]] Status Restore(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                               std::vector<VariableState>&& vars);
  // As Restore, but into a store that may hold variables: every variable,
  // the default optimizer and the version are replaced by `vars` (the old
  // variables are destroyed, which is why the caller must guarantee that no
  // other thread holds or takes a Variable pointer of this store during the
  // call: the server runs it while no request touches the store). Changes
  // nothing on failure.
  [[nodiscard]] Status Replace(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                               std::vector<VariableState>&& vars);

  // Optimizer given to variables registered from now on, if any.
  std::optional<OptimizerConfig> default_optimizer() const;

  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  // Counts a change made outside the variables (a sparse-table push):
  // returns the new version, and moves the generation on after it.
  uint64_t BumpVersion() {
    const uint64_t v = version_.fetch_add(1, std::memory_order_acq_rel) + 1;
    generation_.fetch_add(1, std::memory_order_acq_rel);
    return v;
  }
  // Grows with every change of the store's state (registration of a new
  // variable, push, optimizer change, restore); equal values mean nothing
  // changed in between. Read it before copying to know what a copy covers.
  uint64_t generation() const { return generation_.load(std::memory_order_acquire); }
  uint64_t num_variables() const;
  uint64_t num_parameters() const { return num_parameters_.load(std::memory_order_relaxed); }

 private:
  struct NameHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
  };
  Variable* FindLocked(std::string_view name) const;
  // Restore (replace false: the store must be empty) and Replace.
  [[nodiscard]] Status Install(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                               std::vector<VariableState>&& vars, bool replace);

  const uint64_t max_variables_;
  ThreadPool* const pool_;
  const uint64_t parallel_min_;
  // Serializes SetOptimizer calls, so the last call wins on every variable
  // it names even when calls overlap.
  std::mutex set_optimizer_mu_;
  mutable std::shared_mutex map_mu_;
  // Optimizer of variables registered from now on; guarded by map_mu_.
  std::optional<OptimizerConfig> default_optimizer_;
  std::unordered_map<std::string, std::unique_ptr<Variable>, NameHash, std::equal_to<>> by_name_;
  std::vector<Variable*> ordered_;  // guarded by map_mu_
  std::atomic<uint64_t> version_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> num_parameters_{0};
};

}  // namespace tensorspark::storage
