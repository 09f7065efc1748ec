// Server side of one client connection (wire protocol v1).
//
// Each Connection runs on its own thread (Run), doing blocking I/O with
// deadlines on its socket. Other threads may only call Shutdown() and
// done(). Nothing here throws or aborts: any failure ends this connection
// only.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "net/stream.h"
#include "protocol/frame.h"
#include "server/membership.h"
#include "storage/param_store.h"
#include "storage/sparse_table.h"
#include "tensorspark/server.h"
#include "tensorspark/status.h"

namespace tensorspark::server {

// Counters of docs/protocol.md "STATS" (relaxed atomics: they are reports,
// not synchronization).
struct ServerCounters {
  std::atomic<uint64_t> connections{0};
  std::atomic<uint64_t> connections_total{0};
  // Connections past the handshake (max_connections bounds these only).
  std::atomic<uint64_t> authenticated{0};
  std::atomic<uint64_t> pushes{0};
  std::atomic<uint64_t> pulls{0};
  std::atomic<uint64_t> registers{0};
  std::atomic<uint64_t> bytes_in{0};
  std::atomic<uint64_t> bytes_out{0};
  std::atomic<uint64_t> errors{0};
  std::atomic<uint64_t> auth_failures{0};
  // Snapshots (docs/snapshots.md): files written, failed attempts, the
  // version of the last one written and the version resumed from.
  std::atomic<uint64_t> snapshots_written{0};
  std::atomic<uint64_t> snapshot_errors{0};
  std::atomic<uint64_t> snapshot_version{0};
  std::atomic<uint64_t> resumed_version{0};
  std::atomic<uint64_t> restores{0};    // RESTOREs applied
  std::atomic<uint64_t> row_pushes{0};  // PUSH_ROWS frames applied
  // Open connections that negotiated kOptionNoChecksum in HELLO.
  std::atomic<uint64_t> connections_unchecked{0};
};

// The server's side of SNAPSHOT, SNAPSHOTS and RESTORE (ServerImpl), which
// serializes them with its own snapshot writes. Each returns the error to
// answer with.
struct SnapshotService {
  // Writes a snapshot tagged `tag` (>= 1); `name` is its file name.
  std::function<Status(uint64_t tag, std::string* name, uint64_t* version)> snapshot;
  // The valid snapshot files, newest first.
  std::function<Status(std::vector<SnapshotInfo>* files)> list;
  // Replaces the store's state by the newest valid snapshot tagged `tag`.
  // Takes ServerContext::store_mu exclusively: the caller must not hold it.
  std::function<Status(uint64_t tag, uint64_t* version)> restore;
};

// State shared by the server and all its connections; outlives them.
// At most one log line per `period_s` for a noisy kind of event (strangers'
// failed handshakes, refused connections): the first at once, the rest
// summed up ("N more ... in the last 10 s"), so a flood cannot flood the
// log. Thread-safe.
class LogThrottle {
 public:
  explicit LogThrottle(std::string what, double period_s = 10.0)
      : what_(std::move(what)), period_s_(period_s) {}
  void Event(const std::string& message);
  // Logs the summary of a window that has ended; the acceptor calls it
  // between accepts, so a flood that stops is still reported.
  void Flush();

 private:
  void FlushLocked(std::chrono::steady_clock::time_point now);

  const std::string what_;
  const double period_s_;
  std::mutex mu_;  // guards the fields below
  std::chrono::steady_clock::time_point window_start_{};
  bool window_open_ = false;
  uint64_t suppressed_ = 0;
  std::string latest_;
};

struct ServerContext {
  explicit ServerContext(const ServerOptions& o)
      : options(o), store(o.max_variables, &update_pool), membership(&store) {}

  const ServerOptions options;
  // Applies large updates in chunks; started by the server (before any
  // connection), declared before `store`, which uses it.
  ThreadPool update_pool;
  storage::ParamStore store;
  // Sparse embedding tables (opcodes 19-23); a row push moves store's
  // version on like a dense push.
  storage::TableStore tables;
  // Members, modes and their waits (docs/consistency.md).
  Membership membership;
  ServerCounters counters;
  std::atomic<uint64_t> next_conn_id{1};
  std::atomic<bool> stopping{false};
  // Called by a connection after it answered SHUTDOWN; must not block.
  std::function<void()> request_shutdown;
  // Set by the server before any connection starts.
  SnapshotService snapshots;
  // RESTORE destroys the store's variables: every request that may use a
  // Variable pointer runs holding this shared (Dispatch), and RESTORE
  // swaps the state holding it exclusively. (SNAPSHOT and SNAPSHOTS
  // serialize with RESTORE on the server's snapshot lock instead.)
  std::shared_mutex store_mu;
  // Handshakes that failed or timed out, and connections refused at accept.
  LogThrottle handshake_log{"failed handshakes"};
  LogThrottle refused_log{"refused connections"};

  // Set when the server speaks TLS only (ServerOptions::tls_cert_pem).
  std::shared_ptr<net::TlsContext> tls;

  std::vector<StatEntry> Snapshot() const;
};

// "[tensorspark-ps] <message>" on stderr, one line.
void LogEvent(const std::string& message);

class Connection {
 public:
  Connection(ServerContext* ctx, net::Socket socket, std::string peer);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Serves the connection until the peer leaves, a fatal protocol error, or
  // Shutdown(). Closes the socket before returning.
  void Run();

  // Wakes Run() from any blocking wait so it returns soon. Thread-safe.
  void Shutdown();

  bool done() const { return done_.load(std::memory_order_acquire); }

