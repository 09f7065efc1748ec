// Server and ServerImpl: the acceptor thread and connection bookkeeping.
#include "tensorspark/server.h"

#include <malloc.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <list>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <system_error>
#include <thread>

#include "net/socket.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "server/connection.h"
#include "server/metrics_http.h"
#include "storage/snapshot.h"
#include "storage/table_snapshot.h"

namespace tensorspark {

using server::Connection;
using server::LogEvent;

namespace {
constexpr uint32_t kMaxUpdateThreads = 1024;
// How often the snapshot thread looks whether a snapshot is due.
constexpr auto kSnapshotCheck = std::chrono::milliseconds(100);
// After a failed background write the next try waits this long, so a full
// disk does not make the thread spin and flood the log.
constexpr auto kSnapshotRetry = std::chrono::seconds(5);
// How long RESTORE waits for the requests in flight to finish before it
// gives up (it is meant for quiescent points, where there are none).
constexpr auto kRestoreWait = std::chrono::seconds(10);

// The last path component.
std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// mkdir -p: creates `dir` and missing parents (mode 0755).
Status MakeDirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos < dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return Status(StatusCode::kInvalidArgument, "snapshot_dir '" + dir + "': cannot create '" +
                                                      prefix + "': " + std::strerror(errno));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot_dir '" + dir + "' exists and is not a directory");
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot_dir '" + dir + "' is not writable: " + std::strerror(errno));
  }
  return Status::OK();
}
}  // namespace

class ServerImpl {
 public:
  explicit ServerImpl(const ServerOptions& options) : ctx_(options) {}
  ~ServerImpl() { Stop(); }

  Status Start();
  uint16_t port() const { return port_; }
  int metrics_port() const { return metrics_ ? metrics_->port() : -1; }
  uint64_t version() const { return ctx_.store.version(); }
  std::vector<StatEntry> Stats() const { return ctx_.Snapshot(); }
  Status Snapshot(std::string* path);
  void Stop();
  bool WaitUntilStopped(double timeout_s);

 private:
  struct ConnEntry {
    std::unique_ptr<Connection> conn;
    std::thread thread;
  };

  // Accepts on `listener` (TCP, or the Unix socket: one thread each).
  void AcceptLoop(const net::Socket* listener);
  // Joins the threads of connections that ended (acceptor thread only).
  void ReapFinished();
  // Hands free heap pages back to the kernel once no connection is open
  // and kTrimIdleS passed since connections ended or a snapshot was written
  // (acceptor threads). A burst of clients leaves its frame buffers, and a
  // snapshot its staging buffers, free but resident in the malloc arenas;
  // without this, idle RSS depends on the last burst's size.
  void TrimWhenIdle();
  // Something large was freed: the next idle moment trims (any thread).
  void MarkHeapDirty();
  // Makes room for a connection from `peer` under the pending-handshake
  // caps by shutting down another pending one (acceptor thread only).
  void EvictPendingFor(const std::string& peer);
  // Answers a connection we will not serve with an error frame, then drops it.
  void Refuse(net::Socket sock, const std::string& peer, const Status& why);
  void RequestShutdown();

  // Validates the snapshot options, prepares snapshot_dir and restores
  // resume_from into the (still empty) store; before anything listens.
  Status StartSnapshots();
  // Writes snapshots when due until Stop().
  void SnapshotLoop();
  // Writes one snapshot tagged `tag` (0: untagged), logs and counts the
  // outcome, prunes old files. Caller holds snapshot_mu_.
  Status WriteSnapshotLocked(const std::string& why, uint64_t tag,
                             storage::WrittenSnapshot* written);
  // SNAPSHOT, SNAPSHOTS and RESTORE (ServerContext::snapshots); called on
  // connection threads, never throw.
  Status CheckTagged(const char* what, uint64_t tag) const;
  Status SnapshotTagged(uint64_t tag, std::string* name, uint64_t* version);
  Status ListSnapshots(std::vector<SnapshotInfo>* out);
  Status RestoreTagged(uint64_t tag, uint64_t* version);

