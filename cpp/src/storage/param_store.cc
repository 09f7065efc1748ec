#include "storage/param_store.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>

#include "protocol/crc32c.h"
#include "protocol/messages.h"

namespace tensorspark::storage {

using protocol::ShapeToString;

namespace {

bool SameShape(std::span<const int64_t> a, std::span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

uint64_t NumElements(std::span<const int64_t> shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

Status Mismatch(std::string_view name, std::span<const int64_t> have, std::span<const int64_t> got,
                const char* what, const char* outcome) {
  return Status(StatusCode::kShapeMismatch, "variable '" + std::string(name) + "' has shape " +
                                                ShapeToString(have) + " but the " + what + " has " +
                                                ShapeToString(got) + "; " + outcome);
}

std::string Num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  return buf;
}

}  // namespace

// ---- Variable: optimizer state --------------------------------------------------

Variable::Variable(uint64_t id, VariableState&& state)
    : id_(id),
      name_(std::move(state.name)),
      shape_(std::move(state.shape)),
      values_(std::move(state.values)),
      optimizer_(state.optimizer),
      slots_ready_(state.slots_ready),
      step_(state.step) {
  crc_ = protocol::Crc32c(values_.data(), values_.size() * sizeof(float));
  if (slots_ready_ && optimizer_) {
    for (int i = 0; i < optimizers::NumSlots(optimizer_->kind); ++i) {
      slots_[i] = std::move(state.slots[i]);
    }
  }
}

void Variable::CopyState(VariableState* out) const {
  std::shared_lock lock(mu_);
  out->name = name_;
  out->shape = shape_;
  out->values.assign(values_.begin(), values_.end());
  out->optimizer = optimizer_;
  out->slots_ready = slots_ready_ && optimizer_.has_value();
  out->step = step_;
  const int n = out->slots_ready ? optimizers::NumSlots(optimizer_->kind) : 0;
  for (int i = 0; i < optimizers::kMaxSlots; ++i) {
    if (i < n) {
      out->slots[i].assign(slots_[i].begin(), slots_[i].end());
    } else {
      out->slots[i].clear();
    }
  }
}

void Variable::SetOptimizer(const OptimizerConfig& config) {
  if (!optimizer_ || !optimizers::KeepsSlots(*optimizer_, config)) {
    slots_ready_ = false;
    step_ = 0;
    for (int i = optimizers::NumSlots(config.kind); i < optimizers::kMaxSlots; ++i) {
      std::vector<float>().swap(slots_[i]);  // free what the new kind does not use
    }
  }
  optimizer_ = config;
}

Status Variable::EnsureSlots() {
  if (slots_ready_ || !optimizer_) return Status::OK();
  const int n = optimizers::NumSlots(optimizer_->kind);
  try {
    for (int i = 0; i < n; ++i) slots_[i].reserve(numel());
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kLimitExceeded,
                  "the server cannot allocate the " +
                      std::string(optimizers::KindName(optimizer_->kind)) +
                      " optimizer state of variable '" + name_ + "' (" + std::to_string(n) + " x " +
                      std::to_string(numel()) + " floats); nothing was applied");
  }
  // Capacity is there: assign cannot throw now.
  for (int i = 0; i < n; ++i) slots_[i].assign(numel(), optimizers::SlotInit(*optimizer_, i));
  slots_ready_ = true;
  return Status::OK();
}

// ---- ParamStore -------------------------------------------------------------------

Variable* ParamStore::FindLocked(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second.get();
}

uint64_t ParamStore::num_variables() const {
  std::shared_lock lock(map_mu_);
  return ordered_.size();
}

Status ParamStore::Register(std::span<const RegisterItem> items, std::vector<uint8_t>* created) {
  std::unique_lock lock(map_mu_);
  created->assign(items.size(), 0);
  // Validate everything first; `fresh` maps the new names of this request
  // to their item so duplicates inside one request follow first-wins too.
  std::unordered_map<std::string_view, size_t> fresh;
  for (size_t i = 0; i < items.size(); ++i) {
    const RegisterItem& it = items[i];
    if (const Variable* v = FindLocked(it.name)) {
      if (!SameShape(v->shape(), it.shape)) {
        return Mismatch(it.name, v->shape(), it.shape, "registration", "nothing registered");
      }
      continue;
    }
    auto [pos, inserted] = fresh.emplace(it.name, i);
    if (!inserted && !SameShape(items[pos->second].shape, it.shape)) {
      return Status(StatusCode::kShapeMismatch,
                    "variable '" + std::string(it.name) + "' appears twice in one registration " +
                        "with shapes " + ShapeToString(items[pos->second].shape) + " and " +
                        ShapeToString(it.shape) + "; nothing registered");
    }
  }
  if (fresh.size() > max_variables_ - std::min<uint64_t>(ordered_.size(), max_variables_)) {
    return Status(StatusCode::kLimitExceeded,
                  "registering " + std::to_string(fresh.size()) + " new variables would exceed " +
                      "the server's limit of " + std::to_string(max_variables_) + " (" +
                      std::to_string(ordered_.size()) +
                      " registered); raise max_variables. Nothing registered");
  }
  uint64_t added = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const RegisterItem& it = items[i];
    auto f = fresh.find(it.name);
    if (f == fresh.end() || f->second != i) continue;  // exists, or a later duplicate
    uint64_t numel = NumElements(it.shape);
    auto var =
        std::make_unique<Variable>(ordered_.size(), std::string(it.name),
                                   std::vector<int64_t>(it.shape.begin(), it.shape.end()), numel);
    if (numel > 0) std::memcpy(var->data(), it.initial, numel * sizeof(float));
    var->set_crc(protocol::Crc32c(var->data(), numel * sizeof(float)));
    // Not yet visible to other threads: no lock needed.
    if (default_optimizer_) var->SetOptimizer(*default_optimizer_);
    ordered_.push_back(var.get());
    by_name_.emplace(var->name(), std::move(var));
    (*created)[i] = 1;
    added += numel;
  }
  num_parameters_.fetch_add(added, std::memory_order_relaxed);
  if (!fresh.empty()) generation_.fetch_add(1, std::memory_order_acq_rel);
  return Status::OK();
}

