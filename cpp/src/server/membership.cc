#include "server/membership.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <new>
#include <shared_mutex>
#include <system_error>
#include <utility>

#include "server/connection.h"

namespace tensorspark::server {

namespace {

constexpr auto kCheckInterval = std::chrono::milliseconds(100);
constexpr uint64_t kStalenessBounds[] = {0, 1, 2, 4, 8, 16, 32};
constexpr const char* kStalenessLabels[] = {"0", "1", "2", "4", "8", "16", "32", "+Inf"};
constexpr const char* kRefuseNames[] = {"fenced", "frame_too_large", "bad_checksum", "bad_version",
                                        "auth",   "limit",           "handshake",    "evicted",
                                        "tls"};

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", s);
  return buf;
}

std::string Labels(int32_t partition, int32_t attempt) {
  return "{partition=\"" + std::to_string(partition) + "\",attempt=\"" + std::to_string(attempt) +
         "\"}";
}

Status FencedError(int32_t partition, int32_t attempt, int32_t newest, const char* what) {
  return Status(StatusCode::kFenced, "partition " + std::to_string(partition) + " attempt " +
                                         std::to_string(attempt) + " was replaced by attempt " +
                                         std::to_string(newest) + "; its " + what + " are refused");
}

// sum += the item's values; a 2-byte source is decoded a block at a time.
void AddTo(const storage::PushItem& it, float* __restrict sum) {
  if (it.source == optimizers::Source::kFloat32) {
    const float* __restrict x = it.values;
    for (uint64_t j = 0; j < it.numel; ++j) sum[j] += x[j];
    return;
  }
  constexpr uint64_t kBlock = 4096;
  float block[kBlock];
  for (uint64_t off = 0; off < it.numel; off += kBlock) {
    const uint64_t n = std::min(kBlock, it.numel - off);
    optimizers::DecodeSource(it.source, it.encoded + off, block, n);
    for (uint64_t j = 0; j < n; ++j) sum[off + j] += block[j];
  }
}

}  // namespace

Membership::~Membership() { Stop(); }

Status Membership::Start() {
  try {
    checker_ = std::thread([this] { CheckerLoop(); });
  } catch (const std::system_error& e) {
    return Status(StatusCode::kInternal,
                  std::string("cannot start the membership thread: ") + e.what());
  }
  return Status::OK();
}

void Membership::Stop(double drain_s) {
  {
    std::unique_lock lock(mu_);
    stopping_ = true;
    cv_.notify_all();
    cv_.wait_for(lock, std::chrono::duration<double>(drain_s), [this] { return unsettled_ == 0; });
  }
  if (checker_.joinable()) checker_.join();
}

void Membership::Settle(Session* s) {
  if (!s->waited) return;
  s->waited = false;
  std::lock_guard lock(mu_);
  --unsettled_;
  cv_.notify_all();
}

void Membership::CheckerLoop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, kCheckInterval);
    if (!stopping_) ExpireSilent();
  }
}

void Membership::ExpireSilent() {
  const auto now = Clock::now();
  const double limit = config_.heartbeat_timeout_s;
  for (auto& [p, m] : members_) {
    if (!m.live || m.waiting > 0) continue;
    const double silent = std::chrono::duration<double>(now - m.last_seen).count();
    if (silent > limit) Drop(p, &m, "silent for " + Seconds(silent) + " s");
  }
}

void Membership::Drop(int32_t partition, Member* m, const std::string& why) {
  m->live = false;
  m->lost = true;
  m->dump.reset();  // only live members' reports are served
  if (!stopping_) {
    ++workers_lost_;
    LogEvent("worker " + std::to_string(partition) + " (attempt " + std::to_string(m->attempt) +
             ") lost: " + why);
  }
  MaybeCloseRound();
  cv_.notify_all();
}

Membership::Member* Membership::LiveMember(const Session& s) {
  if (s.partition < 0 || (s.joined && s.run != run_)) return nullptr;
  auto it = members_.find(s.partition);
  if (it == members_.end() || !it->second.live || it->second.attempt != s.attempt) return nullptr;
  return &it->second;
}