  server::ServerContext ctx_;
  net::Socket listener_;
  uint16_t port_ = 0;
  std::thread acceptor_;
  net::Socket unix_listener_;  // valid when options.unix_path is set
  std::thread unix_acceptor_;
  std::unique_ptr<server::MetricsHttpServer> metrics_;  // null when off

  std::mutex conns_mu_;  // guards conns_
  std::list<ConnEntry> conns_;
  std::mutex trim_mu_;  // guards the two fields below
  bool heap_dirty_ = false;
  std::chrono::steady_clock::time_point dirtied_at_{};

  std::mutex stop_call_mu_;  // serializes Stop() callers
  std::mutex state_mu_;      // guards stopped_, stop_requested_
  std::condition_variable state_cv_;
  bool stopped_ = false;
  bool stop_requested_ = false;
  bool started_ = false;  // Start() succeeded (so Stop() writes the final snapshot)

  std::thread snapshot_thread_;
  // One snapshot write (or restore) at a time; guards last_snap_* and the
  // files of snapshot_dir.
  std::mutex snapshot_mu_;
  uint64_t last_snap_version_ = 0;
  uint64_t last_snap_generation_ = 0;  // store generation the last snapshot covers
  // Tables the last snapshot covers: creating a table changes no generation.
  uint64_t last_snap_tables_ = 0;
  // The tables' chain of the last snapshot written; reset (next snapshot:
  // full images) by a resume or restore.
  storage::TableChainState table_chain_;
  std::chrono::steady_clock::time_point last_snap_time_;
  std::chrono::steady_clock::time_point snap_retry_after_;  // after a failed background write
  std::mutex snap_wait_mu_;                                 // guards snap_stop_
  std::condition_variable snap_cv_;
  bool snap_stop_ = false;
};

Status ServerImpl::StartSnapshots() {
  const ServerOptions& o = ctx_.options;
  if (!(o.snapshot_every_s >= 0) || !std::isfinite(o.snapshot_every_s)) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot_every_s must be a finite number of seconds >= 0 (0: off)");
  }
  if ((o.snapshot_every_s > 0 || o.snapshot_every_versions > 0) && o.snapshot_dir.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot_every_s and snapshot_every_versions need a snapshot_dir");
  }
  if (!o.snapshot_dir.empty()) TS_RETURN_IF_ERROR(MakeDirs(o.snapshot_dir));
  last_snap_time_ = std::chrono::steady_clock::now();
  if (o.resume_from.empty()) return Status::OK();

  storage::SnapshotData data;
  std::string chosen;
  std::vector<std::string> skipped;
  Status s = storage::LoadSnapshot(o.resume_from, &data, &chosen, &skipped);
  for (const std::string& why : skipped) {
    LogEvent("resume: skipping " + why + (s.ok() ? "; falling back to an older snapshot" : ""));
  }
  TS_RETURN_IF_ERROR(s);
  const uint64_t version = data.version;
  const size_t variables = data.variables.size();
  const size_t tables = data.tables.size();
  TS_RETURN_IF_ERROR(storage::RestoreTables(std::move(data.tables), &ctx_.tables)
                         .WithContext("resume from " + chosen));
  TS_RETURN_IF_ERROR(
      storage::RestoreSnapshot(std::move(data), &ctx_.store).WithContext("resume from " + chosen));
  ctx_.counters.resumed_version.store(version, std::memory_order_relaxed);
  // The resumed state counts as written: no snapshot until it changes.
  last_snap_version_ = version;
  last_snap_generation_ = ctx_.store.generation();
  last_snap_tables_ = ctx_.tables.size();
  LogEvent("resumed from " + chosen + ": version " + std::to_string(version) + ", " +
           std::to_string(variables) + " variables, " + std::to_string(tables) + " tables");
  return Status::OK();
}

