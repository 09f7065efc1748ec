// A client of a model spread over several parameter servers.
//
// Each variable is cut into chunks of about `chunk_bytes` (4 MB by default)
// and chunk k of variable `name` lives on server ServerFor(name, k, S). The
// rule is deterministic, so every worker of a run, and a later run, finds the
// same chunk on the same server without asking anyone. A call sends one
// request to each server that holds a part of it, all in parallel, straight
// from (or into) the caller's buffers.
//
// A worker is a member of every server (Join, Leave and Heartbeat go to all
// of them), so each server fences stale attempts and runs its own sync
// rounds and staleness waits over its part of the model (docs/protocol.md,
// "Sharding").
//
// Like Client, a ShardedClient is not thread-safe: one per thread (except
// ReportProgress and SetDumpFile, as for Client).
//
//   std::vector<tensorspark::Endpoint> servers = {{"10.0.0.5", 10080}, {"10.0.0.6", 10080}};
//   std::unique_ptr<tensorspark::ShardedClient> c;
//   TS_RETURN_IF_ERROR(tensorspark::ShardedClient::Connect(opt, servers, &c));
//   TS_RETURN_IF_ERROR(c->Pull(views, &version));
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorspark/client.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark {

struct Endpoint {
  std::string host;
  uint16_t port = 0;
};

class ShardedClient {
 public:
  static constexpr uint64_t kDefaultChunkBytes = uint64_t{4} << 20;

  // Connects to every server in parallel (host and port of `base` are
  // ignored; the rest of it applies to each connection).
  static Status Connect(const ClientOptions& base, std::span<const Endpoint> servers,
                        std::unique_ptr<ShardedClient>* out,
                        uint64_t chunk_bytes = kDefaultChunkBytes);

  ~ShardedClient();
  ShardedClient(const ShardedClient&) = delete;
  ShardedClient& operator=(const ShardedClient&) = delete;

  // The placement rule: (CRC-32C(name) + chunk) mod num_servers.
  static size_t ServerFor(std::string_view name, uint64_t chunk, size_t num_servers);
  // Elements per chunk for a chunk size in bytes (float32).
  static uint64_t ChunkElements(uint64_t chunk_bytes);
  // Name under which a server stores chunk `k` of `num_chunks` of `name`:
  // the name itself when the variable is a single chunk, else "name#k/num".
  static std::string ChunkName(std::string_view name, uint64_t k, uint64_t num_chunks);

  size_t num_servers() const;

  // As Client::Register; `created[i]` is true when the variable's first chunk
  // was created by this call. Each server registers its chunks atomically.
  // Here and in Pull and Push, `created` and `version` (the sum of the
  // servers' versions) may be null, as for Client.
  Status Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                  uint64_t* version);

  // As Client::Pull: each server writes its chunks straight into the views.
  Status Pull(std::span<const MutableTensorView> out, uint64_t* version);

  // As Client::Push. Each server checks and applies its own chunks
  // atomically; a push rejected by one server may have been applied by
  // another (reported through the returned Status).
  Status Push(UpdateKind kind, std::span<const TensorView> tensors, const PushOptions& options,
              uint64_t* version);

  // Sets the server-side optimizer of the named variables on every server
  // that holds a piece of them (a multi-chunk variable `name` is stored as
  // "name#k/K": each server gets the chunk names it stores, found by listing
  // its variables); with no names, of every variable on every server. An
  // unknown name fails with kNotFound before any server is changed; a bad
  // config fails on every server alike. Same threading rule as Push.
  //
  //   tensorspark::OptimizerConfig adam;
  //   adam.kind = tensorspark::OptimizerKind::kAdam;
  //   std::string_view only[] = {"dense/kernel"};  // all of its chunks
  //   TS_RETURN_IF_ERROR(c->SetOptimizer(adam, only, nullptr));
  Status SetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                      uint64_t* version);

  // ---- sparse tables (docs/protocol.md, "Sparse tables") ----
  // Row `id` of every table lives on server ServerOfId(id, num_servers())
  // (tensorspark/tables.h). Same threading rule as Push.
  //
  // As Client::CreateTables, on every server; `created[i]` is true when
  // any server created table i. A config refused by one server may have
  // been created by another (the servers are asked in parallel).
  //
  //   TS_RETURN_IF_ERROR(c->CreateTables({&user, 1}, nullptr));
  Status CreateTables(std::span<const TableConfig> tables, std::vector<bool>* created);
  // As Client::PullRows: each table's ids are split by server, one request
  // goes to each server holding some of them (in parallel), and the rows
  // come back in the caller's order. `out` must hold ids.size() * dim
  // floats. `version` is the sum of the servers' versions.
  //
  //   tensorspark::RowsRequest req{"user", ids, rows};
  //   TS_RETURN_IF_ERROR(c->PullRows({&req, 1}, nullptr));
  Status PullRows(std::span<const RowsRequest> req, uint64_t* version);
  // As Client::PushRows, split by server the same way. Each server checks
  // and applies its part; a push refused by one server may have been
  // applied by another (reported through the returned Status).
  //
  //   tensorspark::RowsUpdate up{"user", 16, ids, grads};
  //   TS_RETURN_IF_ERROR(c->PushRows(tensorspark::UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr));
  Status PushRows(UpdateKind kind, float learning_rate, std::span<const RowsUpdate> req,
                  uint64_t* version);
  // As Client::ExportRows over every server in turn: the cursor is
  // server << 48 | that server's cursor (0 starts, UINT64_MAX: done).
  //
  //   uint64_t cursor = 0;
  //   while (cursor != UINT64_MAX) {
  //     TS_RETURN_IF_ERROR(c->ExportRows("user", cursor, 65536, &ids, &values, &dim, &cursor));
  //   }
  Status ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                    std::vector<int64_t>* ids, std::vector<float>* values, uint32_t* dim,
                    uint64_t* next_cursor);
  // The tables of every server, in the first server's creation order (then
  // any table another server alone holds), with `rows` summed over servers.
  //
  //   std::vector<tensorspark::TableInfo> tables;
  //   TS_RETURN_IF_ERROR(c->ListTables(&tables));
  Status ListTables(std::vector<TableInfo>* out);

  // ---- membership and consistency modes (docs/consistency.md) ----
  // Joins the run on every server in parallel, so each one fences older
  // attempts of this partition and waits for this worker in its sync rounds.
  // A kFenced from any server wins over other failures and names that
  // server; on any failure the servers already joined are left again (best
  // effort), so none waits for a half-joined worker. `clock` (may be null)
  // receives the largest starting clock over the servers (a server holding
  // no part of the model never closes a round and stays at 0). Starts one
  // heartbeat thread per server when ClientOptions::heartbeat_interval_s > 0.
  // Not thread-safe, like Push.
  //
  //   opt.partition_id = 3; opt.attempt = task_attempt_id;
  //   TS_RETURN_IF_ERROR(tensorspark::ShardedClient::Connect(opt, servers, &c));
  //   uint64_t clock = 0;
  //   TS_RETURN_IF_ERROR(c->Join(&clock));
  Status Join(uint64_t* clock);
  // Leaves the run on every server (each stops waiting for this worker) and
  // stops the heartbeat threads. Not thread-safe.
  //
  //   TS_RETURN_IF_ERROR(c->Leave());  // at the end of the task
  Status Leave();
  // Tells every server this worker is alive, with the latest ReportProgress
  // values. Not thread-safe (the heartbeat threads need no call).
  //
  //   TS_RETURN_IF_ERROR(c->Heartbeat());  // during long local work
  Status Heartbeat();
  // Stores this worker's progress for the next heartbeat of every server's
  // Client (their threads or Heartbeat()). No I/O and thread-safe, like
  // Client::ReportProgress: a training callback may call it while another
  // thread pushes.
  //
  //   c->ReportProgress(step, step * batch_size, loss);
  void ReportProgress(uint64_t steps, uint64_t samples, double loss);
  // Sends `text` as this worker's latest report to the first server only
  // (see SetDumpFile for why). Not thread-safe.
  //
  //   TS_RETURN_IF_ERROR(c->Report(dump));
  Status Report(std::string_view text);
  // Names a stack dump file for the first server's heartbeat thread to ship,
  // as Client::SetDumpFile. Only the first server gets it: the text is the
  // same for every server, so shipping it once saves S-1 copies of up to
  // 64 KiB per change, and Reports() finds it there (it keeps the newest text
  // of each member). No I/O and thread-safe; needs heartbeat_interval_s > 0.
  //
  //   opt.heartbeat_interval_s = 5;
  //   c->SetDumpFile("/tmp/stack-3.txt");  // faulthandler writes here
  //   TS_RETURN_IF_ERROR(c->Join(nullptr));
  void SetDumpFile(std::string path);
  // Sets the run's consistency mode and timeouts on every server (the
  // driver, before the workers join). Fails with kInvalidArgument on bad
  // values (then no server changes) or while workers are live on a server
  // (then the others may have been configured; call it again once they
  // left). Not thread-safe.
  //
  //   tensorspark::RunConfig run;
  //   run.mode = tensorspark::ConsistencyMode::kSync;
  //   TS_RETURN_IF_ERROR(driver->Configure(run));
  Status Configure(const RunConfig& config);
  // Every live member of any server, merged by (partition, attempt), in
  // partition order: the largest clock, steps and progress_age_ms over the
  // servers (a watchdog sees the stalest view), and the newest report (the
  // smallest report_age_ms) with its text. Not thread-safe.
  //
  //   std::vector<tensorspark::WorkerReport> workers;
  //   TS_RETURN_IF_ERROR(driver->Reports(&workers));
  //   for (const auto& w : workers) {
  //     if (w.progress_age_ms > 600'000) std::cerr << w.partition << ":\n" << w.text;
  //   }
  Status Reports(std::vector<WorkerReport>* out);

  // ---- tagged snapshots (docs/snapshots.md, "A consistent set over several servers") ----
  // Each server snapshots on its own timer, so after a crash their newest
  // snapshots come from different moments. The driver therefore tags
  // snapshots at quiescent points (between Spark jobs, no worker live):
  // Snapshot writes one tagged `tag` on every server, NewestCommonTag finds
  // the newest tag that all of them hold, and Restore brings every server
  // back to it, giving one consistent model.
  //
  // Snapshot: every server in parallel writes a snapshot tagged `tag`
  // (>= 1; use increasing tags, e.g. the job number). `names` (may be null)
  // receives each server's file name, in server order; `version` (may be
  // null) the version sum. A failure names its server; the servers that
  // succeeded keep their file, which NewestCommonTag then ignores as long
  // as another server lacks the tag. Not thread-safe, like Push.
  //
  //   TS_RETURN_IF_ERROR(driver->Snapshot(/*tag=*/job));
  Status Snapshot(uint64_t tag, std::vector<std::string>* names = nullptr,
                  uint64_t* version = nullptr);
  // Each server's valid snapshot files, newest first (Client::Snapshots),
  // in server order. Not thread-safe.
  //
  //   std::vector<std::vector<tensorspark::SnapshotInfo>> per_server;
  //   TS_RETURN_IF_ERROR(driver->Snapshots(&per_server));
  Status Snapshots(std::vector<std::vector<SnapshotInfo>>* out);
  // The largest tag (>= 1) that every server lists a valid snapshot of;
  // `found` is false (and `tag` 0) when there is none. Not thread-safe.
  //
  //   uint64_t tag = 0;
  //   bool found = false;
  //   TS_RETURN_IF_ERROR(driver->NewestCommonTag(&tag, &found));
  //   if (found) TS_RETURN_IF_ERROR(driver->Restore(tag));
  Status NewestCommonTag(uint64_t* tag, bool* found);
  // Restores every server, in parallel, from its newest valid snapshot
  // tagged `tag` (Client::Restore: the whole state is replaced and newer
  // snapshot files are deleted). First checks that every server lists the
  // tag: if one does not, fails with kNotFound naming it, and no server is
  // changed. A server that then fails (its file fails the full check,
  // workers joined meanwhile) is named in the error while the others were
  // restored: fix it and call Restore again, or restore an older common
  // tag. `version` (may be null) receives the version sum. Not thread-safe.
  //
  //   TS_RETURN_IF_ERROR(driver->Restore(tag, nullptr));
  Status Restore(uint64_t tag, uint64_t* version = nullptr);

  // Counters of each server, in the order of `servers`.
  Status Stats(std::vector<std::vector<StatEntry>>* out);

  // Asks every server to stop.
  Status ShutdownServers();

  void Close();

  // True while every server's connection is up (a broken one is not
  // reconnected: connect a new ShardedClient).
  //
  //   if (!c->connected()) TS_RETURN_IF_ERROR(ShardedClient::Connect(opt, servers, &c));
  bool connected() const;

  // `version` outputs of the calls above are the sum of the servers' model
  // versions, which grows by the number of servers a push touched.

 private:
  struct Impl;
  explicit ShardedClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorspark
