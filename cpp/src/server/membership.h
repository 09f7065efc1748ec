// Members of a run and the consistency modes (docs/consistency.md).
//
// Locking: `mu_` guards every field below it; `cv_` is notified whenever a
// wait condition may have changed (a clock moved, a round closed, a member
// joined, left or was lost, Stop()). Waits release `mu_` and never hold a
// variable lock. The only lock taken while holding `mu_` is a variable lock
// inside ParamStore::Push (closing a sync round), so the order is always
// mu_ -> variable lock.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "protocol/messages.h"
#include "storage/param_store.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::server {

// What one connection knows about its identity (set by the handshake).
// Owned by the connection's thread.
struct Session {
  int32_t partition = -1;
  int32_t attempt = 0;
  uint64_t conn_id = 0;       // unique per connection
  bool joined = false;        // this connection sent the member's JOIN
  uint64_t run = 0;           // the run (Configure count) it joined in
  bool pulled = false;        // pull_version is set
  bool waited = false;        // the current request blocked in a wait (see Settle)
  uint64_t pull_version = 0;  // model version at this connection's last pull
};

// Why a frame was refused, for refused{reason=...}.
enum class RefuseReason : int {
  kFenced = 0,
  kFrameTooLarge,
  kBadChecksum,
  kBadVersion,
  kAuth,
  kLimit,
  kHandshake,  // a handshake that timed out, was malformed or was cut off
  kEvicted,    // a pending handshake dropped to admit a newer connection
  kTls,        // a TLS record that failed to authenticate: altered, or a broken peer
  kCount,
};

class Membership {
 public:
  explicit Membership(storage::ParamStore* store) : store_(store) {}
  ~Membership();  // Stop()s

  // Starts the checker thread that drops members silent past the heartbeat
  // timeout (every ~100 ms).
  [[nodiscard]] Status Start();
  // Wakes every waiter with kShuttingDown and joins the checker, then gives
  // the woken requests up to `drain_s` to send their answers (Settle).
  // Idempotent.
  void Stop(double drain_s = 0);
  // Called by a connection after it answered a request: ends the request's
  // wait, if it had one.
  void Settle(Session* s);

  // Connection lifecycle.
  void Opened(const Session& s);
  // A joined connection that closes without LEAVE drops its member.
  void Closed(const Session& s, bool quiet);
  // Any frame from a member's connection refreshes its last-seen time.
  void Touch(const Session& s);

  // A HEARTBEAT's progress report: stored for the live member with this
  // connection's identity; ignored from any other connection (nothing would
  // show it, and JOIN starts a member's progress afresh).
  void Report(const Session& s, const protocol::ProgressReport& report);

  // A REPORT's stack dump: stored, with its receive time, for the live
  // member with this connection's identity, replacing the previous one;
  // ignored from any other connection, like progress reports. Fails only
  // when memory is short.
  [[nodiscard]] Status StoreDump(const Session& s, std::string_view text);
  // Every live member with its clock, progress and latest dump (REPORTS).
  // Ages are clamped at 0.
  void Reports(std::vector<WorkerReport>* out) const;

  [[nodiscard]] Status Join(Session* s, uint64_t* clock);
  [[nodiscard]] Status Leave(Session* s);
  [[nodiscard]] Status Configure(const RunConfig& config);
  // OK when no member is live, else kInvalidArgument naming the live
  // partitions ("cannot <what> while workers are live ..."). When OK and
  // `discard_round`, an open sync round is discarded (RESTORE replaces the
  // state it was made against). Members can join right after it returns
  // unless the caller prevents that (RESTORE holds ServerContext::store_mu,
  // which JOIN needs).
  [[nodiscard]] Status CheckIdle(const std::string& what, bool discard_round);

  // Called before a pull is served: waits as the mode requires (members
  // only), then remembers the version the member pulled at.
  [[nodiscard]] Status BeforePull(Session* s);
  // Applies (or, in sync mode, accumulates) a validated push. Refuses
  // fenced attempts. `version` receives the model version.
  [[nodiscard]] Status Push(Session* s, uint8_t kind, const PushOptions& options,
                            std::span<const storage::PushItem> items, uint64_t* version);

  void CountRefused(RefuseReason r) {
    refused_[static_cast<int>(r)].fetch_add(1, std::memory_order_relaxed);
  }
  // Appends members, the per-member worker_* keys (clock, connections,
  // last seen, progress, staleness), the staleness histogram and the
  // refused counters.
  void AppendStats(std::vector<StatEntry>* out) const;