Status ServerImpl::WriteSnapshotLocked(const std::string& why, uint64_t tag,
                                       storage::WrittenSnapshot* written) {
  const ServerOptions& o = ctx_.options;
  const auto start = std::chrono::steady_clock::now();
  last_snap_time_ = start;
  storage::WrittenSnapshot info;
  Status s = storage::WriteSnapshotWithTables(ctx_.store, &ctx_.tables, o.snapshot_dir,
                                              &table_chain_, &info, tag);
  if (!s.ok()) {
    ctx_.counters.snapshot_errors.fetch_add(1, std::memory_order_relaxed);
    LogEvent("snapshot (" + why + ") failed: " + s.ToString());
    return s;
  }
  ctx_.counters.snapshots_written.fetch_add(1, std::memory_order_relaxed);
  ctx_.counters.snapshot_version.store(info.version, std::memory_order_relaxed);
  last_snap_version_ = info.version;
  last_snap_generation_ = info.generation;
  last_snap_tables_ = info.tables;
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  char took[32];
  std::snprintf(took, sizeof(took), "%.3f", secs);
  LogEvent("snapshot (" + why + ") written: " + info.path + " (version " +
           std::to_string(info.version) + ", " + std::to_string(info.variables) + " variables, " +
           std::to_string(info.bytes) + " bytes" +
           (info.tables == 0
                ? std::string()
                : ", " + std::to_string(info.tables) + " tables (" +
                      std::to_string(info.full_images) + " full) in " + BaseName(info.table_file) +
                      ", " + std::to_string(info.table_rows) + " rows, " +
                      std::to_string(info.table_file_bytes) + " bytes") +
           ", " + took + " s)");
  std::vector<std::string> removed;
  if (Status p = storage::PruneSnapshots(o.snapshot_dir, o.snapshot_keep, &removed, info.path);
      !p.ok()) {
    LogEvent("removing old snapshots failed: " + p.ToString());
  }
  if (written != nullptr) *written = std::move(info);
  return Status::OK();
}

Status ServerImpl::Snapshot(std::string* path) {
  if (ctx_.options.snapshot_dir.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshots are off: start the server with a snapshot_dir");
  }
  std::lock_guard lock(snapshot_mu_);
  storage::WrittenSnapshot info;
  TS_RETURN_IF_ERROR(WriteSnapshotLocked("requested", 0, &info));
  if (path != nullptr) *path = info.path;
  return Status::OK();
}

Status ServerImpl::CheckTagged(const char* what, uint64_t tag) const {
  if (ctx_.options.snapshot_dir.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  std::string(what) +
                      ": this server has no snapshot directory; start it with --snapshot-dir "
                      "(ServerOptions::snapshot_dir)");
  }
  if (tag == 0) {
    return Status(StatusCode::kInvalidArgument,
                  std::string(what) + ": the tag must be >= 1 (0 marks untagged snapshots)");
  }
  return Status::OK();
}

Status ServerImpl::SnapshotTagged(uint64_t tag, std::string* name, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckTagged("snapshot", tag));
  std::lock_guard lock(snapshot_mu_);
  storage::WrittenSnapshot info;
  try {
    TS_RETURN_IF_ERROR(WriteSnapshotLocked("tag " + std::to_string(tag), tag, &info));
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kLimitExceeded, "snapshot: the server is out of memory");
  }
  *name = BaseName(info.path);
  *version = info.version;
  return Status::OK();
}

Status ServerImpl::ListSnapshots(std::vector<SnapshotInfo>* out) {
  const std::string& dir = ctx_.options.snapshot_dir;
  if (dir.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshots: this server has no snapshot directory; start it with "
                  "--snapshot-dir (ServerOptions::snapshot_dir)");
  }
  std::vector<storage::SnapshotFile> files;
  std::vector<std::string> skipped;
  {
    std::lock_guard lock(snapshot_mu_);  // no file is written or pruned meanwhile
    TS_RETURN_IF_ERROR(storage::ListValidSnapshots(dir, &files, &skipped));
  }
  for (const std::string& why : skipped) LogEvent("snapshots: not listing " + why);
  out->clear();
  const size_t n = std::min(files.size(), protocol::kMaxListedSnapshots);
  out->reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out->push_back({files[i].tag, files[i].version, BaseName(files[i].path)});
  }
  return Status::OK();
}

