// Client of the tensorspark parameter server.
//
// A Client holds one persistent, authenticated connection. Calls are
// blocking and not thread-safe (except ReportProgress and SetDumpFile): use
// one Client per thread (or guard it).
// Every call has a deadline (ClientOptions::io_timeout_s) and returns a
// Status; nothing here throws or aborts.
//
//   tensorspark::ClientOptions opt;
//   opt.host = "10.0.0.5"; opt.port = 10080; opt.secret = run_secret;
//   opt.partition_id = 3; opt.attempt = 0;
//   std::unique_ptr<tensorspark::Client> c;
//   TS_RETURN_IF_ERROR(tensorspark::Client::Connect(opt, &c));
//   std::vector<float> w(784 * 10);
//   tensorspark::MutableTensorView view{"W", w};
//   uint64_t version = 0;
//   TS_RETURN_IF_ERROR(c->Pull({&view, 1}, &version));
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorspark/status.h"
#include "tensorspark/tables.h"
#include "tensorspark/types.h"

namespace tensorspark {

// Whether a connection's frames carry a CRC-32C of their payload
// (docs/protocol.md, "Connection options").
enum class ChecksumMode {
  // On over plain TCP; off on a Unix socket (the kernel copies memory to
  // memory) and under TLS (every record carries an AEAD tag).
  kAuto,
  kOn,
  // Off on any transport; with a server too old to negotiate it, on.
  kOff,
};

struct ClientOptions {
  // Server host name or address, or "unix:/path/to.sock" for a Unix-domain
  // socket on this host (ServerOptions::unix_path; `port` is then ignored).
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  // Per-run shared secret (raw bytes). Proven by challenge-response; it never
  // crosses the wire.
  std::string secret;
  // TLS (tensorspark/tls.h): when set, the connection opens with a TLS 1.3
  // handshake and is kept only if the server's certificate has one of these
  // SHA-256 fingerprints ("sha256:<hex>", as the server prints it); a
  // mismatch is kAuthFailed. Empty: plain frames.
  std::vector<std::string> tls_fingerprints;
  // Identity of the worker: the Spark partition id and task attempt number
  // (-1 for the driver or a tool).
  int32_t partition_id = -1;
  int32_t attempt = 0;
  // Total time allowed for connecting, retries and backoff included.
  double connect_timeout_s = 10.0;
  // Limit for any single blocking read or write after connecting.
  double io_timeout_s = 120.0;
  // Connection attempts and the exponential backoff between them.
  int max_retries = 8;
  double initial_backoff_s = 0.05;
  double max_backoff_s = 2.0;
  // Largest response frame accepted.
  uint64_t max_frame_bytes = uint64_t{1} << 32;
  // Encoding of the tensor values of Push and Pull/PullAll (see
  // WireEncoding for the precision of each). Register always sends float32,
  // so initial values are exact.
  WireEncoding encoding = WireEncoding::kFloat32;
  // After Join, a pull or push may wait on the server for other workers
  // (sync and bounded-staleness modes; the server bounds it by the run's
  // wait_timeout_s), so a joined client allows each round trip
  // io_timeout_s + member_wait_s. Keep it >= the run's wait_timeout_s.
  double member_wait_s = 600.0;
  // > 0: after Join, a background thread with its own connection (same
  // identity) sends HEARTBEAT every this many seconds, keeping the member
  // live during long local work and carrying the latest ReportProgress
  // values; Leave, Close and the destructor stop it.
  // 0 (default): no heartbeat thread.
  double heartbeat_interval_s = 0.0;
  // CRC-32C of each frame's payload, negotiated in HELLO; it takes effect
  // after the handshake, whose frames are always checksummed.
  ChecksumMode checksums = ChecksumMode::kAuto;
};

// A variable to register: its name, shape and initial value.
struct VariableSpec {
  std::string_view name;
  std::span<const int64_t> shape;
  std::span<const float> initial;  // product of shape elements
};

// The rows of one table to pull (Client::PullRows): `out` receives
// ids.size() * dim floats, row i at out[i * dim]; the socket writes into it.
struct RowsRequest {
  std::string_view table;
  std::span<const int64_t> ids;  // duplicates allowed
  std::span<float> out;
};

// Row updates for one table (Client::PushRows): `values` holds
// ids.size() * dim floats, row i at values[i * dim].
struct RowsUpdate {
  std::string_view table;
  uint32_t dim = 0;              // must equal the table's dim on the server
  std::span<const int64_t> ids;  // unique within one update
  std::span<const float> values;
};

class ClientImpl;

class Client {
 public:
  // Connects, retrying with exponential backoff until connect_timeout_s, then
  // runs the handshake. Fails with kAuthFailed on a wrong secret and
  // kConnectionError / kTimeout when the server cannot be reached.
  static Status Connect(const ClientOptions& options, std::unique_ptr<Client>* out);

  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Registers variables. The first registration of a name wins: a later one
  // with the same shape keeps the server's values (created[i] == false), one
  // with another shape fails with kShapeMismatch and registers nothing.
  Status Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                  uint64_t* version);