Status ParamStore::Lookup(std::span<const std::string_view> names,
                          std::vector<Variable*>* out) const {
  std::shared_lock lock(map_mu_);
  out->clear();
  out->reserve(names.size());
  for (std::string_view name : names) {
    Variable* v = FindLocked(name);
    if (v == nullptr) {
      return Status(StatusCode::kNotFound,
                    "variable '" + std::string(name) + "' is not registered on the server (" +
                        std::to_string(ordered_.size()) +
                        " variables are); register it first or check the name");
    }
    out->push_back(v);
  }
  return Status::OK();
}

void ParamStore::All(std::vector<Variable*>* out) const {
  std::shared_lock lock(map_mu_);
  *out = ordered_;
}

Status ParamStore::Push(uint8_t kind, const PushOptions& options, std::span<const PushItem> items,
                        uint64_t* version) {
  const bool gradient = kind == static_cast<uint8_t>(UpdateKind::kGradient);
  switch (static_cast<UpdateKind>(kind)) {
    case UpdateKind::kParameters:
      if (options.mean_window < 1) {
        return Status(StatusCode::kInvalidArgument,
                      "mean_window must be >= 1 for a parameters push (got 0)");
      }
      break;
    case UpdateKind::kDelta:
      break;
    case UpdateKind::kGradient:
      // 0 means "the configured learning rate"; checked per variable below.
      if (!(options.learning_rate >= 0.0f) || !std::isfinite(options.learning_rate)) {
        return Status(StatusCode::kInvalidArgument,
                      "learning_rate must be a finite number >= 0 for a gradient push (got " +
                          Num(options.learning_rate) +
                          "); 0 uses each variable's server-side optimizer learning rate");
      }
      break;
    default:
      return Status(StatusCode::kInvalidArgument, "unknown push kind " + std::to_string(kind) +
                                                      " (1 = parameters, 2 = delta, 3 = gradient)");
  }
  // Validate the whole push before touching any value.
  std::vector<Variable*> vars;
  vars.reserve(items.size());
  {
    std::shared_lock lock(map_mu_);
    for (const PushItem& it : items) {
      Variable* v = FindLocked(it.name);
      if (v == nullptr) {
        return Status(StatusCode::kNotFound,
                      "variable '" + std::string(it.name) +
                          "' is not registered on the server; register it before pushing. "
                          "Nothing was applied");
      }
      if (!SameShape(v->shape(), it.shape) || v->numel() != it.numel) {
        return Mismatch(it.name, v->shape(), it.shape, "push", "nothing applied");
      }
      vars.push_back(v);
    }
  }
  // A gradient push also needs a learning rate and the optimizer slots of
  // every variable before anything is applied. A variable's optimizer can
  // be changed but never removed, so what is checked here still holds in
  // the apply loop.
  if (gradient) {
    for (Variable* v : vars) {
      std::unique_lock lock(v->mu());
      if (!v->optimizer()) {
        if (options.learning_rate > 0.0f) continue;
        return Status(StatusCode::kInvalidArgument,
                      "variable '" + v->name() +
                          "' has no server-side optimizer, so a gradient push to it needs a "
                          "learning_rate > 0 (got 0); pass one or set an optimizer. Nothing was "
                          "applied");
      }
      TS_RETURN_IF_ERROR(v->EnsureSlots());
    }
  }
  for (size_t i = 0; i < items.size(); ++i) {
    Variable* v = vars[i];
    std::unique_lock lock(v->mu());
    optimizers::Update u;
    switch (static_cast<UpdateKind>(kind)) {
      case UpdateKind::kParameters:
        u.rule = optimizers::Rule::kMean;
        u.mean_window = options.mean_window;
        break;
      case UpdateKind::kDelta:
        u.rule = optimizers::Rule::kDelta;
        break;
      case UpdateKind::kGradient:
        if (const auto& opt = v->optimizer()) {
          // Normally a no-op; fails only if a SetOptimizer since the check
          // above switched to a kind with more slots and memory ran out.
          if (Status s = v->EnsureSlots(); !s.ok()) {
            if (i == 0) return s;
            version_.fetch_add(1, std::memory_order_acq_rel);
            generation_.fetch_add(1, std::memory_order_acq_rel);
            return Status(s.code(), s.message() + " for this tensor; the " + std::to_string(i) +
                                        " tensors before it in this push were applied");
          }
          const float lr =
              options.learning_rate > 0.0f ? options.learning_rate : opt->learning_rate;
          u = optimizers::OptimizerUpdate(*opt, lr, v->NextStep());
        } else {
          u.rule = optimizers::Rule::kSgd;
          u.lr = options.learning_rate;
        }
        break;
    }
    const optimizers::Buffers b{v->data(),       v->mutable_slot(0), v->mutable_slot(1),
                                items[i].values, items[i].encoded,   items[i].source};
    v->set_crc(optimizers::ApplyWithCrc(u, b, v->numel(), pool_, parallel_min_));
  }
  *version = version_.fetch_add(1, std::memory_order_acq_rel) + 1;
  // After the values: a snapshot that read the generation before this push
  // finished sees it change (snapshot.h).
  generation_.fetch_add(1, std::memory_order_acq_rel);
  return Status::OK();
}