Status ServerImpl::RestoreTagged(uint64_t tag, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckTagged("restore", tag));
  const std::string& dir = ctx_.options.snapshot_dir;
  const std::string what = "restore snapshot tag " + std::to_string(tag);
  // No snapshot is written, and no file pruned, until the restore is done.
  std::lock_guard snap_lock(snapshot_mu_);
  // Refused early, before the file is read, and checked again below.
  TS_RETURN_IF_ERROR(ctx_.membership.CheckIdle(what, /*discard_round=*/false));
  storage::SnapshotData data;
  std::string chosen;
  std::vector<std::string> skipped;
  Status s;
  try {
    s = storage::LoadTaggedSnapshot(dir, tag, &data, &chosen, &skipped);
  } catch (const std::bad_alloc&) {
    s = Status(StatusCode::kLimitExceeded,
               "restore: the server has no memory to read the snapshot (it needs the model's "
               "size again while the current state is kept)");
  }
  for (const std::string& why : skipped) {
    LogEvent("restore: skipping " + why + (s.ok() ? "; falling back to an older snapshot" : ""));
  }
  TS_RETURN_IF_ERROR(s);
  // The tables are rebuilt before the swap, so that the swap cannot fail
  // half way (variables restored, tables not).
  std::vector<std::unique_ptr<storage::SparseTable>> tables;
  try {
    s = storage::BuildTables(std::move(data.tables), &tables);
  } catch (const std::bad_alloc&) {
    s = Status(StatusCode::kLimitExceeded, "restore: the server has no memory for the tables");
  }
  TS_RETURN_IF_ERROR(s.WithContext("restore from " + chosen));
  // Wait for the requests in flight; none starts until the state is swapped.
  // Polled: try_lock_for's pthread_rwlock_clockwrlock is invisible to
  // ThreadSanitizer, which then reports the swap as a race.
  std::unique_lock store_lock(ctx_.store_mu, std::defer_lock);
  const auto give_up = std::chrono::steady_clock::now() + kRestoreWait;
  while (!store_lock.try_lock() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!store_lock.owns_lock()) {
    return Status(StatusCode::kInvalidArgument,
                  "restore: requests kept using the model for " +
                      std::to_string(kRestoreWait.count()) +
                      " s; restore at a quiescent point (between Spark jobs)");
  }
  // JOIN needs store_mu: from here on no member can join until the swap is done.
  TS_RETURN_IF_ERROR(ctx_.membership.CheckIdle(what, /*discard_round=*/true));
  const uint64_t restored = data.version;
  const size_t variables = data.variables.size();
  try {
    s = ctx_.store.Replace(restored, data.default_optimizer, std::move(data.variables));
  } catch (const std::bad_alloc&) {
    s = Status(StatusCode::kLimitExceeded, "restore: the server ran out of memory");
  }
  TS_RETURN_IF_ERROR(s.WithContext("restore from " + chosen));
  const size_t table_count = tables.size();
  ctx_.tables.ReplaceAll(std::move(tables));
  table_chain_.files.clear();
  table_chain_.tables.clear();
  // The state is on disk: no snapshot until it changes (read before any
  // request can change it).
  last_snap_version_ = restored;
  last_snap_generation_ = ctx_.store.generation();
  last_snap_tables_ = ctx_.tables.size();
  store_lock.unlock();
  ctx_.counters.restores.fetch_add(1, std::memory_order_relaxed);
  LogEvent("restored from " + chosen + ": version " + std::to_string(restored) + ", " +
           std::to_string(variables) + " variables, " + std::to_string(table_count) +
           " tables (tag " + std::to_string(tag) + ")");
  // Newer files hold the history just left; kept, they would be "newest"
  // for resume_from, pruning and the next restore of a reused tag.
  std::vector<std::string> removed;
  Status r = storage::RemoveSnapshotsNewerThan(dir, restored, tag, &removed);
  for (const std::string& path : removed) LogEvent("restore: removed the newer " + path);
  if (!r.ok()) LogEvent("restore: removing newer snapshots failed: " + r.ToString());
  *version = restored;
  return Status::OK();
}