Status Membership::CheckFenced(const Session& s) const {
  if (s.partition < 0) return Status::OK();
  if (s.joined && s.run != run_) {
    return Status(StatusCode::kFenced, "partition " + std::to_string(s.partition) + " attempt " +
                                           std::to_string(s.attempt) +
                                           " joined an earlier run; its pushes are refused");
  }
  auto it = max_attempt_.find(s.partition);
  if (it == max_attempt_.end() || s.attempt >= it->second) return Status::OK();
  return FencedError(s.partition, s.attempt, it->second, "pushes");
}

void Membership::Opened(const Session& s) {
  if (s.partition < 0) return;
  std::lock_guard lock(mu_);
  ++conns_[{s.partition, s.attempt}];
}

void Membership::Closed(const Session& s, bool quiet) {
  if (s.partition < 0) return;
  std::lock_guard lock(mu_);
  auto c = conns_.find({s.partition, s.attempt});
  if (c != conns_.end() && --c->second == 0) conns_.erase(c);
  if (!s.joined) return;
  Member* m = LiveMember(s);
  if (m == nullptr || m->join_conn != s.conn_id) return;
  if (quiet) {
    m->live = false;  // shutting down: nobody to tell
    cv_.notify_all();
    return;
  }
  Drop(s.partition, m, "connection closed");
}

void Membership::Touch(const Session& s) {
  if (s.partition < 0) return;
  std::lock_guard lock(mu_);
  if (Member* m = LiveMember(s)) m->last_seen = Clock::now();
}

void Membership::Report(const Session& s, const protocol::ProgressReport& report) {
  if (s.partition < 0) return;
  std::lock_guard lock(mu_);
  Member* m = LiveMember(s);
  if (m == nullptr) return;
  // Only an increase counts as progress: a repeated (or reset) count keeps
  // the age growing, so a watchdog sees a stuck worker.
  if (report.steps > m->progress.steps) m->progress_at = Clock::now();
  m->progress = report;
}

Status Membership::StoreDump(const Session& s, std::string_view text) {
  if (s.partition < 0) return Status::OK();
  // Copied before taking mu_; `old` is declared first so that the text it
  // replaces is freed after mu_ is released.
  std::shared_ptr<const std::string> old, fresh;
  try {
    fresh = std::make_shared<const std::string>(text);
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kLimitExceeded, "server has no memory to store this report");
  }
  std::lock_guard lock(mu_);
  Member* m = LiveMember(s);
  if (m == nullptr) return Status::OK();
  old = std::exchange(m->dump, std::move(fresh));
  m->dump_at = Clock::now();
  return Status::OK();
}

void Membership::Reports(std::vector<WorkerReport>* out) const {
  out->clear();
  std::vector<std::shared_ptr<const std::string>> texts;
  {
    std::lock_guard lock(mu_);
    // Read under mu_: no time stamp below is later than `now`.
    const auto now = Clock::now();
    auto ms_since = [&](Clock::time_point t) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - t).count();
      return static_cast<uint64_t>(std::max<decltype(ms)>(ms, 0));
    };
    for (const auto& [p, m] : members_) {
      if (!m.live) continue;
      WorkerReport r;
      r.partition = p;
      r.attempt = m.attempt;
      r.clock = m.clock;
      r.steps = m.progress.steps;
      r.progress_age_ms = ms_since(m.progress_at);
      if (m.dump) r.report_age_ms = ms_since(m.dump_at);
      out->push_back(std::move(r));
      texts.push_back(m.dump);
    }
  }
  // The texts (up to 64 KiB each) are copied without holding mu_.
  for (size_t i = 0; i < texts.size(); ++i) {
    if (texts[i]) (*out)[i].text = *texts[i];
  }
}

uint64_t Membership::MinLiveClock() const {
  uint64_t min = std::numeric_limits<uint64_t>::max();
  for (const auto& [p, m] : members_) {
    if (m.live) min = std::min(min, m.clock);
  }
  return min;
}

std::string Membership::Missing(uint64_t round) const {
  std::string out;
  for (const auto& [p, m] : members_) {
    if (m.live && m.clock <= round) out += (out.empty() ? "" : ", ") + std::to_string(p);
  }
  return out.empty() ? "none" : out;
}

