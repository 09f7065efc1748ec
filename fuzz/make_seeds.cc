// Writes the seed corpus of the fuzz targets into a directory: a few valid
// request sequences per opcode plus some reply frames (format: fuzz_input.h).
// Generated rather than committed, so the seeds follow protocol changes.
//
//   fuzz_seeds OUT_DIR
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_input.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"

namespace tensorspark::fuzz {
namespace {

using protocol::Opcode;
using Bytes = std::vector<uint8_t>;

// A seed: control byte + frames with increasing request ids.
class Seed {
 public:
  explicit Seed(uint8_t control = 0) : bytes_{control} {}
  Seed& Frame(Opcode op, const Bytes& payload = {}, uint32_t flags = 0) {
    AppendFrame(static_cast<uint16_t>(op), flags, ++id_, payload, &bytes_);
    return *this;
  }
  const Bytes& bytes() const { return bytes_; }

 private:
  Bytes bytes_;
  uint64_t id_ = 10;
};

struct Tensor1 {
  std::string_view name;
  std::vector<int64_t> shape;
};

// `count`, metas, then numel floats per tensor (REGISTER and PUSH).
Bytes TensorSection(const std::vector<Tensor1>& tensors, Bytes out = {}) {
  protocol::Writer w(&out);
  w.U32(static_cast<uint32_t>(tensors.size()));
  for (const Tensor1& t : tensors) w.Meta(t.name, t.shape);
  for (const Tensor1& t : tensors) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    for (int64_t i = 0; i < n; ++i) w.F32(0.5f * static_cast<float>(i + 1));
  }
  return out;
}

Bytes Push(uint8_t kind, uint32_t mean_window, float lr, const std::vector<Tensor1>& tensors) {
  Bytes head;
  protocol::EncodePushHead({kind, mean_window, lr}, &head);
  return TensorSection(tensors, head);
}

// SET_OPTIMIZER (opcode 9), written from the wire layout of docs/protocol.md:
// kind, 3 reserved bytes, lr, beta1, beta2, epsilon, weight_decay,
// initial_accumulator, count, names.
constexpr auto kSetOptimizer = static_cast<Opcode>(9);
Bytes SetOptimizer(uint8_t kind, std::vector<std::string_view> names) {
  Bytes out;
  protocol::Writer w(&out);
  w.U8(kind);
  w.U8(0);
  w.U8(0);
  w.U8(0);
  for (float f : {0.01f, 0.9f, 0.999f, 1e-7f, 0.004f, 0.1f}) w.F32(f);
  w.U32(static_cast<uint32_t>(names.size()));
  for (std::string_view n : names) w.Str(n);
  return out;
}

Bytes Pull(std::vector<std::string_view> names) {
  Bytes out;
  protocol::EncodePullRequest(names, &out);
  return out;
}

}  // namespace
}  // namespace tensorspark::fuzz

