// The tensorspark parameter server.
//
// Threading: one acceptor thread plus one thread per connection, each doing
// blocking I/O on its own socket. Variables live in a store where each
// tensor is one contiguous buffer guarded by its own reader/writer lock, so
// pushes to different variables and pulls of the same variable run in
// parallel. Large tensors are updated by a small pool of update threads in
// chunks (ServerOptions::update_threads). Server methods are thread-safe.
//
//   tensorspark::ServerOptions opt;
//   opt.port = 0;                 // pick a free port
//   opt.secret = run_secret;
//   std::unique_ptr<tensorspark::Server> server;
//   TS_RETURN_IF_ERROR(tensorspark::Server::Start(opt, &server));
//   std::printf("listening on %u\n", server->port());
//   server->WaitUntilStopped(-1);  // until Stop() or a client's shutdown call
//
// Snapshots (docs/snapshots.md): with snapshot_dir set the server writes
// its variables, optimizer state and version to checksummed files there,
// when due, on Snapshot() and on Stop(); resume_from starts a server from
// one of them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark {

struct ServerOptions {
  // Address to listen on ("0.0.0.0" for every interface, "127.0.0.1" for
  // this host only) and port (0 picks a free one).
  std::string bind_address = "0.0.0.0";
  uint16_t port = 0;
  // When set, the server also listens on this Unix-domain socket path
  // (clients on this host connect with host "unix:/path"; same protocol and
  // handshake). The socket file gets mode 0600; a stale one left by a
  // crashed server is replaced, a live one is kAddressInUse; it is removed
  // on Stop(). At most 107 bytes (the kernel's sun_path limit).
  std::string unix_path;
  // Per-run shared secret (raw bytes, required, at least 16 bytes).
  std::string secret;
  // TLS (tensorspark/tls.h): with both set, every connection, TCP and Unix
  // alike, must open with a TLS 1.3 handshake, and frames travel encrypted;
  // a plain client is refused with kAuthFailed saying so. PEM text of the
  // certificate and of its unencrypted private key; empty: plain frames.
  std::string tls_cert_pem;
  std::string tls_key_pem;
  // Frames with a larger payload are refused with kFrameTooLarge.
  uint64_t max_frame_bytes = uint64_t{1} << 31;
  // Limits that protect the server's memory.
  uint64_t max_variables = 1 << 16;
  // Authenticated connections; more are refused (kLimitExceeded) after
  // their handshake. Connections still in their handshake are bounded
  // apart, so strangers cannot use up this limit: at most
  // max_pending_handshakes in all and max_pending_per_peer from one address
  // (IP; all Unix-socket peers count as one). A new connection over either
  // cap evicts a pending one (of that address for the second): one that
  // has sent no HELLO yet before one that has, the oldest first.
  uint64_t max_connections = 1024;
  uint64_t max_pending_handshakes = 128;
  uint64_t max_pending_per_peer = 32;
  // A frame whose bytes stop arriving for this long is dropped; the
  // handshake must finish within handshake_timeout_s.
  double io_timeout_s = 120.0;
  double handshake_timeout_s = 10.0;
  // Threads that apply one large push together (the connection's own thread
  // included), splitting tensors of 1M+ elements into chunks; 0 means
  // std::thread::hardware_concurrency(), 1 applies every push on the
  // connection's thread. At most 1024.
  uint32_t update_threads = 0;
  // Port of the Prometheus endpoint (GET /metrics on bind_address): -1 (the
  // default) serves none, 0 picks a free port.
  int metrics_port = -1;

  // ---- snapshots (docs/snapshots.md) ----
  // Directory of the snapshot files (created if missing); empty: no
  // snapshots. One server per directory.
  std::string snapshot_dir;
  // A background thread writes a snapshot when the model changed and this
  // many seconds passed since the last one (0: off; finite, >= 0) ...
  double snapshot_every_s = 0;
  // ... or when the version grew by this many pushes since the last one
  // (0: off). Either needs snapshot_dir. With snapshot_dir set, Stop()
  // writes a final snapshot if the model changed since the last one.
  uint64_t snapshot_every_versions = 0;
  // Snapshot files kept in snapshot_dir: older ones are deleted after a new
  // one is written. 0 keeps all.
  uint64_t snapshot_keep = 3;
  // Start from a snapshot: a snapshot file, or a directory whose newest
  // valid snapshot is used (newer corrupt or truncated ones are skipped and
  // logged, naming the file and the fault). The server starts with its
  // variables, optimizer state and version; pushes count on from it.
  // Start() fails with kNotFound when the path or any snapshot file is
  // missing and kInvalidArgument when no snapshot is valid. Empty: start
  // empty.
  std::string resume_from;
};

class ServerImpl;

class Server {
 public:
  // Binds, listens and starts serving. Fails with kAddressInUse when the
  // port is taken and kInvalidArgument on bad options.
  static Status Start(const ServerOptions& options, std::unique_ptr<Server>* out);

  ~Server();  // Stop()s
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The port actually bound (useful with port 0).
  uint16_t port() const;

  // Port of the Prometheus endpoint, or -1 when it is off.
  int metrics_port() const;

  // Model version: the number of pushes applied so far.
  uint64_t version() const;

  // Current counters (the same ones the protocol's stats call returns).
  std::vector<StatEntry> Stats() const;

  // Writes a snapshot now (also while the background thread is on) and
  // sets *path (may be null) to its file. kInvalidArgument when
  // snapshot_dir is empty; a failed write returns its error (naming the
  // file), is logged and counted in snapshot_errors, and leaves the server
  // serving. Thread-safe; snapshots are written one at a time.
  Status Snapshot(std::string* path);

  // Stops accepting, closes every connection and joins all threads, then
  // writes the final snapshot (when snapshot_dir is set and the model
  // changed since the last one). Idempotent; safe from any thread except a
  // connection thread.
  void Stop();

  // Blocks until the server has stopped (by Stop() or a client's shutdown
  // request) or timeout_s passes (negative: no limit). True if stopped.
  bool WaitUntilStopped(double timeout_s);

 private:
  explicit Server(std::unique_ptr<ServerImpl> impl);
  std::unique_ptr<ServerImpl> impl_;
};

}  // namespace tensorspark