std::string Membership::Lagging(uint64_t need) const {
  std::string out;
  for (const auto& [p, m] : members_) {
    if (m.live && m.clock < need) {
      out += (out.empty() ? "" : ", ") + std::to_string(p) + " (clock " + std::to_string(m.clock) +
             ")";
    }
  }
  return out.empty() ? "none" : out;
}

Status Membership::Join(Session* s, uint64_t* clock) {
  if (s->partition < 0) {
    return Status(StatusCode::kInvalidArgument,
                  "only a worker connection (partition id >= 0) can JOIN; this one connected "
                  "as partition " +
                      std::to_string(s->partition));
  }
  std::lock_guard lock(mu_);
  if (stopping_) return Status(StatusCode::kShuttingDown, "the parameter server is shutting down");
  if (s->joined && s->run != run_) {
    Fence(*s);
    return Status(StatusCode::kFenced, "partition " + std::to_string(s->partition) + " attempt " +
                                           std::to_string(s->attempt) +
                                           " joined an earlier run; its JOINs are refused");
  }
  auto [max, fresh] = max_attempt_.emplace(s->partition, s->attempt);
  if (!fresh && s->attempt < max->second) {
    Fence(*s);
    return FencedError(s->partition, s->attempt, max->second, "JOINs");
  }
  max->second = s->attempt;
  const uint64_t min_clock = MinLiveClock();
  Member& m = members_[s->partition];
  if (m.live && m.attempt == s->attempt) {  // joins again (another connection)
    m.join_conn = s->conn_id;
    m.last_seen = Clock::now();
    s->joined = true;
    s->run = run_;
    *clock = m.clock;
    return Status::OK();
  }
  if (!fresh && s->attempt > m.attempt) ++workers_retried_;
  if (m.live) Drop(s->partition, &m, "replaced by attempt " + std::to_string(s->attempt));
  m = Member{};
  m.attempt = s->attempt;
  m.live = true;
  m.join_conn = s->conn_id;
  m.last_seen = Clock::now();
  m.progress_at = m.last_seen;
  // Sync: the open round; otherwise level with the slowest live member.
  if (config_.mode == ConsistencyMode::kSync) {
    m.clock = round_;
  } else {
    m.clock = min_clock == std::numeric_limits<uint64_t>::max() ? 0 : min_clock;
  }
  s->joined = true;
  s->run = run_;
  *clock = m.clock;
  LogEvent("worker " + std::to_string(s->partition) + " (attempt " + std::to_string(s->attempt) +
           ") joined at clock " + std::to_string(m.clock));
  cv_.notify_all();
  return Status::OK();
}

Status Membership::Leave(Session* s) {
  std::lock_guard lock(mu_);
  if (Member* m = LiveMember(*s)) {
    m->live = false;
    m->lost = false;
    m->dump.reset();  // up to 64 KiB per partition ever seen otherwise
    MaybeCloseRound();
    cv_.notify_all();
  }
  s->joined = false;
  return Status::OK();
}

std::string Membership::LivePartitions() const {
  std::string live;
  for (const auto& [p, m] : members_) {
    if (m.live) live += (live.empty() ? "" : ", ") + std::to_string(p);
  }
  return live;
}

Status Membership::CheckIdle(const std::string& what, bool discard_round) {
  std::lock_guard lock(mu_);
  if (const std::string live = LivePartitions(); !live.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "cannot " + what + " while workers are live (partitions " + live +
                      "); do it between Spark jobs, when no worker has joined");
  }
  if (discard_round) {
    // The last member to leave closed the open round; should pushes remain
    // anyway, they were made against the state being replaced.
    accum_.clear();
    round_pushes_ = 0;
  }
  return Status::OK();
}

Status Membership::Configure(const RunConfig& config) {
  std::lock_guard lock(mu_);
  if (const std::string live = LivePartitions(); !live.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "cannot change the run configuration while workers are live (partitions " + live +
                      "); configure before the workers join or after they leave");
  }
  config_ = config;
  // A new run: attempts restart (a new Spark application numbers its task
  // attempts from 0 again), and the members of the last one are gone.
  ++run_;
  max_attempt_.clear();
  members_.clear();
  cv_.notify_all();
  return Status::OK();
}