int main(int argc, char** argv) {
  using namespace tensorspark;
  using namespace tensorspark::fuzz;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  // Names and shapes of the variables the server target registers.
  const Tensor1 w{"w", {4, 3}}, b{"b", {3}}, s{"s", {}}, z{"z", {0, 5}};
  const Tensor1 fresh{"new", {2}};

  std::vector<std::pair<std::string, Bytes>> seeds;
  auto add = [&](std::string name, const Seed& seed) { seeds.emplace_back(name, seed.bytes()); };

  add("register_pull_push", Seed()
                                .Frame(Opcode::kRegister, TensorSection({fresh, w}))
                                .Frame(Opcode::kPull, Pull({"new"}))
                                .Frame(Opcode::kPush, Push(3, 1, 0.5f, {fresh}))
                                .Frame(Opcode::kList)
                                .Frame(Opcode::kStats));
  // The same on a connection that negotiated no checksums.
  add("register_pull_push_unchecked", Seed(kNoChecksum)
                                          .Frame(Opcode::kRegister, TensorSection({fresh, w}))
                                          .Frame(Opcode::kPull, Pull({"new"}))
                                          .Frame(Opcode::kPush, Push(3, 1, 0.5f, {fresh}))
                                          .Frame(Opcode::kStats));
  add("register_mismatch", Seed().Frame(Opcode::kRegister, TensorSection({{"b", {4}}})));
  add("pull_named", Seed().Frame(Opcode::kPull, Pull({"w", "b", "s", "z"})));
  add("pull_all", Seed().Frame(Opcode::kPull, Pull({})));
  add("pull_unknown", Seed().Frame(Opcode::kPull, Pull({"nope"})));
  add("push_mean", Seed().Frame(Opcode::kPush, Push(1, 2, 0.0f, {w, b})));
  add("push_delta", Seed().Frame(Opcode::kPush, Push(2, 1, 0.0f, {s, z})));
  add("push_sgd",
      Seed().Frame(Opcode::kPush, Push(3, 1, 0.1f, {w})).Frame(Opcode::kPull, Pull({"w"})));
  add("optimizer_adam", Seed()
                            .Frame(kSetOptimizer, SetOptimizer(5, {"w", "b"}))
                            .Frame(Opcode::kPush, Push(3, 1, 0.0f, {w, b}))
                            .Frame(Opcode::kPush, Push(3, 1, 0.5f, {w}))
                            .Frame(Opcode::kPull, Pull({"w"})));
  add("optimizer_all", Seed()
                           .Frame(kSetOptimizer, SetOptimizer(4, {}))
                           .Frame(Opcode::kRegister, TensorSection({fresh}))
                           .Frame(Opcode::kPush, Push(3, 1, 0.0f, {fresh, s})));
  add("push_bad_kind", Seed().Frame(Opcode::kPush, Push(9, 0, -1.0f, {b})));
  add("list_stats_shutdown",
      Seed().Frame(Opcode::kList).Frame(Opcode::kStats).Frame(Opcode::kShutdown));
  // fp16/bf16 wire encodings (flags bits 2, 3), and both at once.
  add("pull_encoded",
      Seed()
          .Frame(Opcode::kPull, Pull({"w", "b"}), protocol::kFlagFp16)
          .Frame(Opcode::kPull, Pull({}), protocol::kFlagBf16)
          .Frame(Opcode::kPull, Pull({"s"}), protocol::kFlagFp16 | protocol::kFlagBf16));
  // Stack dumps (REPORT, opcode 14) and the driver's view of them (REPORTS,
  // 15); the server target connects as partition 1, so it can JOIN.
  {
    Bytes dump, bad_kind;
    protocol::EncodeReport(protocol::kReportStackDump,
                           "Thread 0x01 (most recent call first):\n  File \"t.py\", line 3 in f\n",
                           &dump);
    protocol::EncodeReport(2, "x", &bad_kind);
    add("report_reports", Seed()
                              .Frame(Opcode::kReports)
                              .Frame(Opcode::kReport, dump)
                              .Frame(Opcode::kJoin)
                              .Frame(Opcode::kReport, dump)
                              .Frame(Opcode::kReports)
                              .Frame(Opcode::kReport, bad_kind)
                              .Frame(Opcode::kLeave)
                              .Frame(Opcode::kReports));
  }
  // Tagged snapshots (SNAPSHOT 16, SNAPSHOTS 17, RESTORE 18): with a
  // snapshot directory (control bit 3) written, listed and restored, a
  // RESTORE refused while a member is live; without one, refused.
  {
    Bytes tag0, tag1, tag2, short_tag(7);
    protocol::EncodeTagRequest(0, &tag0);
    protocol::EncodeTagRequest(1, &tag1);
    protocol::EncodeTagRequest(2, &tag2);
    add("snapshot_restore", Seed(kSnapshotDir)
                                .Frame(protocol::Opcode::kSnapshot, tag1)
                                .Frame(Opcode::kPush, Push(2, 1, 0.0f, {w, b}))
                                .Frame(kSetOptimizer, SetOptimizer(5, {}))
                                .Frame(Opcode::kPush, Push(3, 1, 0.0f, {w}))
                                .Frame(protocol::Opcode::kSnapshot, tag2)
                                .Frame(protocol::Opcode::kSnapshots)
                                .Frame(protocol::Opcode::kRestore, tag1)
                                .Frame(Opcode::kPull, Pull({}))
                                .Frame(protocol::Opcode::kRestore, tag2)
                                .Frame(protocol::Opcode::kSnapshot, tag0)
                                .Frame(protocol::Opcode::kRestore, short_tag)
                                .Frame(Opcode::kJoin)
                                .Frame(protocol::Opcode::kRestore, tag1)
                                .Frame(Opcode::kLeave)
                                .Frame(protocol::Opcode::kSnapshots));
    add("snapshot_off", Seed()
                            .Frame(protocol::Opcode::kSnapshot, tag1)
                            .Frame(protocol::Opcode::kSnapshots)
                            .Frame(protocol::Opcode::kRestore, tag1));
  }
  // Sparse tables (opcodes 19-23): create, pull (with repeats), push
  // gradients and deltas, export, list, and refusals (dim, vocab, unknown
  // table, capacity).
  {
    TableConfig user;
    user.name = "user";
    user.dim = 4;
    user.optimizer.kind = RowOptimizerKind::kAdagrad;
    TableConfig country = user;
    country.name = "country";
    country.dim = 2;
    country.vocab = 10;
    country.capacity = 3;
    country.optimizer.kind = RowOptimizerKind::kAdam;
    const TableConfig both[] = {user, country};
    Bytes create, pull, push, delta, wide, out_of_range, exp, exp_next, unknown;
    protocol::EncodeTableCreate(both, &create);
    const int64_t ids[] = {1, 9, 1}, unique[] = {1, 9}, far[] = {12};
    const protocol::PullRowsItem pulls[] = {{"user", ids}, {"country", unique}};
    protocol::EncodePullRowsRequest(pulls, &pull);
    const std::vector<float> g4(8, 0.5f), g2(4, 0.25f), g8(16, 1.0f), g1(2, 1.0f);
    const protocol::PushRowsItem ups[] = {{"user", 4, unique, g4}, {"country", 2, unique, g2}};
    protocol::EncodePushRows(3, 0.0f, ups, &push);
    protocol::EncodePushRows(2, 0.0f, {ups, 1}, &delta);
    const protocol::PushRowsItem bad_dim[] = {{"user", 8, unique, g8}};
    protocol::EncodePushRows(3, 0.1f, bad_dim, &wide);
    const protocol::PushRowsItem bad_id[] = {{"country", 2, far, g1}};
    protocol::EncodePushRows(3, 0.0f, bad_id, &out_of_range);
    protocol::EncodeExportRowsRequest("user", 0, 1, &exp);
    protocol::EncodeExportRowsRequest("user", 1, 100, &exp_next);
    const protocol::PullRowsItem ghost[] = {{"ghost", unique}};
    protocol::EncodePullRowsRequest(ghost, &unknown);
    add("tables", Seed()
                      .Frame(Opcode::kTableCreate, create)
                      .Frame(Opcode::kPullRows, pull)
                      .Frame(Opcode::kPushRows, push)
                      .Frame(Opcode::kPushRows, delta)
                      .Frame(Opcode::kPullRows, pull)
                      .Frame(Opcode::kExportRows, exp)
                      .Frame(Opcode::kExportRows, exp_next)
                      .Frame(Opcode::kListTables)
                      .Frame(Opcode::kStats));
    add("tables_refused", Seed()
                              .Frame(Opcode::kPullRows, unknown)
                              .Frame(Opcode::kTableCreate, create)
                              .Frame(Opcode::kPushRows, wide)
                              .Frame(Opcode::kPushRows, out_of_range)
                              .Frame(Opcode::kTableCreate, Bytes(4))
                              .Frame(Opcode::kListTables, Bytes(1)));
  }
  add("bad_flags_opcode", Seed()
                              .Frame(Opcode::kList, {}, protocol::kFlagResponse)
                              .Frame(static_cast<Opcode>(99))
                              .Frame(Opcode::kHello));

  // Handshake frames on a fresh connection (the proof is wrong).
  {
    protocol::HelloRequest hello;
    hello.client_nonce.fill(7);
    hello.client_name = "seed";
    Bytes p;
    protocol::EncodeHello(hello, &p);
    add("handshake", Seed(kSkipHandshake).Frame(Opcode::kHello, p).Frame(Opcode::kAuth, Bytes(32)));
  }

  // Reply frames: decoder inputs (requests with bad flags for the server).
  {
    const uint32_t kReply = protocol::kFlagResponse;
    Bytes err, reg, ver, list, pull, stats, reports, snapshot, snapshots;
    protocol::EncodeError(Status(StatusCode::kNotFound, "no such variable"), &err);
    protocol::EncodeRegisterResponse({3, {1, 0}}, &reg);
    protocol::EncodeVersion(42, &ver);
    std::vector<VariableInfo> vars{{"w", DType::kFloat32, {4, 3}}, {"s", DType::kFloat32, {}}};
    protocol::EncodeListResponse(7, vars, &list);
    const std::vector<VariableInfo> pulled{{"b", DType::kFloat32, {3}}};
    const std::vector<float> values{1, 2, 3};
    protocol::EncodeListResponse(7, pulled, &pull);
    protocol::Writer(&pull).Bytes(values.data(), values.size() * sizeof(float));
    const std::vector<StatEntry> counters{{"version", 7}, {"pushes", 7}};
    protocol::EncodeStatsResponse(counters, &stats);
    const std::vector<WorkerReport> workers{{0, 0, 3, 12, 40, 15, "File \"t.py\""},
                                            {1, 2, 3, 0, 900, WorkerReport::kNoReport, ""}};
    protocol::EncodeReportsResponse(workers, &reports);
    protocol::EncodeSnapshotResponse(
        12, "snapshot-00000000000000000012-tag-00000000000000000003.tsnap", &snapshot);
    const std::vector<SnapshotInfo> files{
        {3, 12, "snapshot-00000000000000000012-tag-00000000000000000003.tsnap"},
        {0, 10, "snapshot-00000000000000000010.tsnap"}};
    protocol::EncodeSnapshotsResponse(files, &snapshots);
    Bytes created, rows, exported, tables;
    const uint8_t flags[] = {1, 0};
    protocol::EncodeTableCreateResponse(flags, &created);
    protocol::Writer rw(&rows);
    rw.U64(7);
    rw.U32(1);
    rw.U32(2);
    rw.U32(1);
    rw.F32(0.5f);
    rw.F32(-0.5f);
    protocol::Writer ew(&exported);
    ew.U64(protocol::kExportDone);
    ew.U32(1);
    ew.U32(1);
    ew.I64(3);
    ew.F32(1.0f);
    TableConfig listed;
    listed.name = "user";
    listed.dim = 1;
    const TableInfo infos[] = {{listed, 1}};
    protocol::EncodeListTablesResponse(infos, &tables);
    add("table_replies", Seed()
                             .Frame(Opcode::kTableCreate, created, kReply)
                             .Frame(Opcode::kPullRows, rows, kReply)
                             .Frame(Opcode::kPushRows, ver, kReply)
                             .Frame(Opcode::kExportRows, exported, kReply)
                             .Frame(Opcode::kListTables, tables, kReply));
    add("replies", Seed()
                       .Frame(Opcode::kPull, err, kReply | protocol::kFlagError)
                       .Frame(Opcode::kRegister, reg, kReply)
                       .Frame(Opcode::kPush, ver, kReply)
                       .Frame(Opcode::kList, list, kReply)
                       .Frame(Opcode::kPull, pull, kReply)
                       .Frame(Opcode::kStats, stats, kReply)
                       .Frame(Opcode::kReports, reports, kReply)
                       .Frame(protocol::Opcode::kSnapshot, snapshot, kReply)
                       .Frame(protocol::Opcode::kSnapshots, snapshots, kReply));
  }

  const std::string dir = argv[1];
  for (const auto& [name, bytes] : seeds) {
    const std::string path = dir + "/" + name;
    FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() ||
        std::fclose(f) != 0) {
      std::perror(path.c_str());
      return 1;
    }
  }
  std::printf("wrote %zu seeds to %s\n", seeds.size(), dir.c_str());
  return 0;
}