Status ParamStore::SetOptimizer(const OptimizerConfig& config,
                                std::span<const std::string_view> names) {
  TS_RETURN_IF_ERROR(optimizers::ValidateConfig(config));
  std::lock_guard serial(set_optimizer_mu_);
  std::vector<Variable*> vars;
  if (names.empty()) {
    // Set the default and take the variable list in one step: a concurrent
    // registration is either in the list or gets the default.
    std::unique_lock lock(map_mu_);
    default_optimizer_ = config;
    vars = ordered_;
  } else {
    TS_RETURN_IF_ERROR(Lookup(names, &vars));
  }
  for (Variable* v : vars) {
    std::unique_lock lock(v->mu());
    v->SetOptimizer(config);
  }
  generation_.fetch_add(1, std::memory_order_acq_rel);
  return Status::OK();
}

std::optional<OptimizerConfig> ParamStore::default_optimizer() const {
  std::shared_lock lock(map_mu_);
  return default_optimizer_;
}

Status ParamStore::Restore(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                           std::vector<VariableState>&& vars) {
  return Install(version, default_opt, std::move(vars), /*replace=*/false);
}

Status ParamStore::Replace(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                           std::vector<VariableState>&& vars) {
  return Install(version, default_opt, std::move(vars), /*replace=*/true);
}