template <typename Ready, typename Describe>
Status Membership::Wait(std::unique_lock<std::mutex>& lock, Session* s, Ready ready,
                        Describe describe) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(config_.wait_timeout_s));
  Member* m = LiveMember(*s);
  if (m == nullptr || ready(*m)) return Status::OK();
  ++m->waiting;
  if (!s->waited) {
    s->waited = true;
    ++unsettled_;
  }
  Status result;
  for (;;) {
    if (stopping_) {
      result = Status(StatusCode::kShuttingDown,
                      "the parameter server is shutting down (was waiting for " + describe() + ")");
      break;
    }
    m = LiveMember(*s);
    if (m == nullptr || ready(*m)) break;
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
      m = LiveMember(*s);
      if (m == nullptr || ready(*m) || stopping_) continue;
      result = Status(StatusCode::kTimeout, describe() + " (gave up after wait_timeout_s = " +
                                                Seconds(config_.wait_timeout_s) + " s)");
      break;
    }
  }
  // The member (same attempt) may have been dropped and joined again
  // meanwhile, with a fresh count.
  if (m = LiveMember(*s); m != nullptr && m->waiting > 0) {
    --m->waiting;
    m->last_seen = Clock::now();
  }
  return result;
}

Status Membership::BeforePull(Session* s) {
  if (s->partition >= 0) {
    std::unique_lock lock(mu_);
    if (Member* m = LiveMember(*s); m != nullptr && config_.mode != ConsistencyMode::kAsync) {
      Status w;
      if (config_.mode == ConsistencyMode::kSync) {
        const uint64_t need = m->clock;  // rounds before `need` must be closed
        w = Wait(
            lock, s, [&](const Member&) { return round_ >= need; },
            [&] {
              return "round " + std::to_string(round_) + ": waiting for partitions " +
                     Missing(round_);
            });
      } else {
        const uint64_t clock = m->clock;
        const uint64_t need = clock >= config_.staleness ? clock - config_.staleness : 0;
        w = Wait(
            lock, s, [&](const Member&) { return MinLiveClock() >= need; },
            [&] {
              return "clock " + std::to_string(clock) + " (staleness " +
                     std::to_string(config_.staleness) + "): waiting for partitions " +
                     Lagging(need);
            });
      }
      TS_RETURN_IF_ERROR(w);
    }
  }
  s->pulled = true;
  s->pull_version = store_->version();
  return Status::OK();
}

void Membership::RecordStaleness(Member* m, uint64_t staleness) {
  size_t i = 0;
  while (i < std::size(kStalenessBounds) && staleness > kStalenessBounds[i]) ++i;
  ++staleness_buckets_[i];
  staleness_sum_ += staleness;
  ++staleness_count_;
  if (m != nullptr) {
    m->staleness_last = staleness;
    m->staleness_sum += staleness;
    ++m->staleness_count;
  }
}

void Membership::Fence(const Session& s) {
  CountRefused(RefuseReason::kFenced);
  const std::pair<uint64_t, int32_t> fenced{s.joined ? s.run : run_, s.attempt};
  auto [it, inserted] = last_fenced_.try_emplace(s.partition, fenced);
  if (inserted || it->second != fenced) {
    it->second = fenced;
    ++workers_fenced_;
  }
}