  // How far the handshake got (any thread): the acceptor evicts pending
  // connections that made the least progress first.
  enum Stage : int { kAccepted = 0, kHelloRead = 1, kAuthenticated = 2 };
  Stage stage() const { return static_cast<Stage>(stage_.load(std::memory_order_acquire)); }
  const std::string& peer() const { return peer_; }
  bool shut_down() const { return shut_.load(std::memory_order_acquire); }
  // True when bytes from the peer wait unread (a HELLO this connection's
  // thread has not read yet). Thread-safe.
  bool PeerSentData();
  std::chrono::steady_clock::time_point accepted_at() const { return accepted_at_; }

 private:
  // The TLS handshake (ServerContext::tls set), within `deadline`.
  Status StartTls(net::Deadline deadline);
  // Reads one frame (header + payload into payload_) and applies the
  // receive checks of the protocol in order. A non-OK result means the
  // connection must close; any error frame the protocol asks for has been
  // sent. `peer_left` is set when the peer closed before a new frame.
  [[nodiscard]] Status ReceiveFrame(net::Deadline header_deadline, uint64_t max_payload,
                                    protocol::FrameHeader* h, bool* peer_left);
  [[nodiscard]] Status Handshake();
  // Handles one authenticated request; non-OK means close.
  [[nodiscard]] Status Dispatch(const protocol::FrameHeader& h);

  // Each returns the error to answer with (the connection stays open), or
  // OK after sending its response; a failed send is recorded in io_status_.
  [[nodiscard]] Status HandleRegister(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandleList(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandlePull(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandlePush(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandleStats(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandleSetOptimizer(const protocol::FrameHeader& h);
  // JOIN, LEAVE, HEARTBEAT and CONFIGURE.
  [[nodiscard]] Status HandleMembership(const protocol::FrameHeader& h);
  // REPORT (a member's stack dump) and REPORTS (every live member's).
  [[nodiscard]] Status HandleReport(const protocol::FrameHeader& h);
  // SNAPSHOT, SNAPSHOTS and RESTORE (through ServerContext::snapshots).
  [[nodiscard]] Status HandleSnapshot(const protocol::FrameHeader& h);
  // Sparse tables: TABLE_CREATE, PULL_ROWS, PUSH_ROWS, EXPORT_ROWS,
  // LIST_TABLES. Rows are read and applied at once in every consistency
  // mode (sync rounds and staleness waits govern dense variables only).
  [[nodiscard]] Status HandleTableCreate(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandlePullRows(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandlePushRows(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandleExportRows(const protocol::FrameHeader& h);
  [[nodiscard]] Status HandleListTables(const protocol::FrameHeader& h);

  // Send failures are also recorded in io_status_ (the connection closes).
  [[nodiscard]] Status SendResponse(const protocol::FrameHeader& req, uint32_t flags,
                                    const std::vector<uint8_t>& payload);
  [[nodiscard]] Status SendError(const protocol::FrameHeader& req, const Status& error);
  net::Deadline IoDeadline() const;
  // Reallocates buf_ to `capacity` bytes keeping its first `keep` bytes;
  // false when memory is short.
  bool Grow(uint64_t capacity, uint64_t keep);
  // Moves the payload so that its byte `offset` is kAlign-aligned (see buf_).
  void AlignPayloadAt(size_t offset);
  // Decodes an fp16/bf16 data section (`flags`) of n elements at payload
  // offset `offset` into decoded_; false when memory is short.
  bool DecodeSection(uint32_t flags, size_t offset, uint64_t n);
  // Sends an fp16/bf16 PULL response: head (out_) then the variables'
  // values encoded into encoded_ under `locks` (taken by the caller), which
  // are released before the send: the bytes sent are a copy.
  [[nodiscard]] Status SendEncodedPull(const protocol::FrameHeader& req,
                                       std::span<storage::Variable* const> vars,
                                       std::vector<std::shared_lock<std::shared_mutex>>* locks);
  const uint8_t* payload() const { return buf_.get() + shift_; }
  std::span<const uint8_t> payload_span() const { return {payload(), payload_len_}; }

  ServerContext* const ctx_;
  const std::string peer_;
  std::string who_;       // peer plus partition/attempt once known, for logs
  Session session_;       // identity for the membership registry
  net::Stream stream_;    // plain, or TLS once the handshake starts
  std::mutex socket_mu_;  // orders Shutdown() against the final close in Run()
  std::atomic<bool> done_{false};
  std::atomic<int> stage_{kAccepted};
  std::atomic<bool> shut_{false};  // Shutdown() was called
  const std::chrono::steady_clock::time_point accepted_at_ = std::chrono::steady_clock::now();

  // Request payloads are read into buf_ at offset shift_, chosen so that the
  // data section of a PUSH is 16-byte aligned: it is remembered from the
  // previous PUSH (a training loop repeats the same metas), so the payload
  // is moved only when the layout changes. buf_ only grows, so reuse costs
  // no allocation or zeroing.
  std::unique_ptr<uint8_t[]> buf_;
  uint64_t cap_ = 0;
  size_t shift_ = 0;
  uint64_t payload_len_ = 0;
  std::vector<uint8_t> out_;  // reusable response buffer
  // fp16/bf16 wire encodings: float32 values of an encoded REGISTER/PUSH,
  // and the encoded data section of a PULL response (reused, grow only).
  std::vector<float> decoded_;
  std::vector<uint16_t> encoded_;
  // Aligned copies of a row request's ids and (when unaligned) values.
  std::vector<int64_t> ids_;
  std::vector<float> values_;
  Status io_status_;  // first send failure; ends the connection
  // CRC-32C on this connection's frames: the handshake's always, later ones
  // unless the client asked for kOptionNoChecksum in HELLO (written once,
  // by this connection's thread, before the first request).
  bool checksums_ = true;
};

}  // namespace tensorspark::server