 private:
  using Clock = std::chrono::steady_clock;
  struct Member {
    int32_t attempt = 0;
    uint64_t clock = 0;
    Clock::time_point last_seen;
    bool live = false;
    bool lost = false;  // dropped by the server (closed or silent), not LEAVE
    uint64_t join_conn = 0;
    // Requests of this member now waiting in Wait(): a waiting member is
    // not silent, whatever the heartbeat timeout.
    uint32_t waiting = 0;
    // Latest progress report (HEARTBEAT); progress_at is when `steps` last
    // increased, or the JOIN.
    protocol::ProgressReport progress{0, 0, std::numeric_limits<double>::quiet_NaN()};
    Clock::time_point progress_at;
    // Latest REPORT text and when it arrived. Shared and immutable, so
    // REPORTS copies it after releasing mu_.
    std::shared_ptr<const std::string> dump;
    Clock::time_point dump_at;
    // This member's pushes' staleness: the last one, and sum and count.
    uint64_t staleness_last = 0;
    uint64_t staleness_sum = 0;
    uint64_t staleness_count = 0;
  };
  struct Accum {  // one variable of the open sync round
    std::vector<int64_t> shape;
    std::vector<float> sum;
    uint32_t count = 0;
  };

  // All below: caller holds mu_.
  // "0, 3": the live members' partitions, "" when none.
  std::string LivePartitions() const;
  Member* LiveMember(const Session& s);
  Status CheckFenced(const Session& s) const;
  void Drop(int32_t partition, Member* m, const std::string& why);
  void ExpireSilent();
  uint64_t MinLiveClock() const;
  std::string Missing(uint64_t round) const;
  std::string Lagging(uint64_t need) const;
  // Closes the open sync round when every live member has pushed for it.
  void MaybeCloseRound();
  // Waits until `ready()` or the member is no longer live; fails on timeout
  // (message from `describe()`) or Stop().
  template <typename Ready, typename Describe>
  Status Wait(std::unique_lock<std::mutex>& lock, Session* s, Ready ready, Describe describe);
  // Counts a push's staleness in the histogram and, for a live member, in
  // its own worker_staleness* keys.
  void RecordStaleness(Member* m, uint64_t staleness);
  // Refuses a fenced frame: counts it, and its attempt once in workers_fenced.
  void Fence(const Session& s);
  void CheckerLoop();

  storage::ParamStore* const store_;
  std::array<std::atomic<uint64_t>, static_cast<int>(RefuseReason::kCount)> refused_{};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  uint64_t unsettled_ = 0;  // requests that waited and have not answered yet
  std::thread checker_;
  RunConfig config_;
  std::map<int32_t, Member> members_;                      // by partition
  std::map<int32_t, int32_t> max_attempt_;                 // highest attempt seen per partition
  std::map<std::pair<int32_t, int32_t>, uint64_t> conns_;  // open connections per identity
  // Sync rounds: the open round, its accumulators (by variable name) and
  // the kind and options of its first push.
  uint64_t round_ = 0;
  uint64_t round_pushes_ = 0;  // pushes added to the open round
  std::map<std::string, Accum, std::less<>> accum_;
  uint8_t round_kind_ = 0;
  PushOptions round_options_;
  // Staleness histogram: buckets le 0,1,2,4,8,16,32,+Inf (not cumulative
  // here; rendered cumulatively).
  std::array<uint64_t, 8> staleness_buckets_{};
  uint64_t staleness_sum_ = 0;
  uint64_t staleness_count_ = 0;
  // Failures seen: members dropped (connection closed, silent, or replaced)
  // and joins by a newer attempt of a partition that had joined before.
  // Bumped by Configure: a new run starts a new fencing epoch, and members
  // of an earlier run are refused.
  uint64_t run_ = 0;
  uint64_t workers_lost_ = 0;
  uint64_t workers_retried_ = 0;
  // workers_fenced: attempts refused as fenced, each (run, partition,
  // attempt) counted once. Only the latest per partition is kept, so memory
  // is bounded by the partitions, not by the attempts ever fenced (a stale
  // attempt fenced again after another one of its partition counts twice).
  std::map<int32_t, std::pair<uint64_t, int32_t>> last_fenced_;
  uint64_t workers_fenced_ = 0;
};

}  // namespace tensorspark::server