Status Membership::Push(Session* sp, uint8_t kind, const PushOptions& options,
                        std::span<const storage::PushItem> items, uint64_t* version) {
  const Session& s = *sp;
  std::unique_lock lock(mu_);
  if (Status f = CheckFenced(s); !f.ok()) {
    Fence(s);
    return f;
  }
  const ConsistencyMode mode = config_.mode;
  if (s.partition >= 0 && mode != ConsistencyMode::kAsync && LiveMember(s) == nullptr) {
    auto it = members_.find(s.partition);
    if (it != members_.end() && it->second.lost && it->second.attempt == s.attempt) {
      return Status(StatusCode::kInvalidArgument,
                    "partition " + std::to_string(s.partition) + " attempt " +
                        std::to_string(s.attempt) +
                        " was dropped from the run (connection closed or silent past "
                        "heartbeat_timeout_s); JOIN again before pushing");
    }
  }
  if (mode != ConsistencyMode::kSync || LiveMember(s) == nullptr) {
    // Applied on arrival, without mu_ (variable locks only).
    lock.unlock();
    TS_RETURN_IF_ERROR(store_->Push(kind, options, items, version));
    lock.lock();
    Member* m = LiveMember(s);
    if (s.pulled) RecordStaleness(m, *version - 1 - std::min(*version - 1, s.pull_version));
    if (m != nullptr) {
      ++m->clock;
      cv_.notify_all();
    }
    return Status::OK();
  }
  // Sync round: wait until this member's previous round has closed.
  TS_RETURN_IF_ERROR(Wait(
      lock, sp, [&](const Member& m) { return m.clock <= round_; },
      [&] {
        return "round " + std::to_string(round_) + ": waiting for partitions " + Missing(round_);
      }));
  Member* m = LiveMember(s);
  if (m == nullptr) {
    return Status(StatusCode::kInvalidArgument,
                  "partition " + std::to_string(s.partition) +
                      " left the run while its push waited; JOIN again before pushing");
  }
  if (kind < 1 || kind > 3) {
    return Status(StatusCode::kInvalidArgument, "unknown push kind " + std::to_string(kind) +
                                                    " (1 = parameters, 2 = delta, 3 = gradient)");
  }
  if (round_pushes_ > 0 && kind != round_kind_) {
    return Status(StatusCode::kInvalidArgument,
                  "every push of a sync round must have the same kind: round " +
                      std::to_string(round_) + " has kind " + std::to_string(round_kind_) +
                      ", this push " + std::to_string(kind));
  }
  if (kind == static_cast<uint8_t>(UpdateKind::kGradient) &&
      (!(options.learning_rate >= 0.0f) || !std::isfinite(options.learning_rate))) {
    return Status(StatusCode::kInvalidArgument,
                  "learning_rate must be a finite number >= 0 for a gradient push");
  }
  std::vector<std::string_view> names;
  names.reserve(items.size());
  for (const storage::PushItem& it : items) names.push_back(it.name);
  std::vector<storage::Variable*> vars;
  TS_RETURN_IF_ERROR(store_->Lookup(names, &vars));
  for (size_t i = 0; i < items.size(); ++i) {
    const auto& shape = vars[i]->shape();  // immutable
    if (!std::equal(shape.begin(), shape.end(), items[i].shape.begin(), items[i].shape.end()) ||
        vars[i]->numel() != items[i].numel) {
      return Status(StatusCode::kShapeMismatch, "variable '" + vars[i]->name() +
                                                    "' has another shape than the push; nothing " +
                                                    "was added to the round");
    }
  }
  if (kind == static_cast<uint8_t>(UpdateKind::kGradient) && options.learning_rate == 0.0f) {
    // Checked now, so that the round's apply cannot fail on it.
    for (storage::Variable* v : vars) {
      std::shared_lock var_lock(v->mu());
      if (!v->optimizer()) {
        return Status(StatusCode::kInvalidArgument,
                      "variable '" + v->name() +
                          "' has no server-side optimizer, so a gradient push to it needs a "
                          "learning_rate > 0 (got 0); nothing was added to the round");
      }
    }
  }
  if (round_pushes_++ == 0) {
    round_kind_ = kind;
    round_options_ = options;
  }
  for (const storage::PushItem& it : items) {
    auto a = accum_.find(it.name);
    if (a == accum_.end()) {
      Accum fresh;
      fresh.shape.assign(it.shape.begin(), it.shape.end());
      if (it.source == optimizers::Source::kFloat32) {
        fresh.sum.assign(it.values, it.values + it.numel);
      } else {
        fresh.sum.resize(it.numel);
        optimizers::DecodeSource(it.source, it.encoded, fresh.sum.data(), it.numel);
      }
      fresh.count = 1;
      accum_.emplace(std::string(it.name), std::move(fresh));
    } else {
      AddTo(it, a->second.sum.data());
      ++a->second.count;
    }
  }
  const uint64_t v = store_->version();
  if (s.pulled) RecordStaleness(m, v - std::min(v, s.pull_version));
  m->clock = round_ + 1;
  MaybeCloseRound();
  cv_.notify_all();
  *version = store_->version();
  return Status::OK();
}