void ServerImpl::SnapshotLoop() {
  const ServerOptions& o = ctx_.options;
  const auto every = std::chrono::duration<double>(o.snapshot_every_s);
  std::unique_lock wait_lock(snap_wait_mu_);
  while (!snap_cv_.wait_for(wait_lock, kSnapshotCheck, [this] { return snap_stop_; })) {
    wait_lock.unlock();
    {
      std::lock_guard lock(snapshot_mu_);
      const auto now = std::chrono::steady_clock::now();
      const bool changed = ctx_.store.generation() != last_snap_generation_ ||
                           ctx_.tables.size() != last_snap_tables_;
      // The version only grows, and last_snap_version_ was read from it.
      const bool by_versions =
          o.snapshot_every_versions > 0 &&
          ctx_.store.version() - last_snap_version_ >= o.snapshot_every_versions;
      const bool by_time = o.snapshot_every_s > 0 && now - last_snap_time_ >= every;
      if (changed && (by_versions || by_time) && now >= snap_retry_after_) {
        Status st = WriteSnapshotLocked(by_versions ? "every_versions" : "every_s", 0, nullptr);
        if (!st.ok()) snap_retry_after_ = now + kSnapshotRetry;
        MarkHeapDirty();
      }
    }
    wait_lock.lock();
  }
}

Status ServerImpl::Start() {
  const ServerOptions& o = ctx_.options;
  if (o.secret.size() < 16) {
    return Status(StatusCode::kInvalidArgument,
                  "the server secret must be at least 16 bytes (got " +
                      std::to_string(o.secret.size()) + "); use a random per-run secret");
  }
  if (o.max_frame_bytes < 64) {
    return Status(StatusCode::kInvalidArgument, "max_frame_bytes must be at least 64");
  }
  if (!(o.io_timeout_s > 0) || !(o.handshake_timeout_s > 0)) {
    return Status(StatusCode::kInvalidArgument, "io_timeout_s and handshake_timeout_s must be > 0");
  }
  if (o.max_connections == 0 || o.max_pending_handshakes == 0 || o.max_pending_per_peer == 0) {
    return Status(StatusCode::kInvalidArgument,
                  "max_connections, max_pending_handshakes and max_pending_per_peer must be >= 1");
  }
  if (o.metrics_port < -1 || o.metrics_port > 65535) {
    return Status(StatusCode::kInvalidArgument,
                  "metrics_port must be -1 (off), 0 (any free port) or a port number (got " +
                      std::to_string(o.metrics_port) + ")");
  }
  if (o.update_threads > kMaxUpdateThreads) {
    return Status(StatusCode::kInvalidArgument, "update_threads must be 0 (one per core) to " +
                                                    std::to_string(kMaxUpdateThreads) + " (got " +
                                                    std::to_string(o.update_threads) + ")");
  }
  if (o.tls_cert_pem.empty() != o.tls_key_pem.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "TLS needs both tls_cert_pem and tls_key_pem (or neither, for plain frames)");
  }
  if (!o.tls_cert_pem.empty()) {
    TS_RETURN_IF_ERROR(net::TlsContext::ForServer(o.tls_cert_pem, o.tls_key_pem, &ctx_.tls));
  }
  const size_t threads =
      o.update_threads != 0 ? o.update_threads : std::max(1u, std::thread::hardware_concurrency());
  TS_RETURN_IF_ERROR(ctx_.update_pool.Start(threads));
  TS_RETURN_IF_ERROR(StartSnapshots());
  TS_RETURN_IF_ERROR(net::Listen(o.bind_address, o.port, &listener_, &port_));
  if (!o.unix_path.empty()) TS_RETURN_IF_ERROR(net::ListenUnix(o.unix_path, &unix_listener_));
  if (o.metrics_port >= 0) {
    TS_RETURN_IF_ERROR(server::MetricsHttpServer::Start(
        o.bind_address, static_cast<uint16_t>(o.metrics_port),
        [this] { return server::RenderPrometheus(ctx_.Snapshot()); }, &metrics_));
  }
  TS_RETURN_IF_ERROR(ctx_.membership.Start());
  ctx_.request_shutdown = [this] { RequestShutdown(); };
  ctx_.snapshots.snapshot = [this](uint64_t tag, std::string* name, uint64_t* version) {
    return SnapshotTagged(tag, name, version);
  };
  ctx_.snapshots.list = [this](std::vector<SnapshotInfo>* out) { return ListSnapshots(out); };
  ctx_.snapshots.restore = [this](uint64_t tag, uint64_t* version) {
    return RestoreTagged(tag, version);
  };
  try {
    acceptor_ = std::thread([this] { AcceptLoop(&listener_); });
    if (unix_listener_.valid()) {
      unix_acceptor_ = std::thread([this] { AcceptLoop(&unix_listener_); });
    }
    if (o.snapshot_every_s > 0 || o.snapshot_every_versions > 0) {
      snapshot_thread_ = std::thread([this] { SnapshotLoop(); });
    }
  } catch (const std::system_error& e) {
    return Status(StatusCode::kInternal,
                  std::string("cannot start the acceptor or snapshot thread: ") + e.what());
  }
  started_ = true;
  return Status::OK();
}