Status ParamStore::Install(uint64_t version, const std::optional<OptimizerConfig>& default_opt,
                           std::vector<VariableState>&& vars, bool replace) {
  auto bad = [](std::string msg) { return Status(StatusCode::kInvalidArgument, std::move(msg)); };
  if (default_opt) TS_RETURN_IF_ERROR(optimizers::ValidateConfig(*default_opt));
  if (vars.size() > max_variables_) {
    return Status(StatusCode::kLimitExceeded, "the snapshot holds " + std::to_string(vars.size()) +
                                                  " variables, more than the server's limit of " +
                                                  std::to_string(max_variables_) +
                                                  "; raise max_variables");
  }
  std::unordered_map<std::string_view, size_t> seen;
  for (const VariableState& v : vars) {
    const std::string who = "variable '" + v.name + "'";
    if (v.name.empty()) return bad("a variable has an empty name");
    if (!seen.emplace(v.name, 0).second) return bad(who + " appears twice");
    for (int64_t d : v.shape) {
      if (d < 0) return bad(who + " has a negative dimension");
    }
    const uint64_t numel = NumElements(v.shape);
    if (v.values.size() != numel) {
      return bad(who + " has " + std::to_string(v.values.size()) + " values for shape " +
                 ShapeToString(v.shape));
    }
    if (!v.optimizer) {
      if (v.slots_ready || v.step != 0) return bad(who + " has optimizer state but no optimizer");
      continue;
    }
    if (Status s = optimizers::ValidateConfig(*v.optimizer); !s.ok()) return s.WithContext(who);
    if (!v.slots_ready) continue;
    for (int i = 0; i < optimizers::NumSlots(v.optimizer->kind); ++i) {
      if (v.slots[i].size() != numel) {
        return bad(who + " has " + std::to_string(v.slots[i].size()) + " values in slot " +
                   std::to_string(i) + " but " + std::to_string(numel) + " elements");
      }
    }
  }
  // Built (and checksummed) before the lock: only the swap below holds it.
  decltype(by_name_) by_name;
  std::vector<Variable*> ordered;
  ordered.reserve(vars.size());
  uint64_t added = 0;
  for (VariableState& v : vars) {
    auto var = std::make_unique<Variable>(ordered.size(), std::move(v));
    added += var->numel();
    ordered.push_back(var.get());
    by_name.emplace(var->name(), std::move(var));
  }
  {
    std::unique_lock lock(map_mu_);
    if (!replace && !ordered_.empty()) {
      return bad("cannot restore a snapshot into a server that already holds " +
                 std::to_string(ordered_.size()) + " variables");
    }
    by_name_.swap(by_name);
    ordered_.swap(ordered);
    default_optimizer_ = default_opt;
    num_parameters_.store(added, std::memory_order_relaxed);
    version_.store(version, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  // `by_name` now holds the replaced variables: freed here, after the lock.
  return Status::OK();
}

}  // namespace tensorspark::storage