void Membership::MaybeCloseRound() {
  if (config_.mode != ConsistencyMode::kSync || round_pushes_ == 0) return;
  for (const auto& [p, m] : members_) {
    if (m.live && m.clock <= round_) return;
  }
  std::vector<storage::PushItem> items;
  items.reserve(accum_.size());
  for (auto& [name, a] : accum_) {
    const float inv = 1.0f / static_cast<float>(a.count);
    if (a.count > 1) {
      for (float& x : a.sum) x *= inv;
    }
    items.push_back({name, a.shape, a.sum.data(), a.sum.size()});
  }
  PushOptions options = round_options_;
  options.mean_window = 1;  // parameters: w = mean
  uint64_t version = 0;
  // ParamStore::Push keeps each variable's crc() up to date.
  Status s = store_->Push(round_kind_, options, items, &version);
  if (!s.ok()) LogEvent("sync round " + std::to_string(round_) + " not applied: " + s.ToString());
  accum_.clear();
  round_pushes_ = 0;
  ++round_;
  cv_.notify_all();
}

void Membership::AppendStats(std::vector<StatEntry>* out) const {
  std::lock_guard lock(mu_);
  // Read under mu_: no time stamp below is later than `now`.
  const auto now = Clock::now();
  auto ms_since = [&](Clock::time_point t) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - t).count();
    return static_cast<uint64_t>(std::max<decltype(ms)>(ms, 0));
  };
  uint64_t live = 0;
  for (const auto& [p, m] : members_) {
    if (!m.live) continue;
    ++live;
    const std::string labels = Labels(p, m.attempt);
    out->emplace_back("worker_clock" + labels, m.clock);
    auto c = conns_.find({p, m.attempt});
    out->emplace_back("worker_connections" + labels, c == conns_.end() ? 0 : c->second);
    out->emplace_back("worker_last_seen_ms" + labels, ms_since(m.last_seen));
    out->emplace_back("worker_steps" + labels, m.progress.steps);
    out->emplace_back("worker_samples" + labels, m.progress.samples);
    // `_f64` keys carry the IEEE-754 bits of a double (docs/consistency.md).
    out->emplace_back("worker_loss_f64" + labels, std::bit_cast<uint64_t>(m.progress.loss));
    out->emplace_back("worker_progress_age_ms" + labels, ms_since(m.progress_at));
    out->emplace_back("worker_staleness" + labels, m.staleness_last);
    out->emplace_back("worker_staleness_sum" + labels, m.staleness_sum);
    out->emplace_back("worker_staleness_count" + labels, m.staleness_count);
  }
  out->emplace_back("members", live);
  out->emplace_back("workers_lost", workers_lost_);
  out->emplace_back("workers_retried", workers_retried_);
  out->emplace_back("workers_fenced", workers_fenced_);
  out->emplace_back("mode", static_cast<uint64_t>(config_.mode));
  out->emplace_back("sync_round", round_);
  uint64_t cumulative = 0;
  for (size_t i = 0; i < staleness_buckets_.size(); ++i) {
    cumulative += staleness_buckets_[i];
    out->emplace_back(std::string("staleness_bucket{le=\"") + kStalenessLabels[i] + "\"}",
                      cumulative);
  }
  out->emplace_back("staleness_sum", staleness_sum_);
  out->emplace_back("staleness_count", staleness_count_);
  for (int i = 0; i < static_cast<int>(RefuseReason::kCount); ++i) {
    out->emplace_back(std::string("refused{reason=\"") + kRefuseNames[i] + "\"}",
                      refused_[i].load(std::memory_order_relaxed));
  }
}

}  // namespace tensorspark::server