void ServerImpl::RequestShutdown() {
  {
    std::lock_guard lock(state_mu_);
    stop_requested_ = true;
  }
  state_cv_.notify_all();
}

void ServerImpl::Refuse(net::Socket sock, const std::string& peer, const Status& why) {
  ctx_.refused_log.Event("refused connection from " + peer + ": " + why.ToString());
  if (why.code() == StatusCode::kLimitExceeded)
    ctx_.membership.CountRefused(server::RefuseReason::kLimit);
  ctx_.counters.errors.fetch_add(1, std::memory_order_relaxed);
  std::vector<uint8_t> payload;
  protocol::EncodeError(why, &payload);
  protocol::FrameHeader h;  // opcode 0, request_id 0: not an answer to any request
  h.flags = protocol::kFlagResponse | protocol::kFlagError;
  h.payload_len = payload.size();
  h.checksum = protocol::Crc32c(payload.data(), payload.size());
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(h, raw);
  struct iovec iov[2] = {{raw, sizeof(raw)}, {payload.data(), payload.size()}};
  // A fresh socket has room for this; the short deadline guards the acceptor.
  (void)net::WriteV(sock.fd(), iov, 2, net::Deadline::In(0.5));
  // Discard what the peer already sent (usually its HELLO): closing with
  // unread data would send a reset, which can destroy the error frame
  // before the peer reads it.
  uint8_t scratch[4096];
  while (::recv(sock.fd(), scratch, sizeof(scratch), MSG_DONTWAIT) > 0) {
  }
}

namespace {
// The address part of "ip:port" / "[ip6]:port" (a Unix peer is one name).
std::string_view PeerHost(std::string_view peer) {
  const size_t colon = peer.rfind(':');
  return colon == std::string_view::npos ? peer : peer.substr(0, colon);
}
}  // namespace