  // Names, types and shapes of all variables, and the model version.
  Status ListVariables(std::vector<VariableInfo>* out, uint64_t* version);

  // Pulls the named variables straight into the caller's buffers (the
  // socket writes into them; no intermediate copy). Each view's size must
  // equal the variable's element count. The buffers must outlive the call.
  Status Pull(std::span<const MutableTensorView> out, uint64_t* version);

  // Pulls every variable into newly allocated tensors.
  Status PullAll(std::vector<Tensor>* out, uint64_t* version);

  // Pushes values of the given kind; the server checks every name and shape
  // before applying any of them. Data is sent from the caller's buffers
  // without copying. `version` receives the model version after the push.
  Status Push(UpdateKind kind, std::span<const TensorView> tensors, const PushOptions& options,
              uint64_t* version);

  // Sets the server-side optimizer that gradient pushes (UpdateKind::
  // kGradient) to the named variables apply from now on; with no names, of
  // every variable, including ones registered later. Changing only the
  // learning rate keeps the optimizer's slots (its moments, accumulators);
  // changing the kind or betas resets them. A push's learning_rate > 0
  // overrides the configured one for that push. Fails with
  // kInvalidArgument on a bad config and kNotFound on an unknown name, and
  // then changes nothing. `version` (may be null) receives the model
  // version, which this call does not change.
  //
  //   tensorspark::OptimizerConfig adam;
  //   adam.kind = tensorspark::OptimizerKind::kAdam;
  //   adam.learning_rate = 1e-3f;
  //   TS_RETURN_IF_ERROR(c->SetOptimizer(adam, {}, nullptr));  // every variable
  //   adam.learning_rate = 1e-4f;                               // decay: slots kept
  //   std::string_view only[] = {"dense/kernel"};
  //   TS_RETURN_IF_ERROR(c->SetOptimizer(adam, only, nullptr));
  Status SetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                      uint64_t* version);

  // ---- membership and consistency modes (docs/consistency.md) ----
  // Joins the run as a worker (the connection's partition id must be >= 0).
  // `clock` (may be null) receives the worker's starting clock. Fails with
  // kFenced when a newer attempt of this partition has joined. Starts the
  // heartbeat thread when ClientOptions::heartbeat_interval_s > 0.
  Status Join(uint64_t* clock);
  // Leaves the run: the server stops waiting for this worker. Stops the
  // heartbeat thread.
  Status Leave();
  // Tells the server this worker is alive (any request does too), with the
  // latest ReportProgress values if there are any.
  Status Heartbeat();
  // Stores this worker's progress for the next heartbeat (the background
  // thread's or Heartbeat()): steps and samples done so far and the latest
  // loss (NaN = unknown). No I/O; unlike the other calls it is thread-safe,
  // so a training callback may call it while another thread pushes. The
  // server shows it in STATS as worker_steps, worker_samples,
  // worker_loss_f64 and worker_progress_age_ms (time since steps last
  // increased), for a progress bar or a hang watchdog.
  //
  //   opt.heartbeat_interval_s = 5;  // the beats carry the reports
  //   TS_RETURN_IF_ERROR(tensorspark::Client::Connect(opt, &c));
  //   TS_RETURN_IF_ERROR(c->Join(nullptr));
  //   for (uint64_t step = 1; step <= steps; ++step) {
  //     double loss = TrainStep(batch);
  //     c->ReportProgress(step, step * batch_size, loss);
  //   }
  void ReportProgress(uint64_t steps, uint64_t samples, double loss);
  // Sets the run's consistency mode and timeouts (the driver, before the
  // workers join). Fails with kInvalidArgument on bad values or while
  // workers are live.
  //
  //   tensorspark::RunConfig run;
  //   run.mode = tensorspark::ConsistencyMode::kSync;
  //   TS_RETURN_IF_ERROR(driver->Configure(run));
  Status Configure(const RunConfig& config);

  // ---- stack dumps for a hang watchdog (docs/consistency.md) ----
  // Sends `text` (UTF-8, e.g. a Python stack dump) as this worker's latest
  // report, replacing the previous one; a text over 64 KiB is cut to its
  // last 64 KiB. The server keeps it while this worker is a live member
  // (after Join) and ignores it from any other connection.
  //
  //   TS_RETURN_IF_ERROR(c->Report("Thread 0x7f3c (most recent call first): ..."));
  Status Report(std::string_view text);
  // Every live member's identity, clock, progress and latest report; any
  // connection may ask (the driver's watchdog, a tool).
  //
  //   std::vector<tensorspark::WorkerReport> workers;
  //   TS_RETURN_IF_ERROR(driver->Reports(&workers));
  //   for (const auto& w : workers) {
  //     if (w.progress_age_ms > 600'000) std::cerr << w.partition << ":\n" << w.text;
  //   }
  Status Reports(std::vector<WorkerReport>* out);
  // Names a file for the heartbeat thread to ship, such as the one Python's
  // faulthandler.dump_traceback_later(t, repeat=True, file=f) writes: at
  // each beat the thread stats it and, when it is not empty and its size or
  // mtime changed since it was last sent, sends its last 64 KiB as a REPORT
  // on the heartbeat connection, so the dump reaches the server even while
  // the thread using this Client is stuck. Needs heartbeat_interval_s > 0
  // (without the thread nothing is shipped); "" stops. No I/O here and
  // thread-safe, like ReportProgress. Errors reading the file are logged
  // once (stderr) and otherwise ignored.
  //
  //   opt.heartbeat_interval_s = 5;
  //   TS_RETURN_IF_ERROR(tensorspark::Client::Connect(opt, &c));
  //   c->SetDumpFile("/tmp/stack-3.txt");  // faulthandler writes here
  //   TS_RETURN_IF_ERROR(c->Join(nullptr));
  void SetDumpFile(std::string path);

  // ---- tagged snapshots (docs/snapshots.md, "Tagged snapshots") ----
  // Makes the server write a snapshot now, recording `tag` (>= 1, chosen
  // by the driver, e.g. the number of the Spark job just finished) in the
  // file. Call it at a quiescent point (no worker pushing), so that the
  // snapshot is a point every server of a sharded model shares. `name`
  // receives the file name in the server's snapshot_dir and `version` the
  // model version it holds (both may be null). Fails with kInvalidArgument
  // when the server has no snapshot_dir or the tag is 0, and with the write
  // error (disk full: kLimitExceeded) otherwise. The server writes it on
  // this connection's thread, so the round trip lasts as long as writing
  // the model (keep io_timeout_s above that). Not thread-safe, like Push.
  //
  //   std::string name;
  //   TS_RETURN_IF_ERROR(driver->Snapshot(/*tag=*/job, &name, nullptr));
  Status Snapshot(uint64_t tag, std::string* name, uint64_t* version);
  // The valid snapshot files of the server's snapshot_dir, newest first
  // (by version, then tag), with their tag (0: untagged, e.g. timed ones)
  // and version. Only each file's header and trailer are checked, not its
  // contents (Restore reads and checks the whole file). kInvalidArgument
  // when the server has no snapshot_dir. Not thread-safe.
  //
  //   std::vector<tensorspark::SnapshotInfo> files;
  //   TS_RETURN_IF_ERROR(driver->Snapshots(&files));
  //   for (const auto& f : files) std::cout << f.tag << " " << f.name << "\n";
  Status Snapshots(std::vector<SnapshotInfo>* out);
  // Replaces the server's whole state (variables, optimizer state, default
  // optimizer, version) by the newest valid snapshot tagged `tag` in its
  // snapshot_dir; the file is read and checked in full before anything
  // changes, and the snapshot files newer than it are deleted (they belong
  // to the history left behind). `version` (may be null) receives the
  // restored version. Fails with kNotFound when no file has the tag, and
  // with kInvalidArgument while workers are live, when none of those files
  // is valid, or without a snapshot_dir; then nothing changes. Not
  // thread-safe.
  //
  //   uint64_t version = 0;
  //   TS_RETURN_IF_ERROR(driver->Restore(/*tag=*/3, &version));
  Status Restore(uint64_t tag, uint64_t* version);

  // ---- sparse tables (docs/protocol.md, "Sparse tables") ----
  // Creates the tables, or checks and reconfigures those that exist:
  // `created` (may be null) tells which were new. Every config is checked
  // first (kInvalidArgument naming the table and field; an existing table
  // with another dim is kShapeMismatch, with another vocab, seed or
  // initializer kInvalidArgument), so a bad one creates nothing. An existing
  // table takes the new optimizer, capacity, eviction, admission and TTL.
  // Not thread-safe, like Push.
  //
  //   tensorspark::TableConfig user;
  //   user.name = "user"; user.dim = 16;
  //   user.optimizer.kind = tensorspark::RowOptimizerKind::kAdagrad;
  //   TS_RETURN_IF_ERROR(c->CreateTables({&user, 1}, nullptr));
  Status CreateTables(std::span<const TableConfig> tables, std::vector<bool>* created);
  // Pulls rows of one or more tables straight into the callers' buffers: a
  // row never stored reads as its initial value. Each `out` must hold
  // ids.size() * dim floats (kShapeMismatch naming the table otherwise; the
  // buffers then hold unspecified values). An id outside a fixed vocabulary
  // is kInvalidArgument naming the table and the id; an unknown table
  // kNotFound. Rows are served at once in every consistency mode. `version`
  // (may be null) receives the model version. Not thread-safe.
  //
  //   std::vector<int64_t> ids = {3, 17, 3};
  //   std::vector<float> rows(ids.size() * 16);
  //   tensorspark::RowsRequest req{"user", ids, rows};
  //   TS_RETURN_IF_ERROR(c->PullRows({&req, 1}, nullptr));
  Status PullRows(std::span<const RowsRequest> req, uint64_t* version);
  // Pushes row gradients (kGradient, through each table's optimizer;
  // learning_rate > 0 overrides the table's rate for this push) or deltas
  // (kDelta, added) from the callers' buffers, without copying. Every
  // table's name and dim are checked before any row changes (kShapeMismatch:
  // "table 'user' has dim 16 on the server, the push carries 32"); each
  // table's rows are then applied all or nothing (an id out of range, a
  // repeated id, or a table full with eviction off refuses that table).
  // `version` (may be null) receives the model version after the push.
  // Not thread-safe.
  //
  //   std::vector<int64_t> ids = {3, 17};
  //   std::vector<float> grads(ids.size() * 16, 0.5f);
  //   tensorspark::RowsUpdate up{"user", 16, ids, grads};
  //   TS_RETURN_IF_ERROR(c->PushRows(tensorspark::UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr));
  Status PushRows(UpdateKind kind, float learning_rate, std::span<const RowsUpdate> req,
                  uint64_t* version);
  // One batch (at most max_rows, fewer when the server caps the frame) of
  // the rows `table` stores, from `cursor` on (0 starts): ids, values
  // (ids->size() * *dim), and the cursor of the next batch in
  // `next_cursor` (UINT64_MAX: done). Every stored row is returned once if
  // no push runs during the export. Not thread-safe.
  //
  //   uint64_t cursor = 0;
  //   while (cursor != UINT64_MAX) {
  //     TS_RETURN_IF_ERROR(c->ExportRows("user", cursor, 65536, &ids, &values, &dim, &cursor));
  //     Save(ids, values, dim);
  //   }
  Status ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                    std::vector<int64_t>* ids, std::vector<float>* values, uint32_t* dim,
                    uint64_t* next_cursor);
  // Every table of the server in creation order, with its config and the
  // rows it stores. Not thread-safe.
  //
  //   std::vector<tensorspark::TableInfo> tables;
  //   TS_RETURN_IF_ERROR(c->ListTables(&tables));
  Status ListTables(std::vector<TableInfo>* out);

  // Counters of the server (see docs/protocol.md for their names).
  Status Stats(std::vector<StatEntry>* out);

  // Asks the server to stop serving; it replies before it stops.
  Status ShutdownServer();

  // Closes the connection; later calls fail with kConnectionError.
  void Close();

  // Round trips that failed because the connection broke are not retried
  // (a push may or may not have been applied); reconnect with Connect.
  bool connected() const;

  // Whether this connection's frames carry CRC-32C, as negotiated in HELLO
  // (ClientOptions::checksums; an older server always checksums).
  bool checksums() const;

 private:
  explicit Client(std::unique_ptr<ClientImpl> impl);
  std::unique_ptr<ClientImpl> impl_;
};

}  // namespace tensorspark
