#include "storage/param_store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "optimizers/update_rules.h"
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

}  // namespace

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
    ordered_.push_back(var.get());
    by_name_.emplace(var->name(), std::move(var));
    (*created)[i] = 1;
    added += numel;
  }
  num_parameters_.fetch_add(added, std::memory_order_relaxed);
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
      if (!(options.learning_rate > 0.0f) || !std::isfinite(options.learning_rate)) {
        return Status(StatusCode::kInvalidArgument,
                      "learning_rate must be a finite number > 0 for a gradient push (got " +
                          std::to_string(options.learning_rate) + ")");
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
  // Block size for fusing the update with the CRC refresh: the CRC reads
  // each block while it is still in L1/L2 instead of in a second pass.
  constexpr uint64_t kBlock = 8192;
  for (size_t i = 0; i < items.size(); ++i) {
    Variable* v = vars[i];
    std::unique_lock lock(v->mu());
    uint32_t crc = 0;
    for (uint64_t off = 0; off < v->numel(); off += kBlock) {
      const uint64_t n = std::min(kBlock, v->numel() - off);
      float* w = v->data() + off;
      const float* x = items[i].values + off;
      switch (static_cast<UpdateKind>(kind)) {
        case UpdateKind::kParameters:
          optimizers::MeanCombine(w, x, n, options.mean_window);
          break;
        case UpdateKind::kDelta:
          optimizers::DeltaApply(w, x, n);
          break;
        case UpdateKind::kGradient:
          optimizers::SgdApply(w, x, n, options.learning_rate);
          break;
      }
      crc = protocol::Crc32cExtend(crc, w, n * sizeof(float));
    }
    v->set_crc(crc);
  }
  *version = version_.fetch_add(1, std::memory_order_acq_rel) + 1;
  return Status::OK();
}

}  // namespace tensorspark::storage