void ServerImpl::EvictPendingFor(const std::string& peer) {
  const std::string_view host = PeerHost(peer);
  std::lock_guard lock(conns_mu_);
  uint64_t pending = 0, same_host = 0;
  struct Candidate {
    Connection* conn = nullptr;
    bool progressed = false;  // its HELLO was read or waits unread
  };
  Candidate victim_any, victim_host;
  // Least progress first (nothing sent: an idle stranger), then the oldest.
  auto better = [](const Candidate& a, const Candidate& b) {
    if (b.conn == nullptr) return true;
    if (a.progressed != b.progressed) return !a.progressed;
    return a.conn->accepted_at() < b.conn->accepted_at();
  };
  for (ConnEntry& e : conns_) {
    Connection* c = e.conn.get();
    if (c->done() || c->shut_down() || c->stage() == Connection::kAuthenticated) continue;
    ++pending;
    const bool same = PeerHost(c->peer()) == host;
    if (same) ++same_host;
    // conns_ is in accept order: once the oldest idle candidate is found,
    // later ones cannot beat it and need no peek at their sockets.
    const bool any_found = victim_any.conn != nullptr && !victim_any.progressed;
    const bool host_found = !same || (victim_host.conn != nullptr && !victim_host.progressed);
    if (any_found && host_found) continue;
    Candidate cand{c, c->stage() >= Connection::kHelloRead || c->PeerSentData()};
    if (!any_found && better(cand, victim_any)) victim_any = cand;
    if (same && better(cand, victim_host)) victim_host = cand;
  }
  Connection* victim = nullptr;
  const char* cap = nullptr;
  if (same_host >= ctx_.options.max_pending_per_peer) {
    victim = victim_host.conn;
    cap = "max_pending_per_peer";
  } else if (pending >= ctx_.options.max_pending_handshakes) {
    victim = victim_any.conn;
    cap = "max_pending_handshakes";
  }
  if (victim == nullptr) return;
  ctx_.membership.CountRefused(server::RefuseReason::kEvicted);
  ctx_.refused_log.Event("dropped connection from " + victim->peer() +
                         " in its handshake to admit one from " + peer + " (" + cap + ")");
  victim->Shutdown();  // its thread wakes, closes it and ends
}

void ServerImpl::ReapFinished() {
  std::list<ConnEntry> finished;
  {
    std::lock_guard lock(conns_mu_);
    for (auto it = conns_.begin(); it != conns_.end();) {
      if (it->conn->done()) {
        auto next = std::next(it);
        finished.splice(finished.end(), conns_, it);
        it = next;
      } else {
        ++it;
      }
    }
  }
  for (ConnEntry& e : finished) e.thread.join();
  if (!finished.empty()) MarkHeapDirty();
}

void ServerImpl::MarkHeapDirty() {
  std::lock_guard lock(trim_mu_);
  heap_dirty_ = true;
  dirtied_at_ = std::chrono::steady_clock::now();
}

void ServerImpl::TrimWhenIdle() {
#if defined(__GLIBC__)
  constexpr double kTrimIdleS = 0.5;
  std::lock_guard lock(trim_mu_);
  if (!heap_dirty_ || ctx_.counters.connections.load() != 0) return;
  if (std::chrono::duration<double>(std::chrono::steady_clock::now() - dirtied_at_).count() <
      kTrimIdleS) {
    return;
  }
  heap_dirty_ = false;
  ::malloc_trim(0);
#endif
}

void ServerImpl::AcceptLoop(const net::Socket* listener) {
  while (!ctx_.stopping.load()) {
    net::Socket sock;
    std::string peer;
    // Bounded wait so `stopping` is seen even if shutdown() of the listening
    // socket does not wake poll().
    Status s = net::Accept(*listener, net::Deadline::In(0.2), &sock, &peer);
    if (ctx_.stopping.load()) break;
    ReapFinished();
    TrimWhenIdle();
    ctx_.handshake_log.Flush();
    ctx_.refused_log.Flush();
    if (!s.ok()) {
      if (s.code() != StatusCode::kTimeout) {
        LogEvent("accept failed: " + s.message());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // e.g. out of fds
      }
      continue;
    }
    bool shutting_down;
    {
      std::lock_guard lock(state_mu_);
      shutting_down = stop_requested_;
    }
    if (shutting_down) {
      Refuse(std::move(sock), peer,
             Status(StatusCode::kShuttingDown, "the parameter server is shutting down"));
      continue;
    }
    EvictPendingFor(peer);
    auto conn = std::make_unique<Connection>(&ctx_, std::move(sock), peer);
    Connection* raw = conn.get();
    ctx_.counters.connections.fetch_add(1, std::memory_order_relaxed);
    ctx_.counters.connections_total.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(conns_mu_);
    try {
      conns_.push_back(ConnEntry{std::move(conn), std::thread([raw] { raw->Run(); })});
    } catch (const std::system_error& e) {
      // No thread: Run() never decrements; undo here. `conn` was moved into
      // a ConnEntry that was not inserted and is destroyed with the socket.
      ctx_.counters.connections.fetch_sub(1, std::memory_order_relaxed);
      LogEvent("cannot start a thread for " + peer + ": " + e.what());
    }
  }
}

void ServerImpl::Stop() {
  std::lock_guard call_lock(stop_call_mu_);
  {
    std::lock_guard lock(state_mu_);
    if (stopped_) return;
  }
  ctx_.stopping.store(true);
  // Wakes waiting pulls and pushes with kShuttingDown and lets them send
  // that answer (bounded) before the sockets are shut down.
  ctx_.membership.Stop(/*drain_s=*/2.0);
  if (metrics_) metrics_->Stop();
  listener_.Shutdown();
  // (Not shutdown(): a shut-down Unix listener polls readable forever; the
  // acceptor's bounded wait sees `stopping` instead.)
  if (acceptor_.joinable()) acceptor_.join();
  if (unix_acceptor_.joinable()) unix_acceptor_.join();
  listener_.Close();
  if (unix_listener_.valid()) {
    unix_listener_.Close();
    ::unlink(ctx_.options.unix_path.c_str());
  }
  std::list<ConnEntry> conns;
  {
    std::lock_guard lock(conns_mu_);
    for (ConnEntry& e : conns_) e.conn->Shutdown();
    conns.swap(conns_);
  }
  for (ConnEntry& e : conns) e.thread.join();
  // Every connection is gone: the final snapshot holds every applied push.
  {
    std::lock_guard lock(snap_wait_mu_);
    snap_stop_ = true;
  }
  snap_cv_.notify_all();
  if (snapshot_thread_.joinable()) snapshot_thread_.join();
  if (started_ && !ctx_.options.snapshot_dir.empty()) {
    std::lock_guard lock(snapshot_mu_);
    if (ctx_.store.generation() != last_snap_generation_ || ctx_.tables.size() != last_snap_tables_)
      (void)WriteSnapshotLocked("final", 0, nullptr);
  }
  {
    std::lock_guard lock(state_mu_);
    stopped_ = true;
  }
  state_cv_.notify_all();
}

bool ServerImpl::WaitUntilStopped(double timeout_s) {
  std::unique_lock lock(state_mu_);
  auto done = [this] { return stopped_ || stop_requested_; };
  if (timeout_s < 0) {
    state_cv_.wait(lock, done);
    return true;
  }
  return state_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), done);
}

// ---- Server -----------------------------------------------------------------

Status Server::Start(const ServerOptions& options, std::unique_ptr<Server>* out) {
  auto impl = std::make_unique<ServerImpl>(options);
  TS_RETURN_IF_ERROR(impl->Start());
  out->reset(new Server(std::move(impl)));
  return Status::OK();
}

Server::Server(std::unique_ptr<ServerImpl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;  // ~ServerImpl stops
uint16_t Server::port() const { return impl_->port(); }
int Server::metrics_port() const { return impl_->metrics_port(); }
uint64_t Server::version() const { return impl_->version(); }
std::vector<StatEntry> Server::Stats() const { return impl_->Stats(); }
Status Server::Snapshot(std::string* path) { return impl_->Snapshot(path); }
void Server::Stop() { impl_->Stop(); }
bool Server::WaitUntilStopped(double timeout_s) { return impl_->WaitUntilStopped(timeout_s); }

}  // namespace tensorspark
