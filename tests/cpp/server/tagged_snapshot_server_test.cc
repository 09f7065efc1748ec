// SNAPSHOT, SNAPSHOTS and RESTORE through the server, the C++ clients and
// ShardedClient's consistent restore over two servers.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include "storage/snapshot.h"
#include "tensorspark/server.h"
#include "tensorspark/sharded_client.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using testing::ConnectClient;
using testing::RawConn;
using testing::StartServer;
using testing::TempDir;
using testing::TestClientOptions;
using testing::TestServerOptions;

const std::vector<int64_t> kShapeW = {40, 25};
const std::vector<int64_t> kShapeB = {10};

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

ServerOptions SnapshotOptions(const std::string& dir) {
  ServerOptions o = TestServerOptions();
  o.snapshot_dir = dir;
  return o;
}

std::map<std::string, uint64_t> StatsOf(const Server& s) {
  std::map<std::string, uint64_t> m;
  for (const auto& [k, v] : s.Stats()) m[k] = v;
  return m;
}

void RegisterWithAdam(Client* c) {
  std::vector<float> w(1000, 0.5f), b(10, -1.0f);
  VariableSpec specs[] = {{"w", kShapeW, w}, {"b", kShapeB, b}};
  std::vector<bool> created;
  uint64_t version;
  ASSERT_TRUE(c->Register(specs, &created, &version).ok());
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.learning_rate = 0.01f;
  ASSERT_TRUE(c->SetOptimizer(adam, {}, &version).ok());
}

// A gradient push to w and b, values from `seed`.
void PushGradient(Client* c, float seed) {
  std::vector<float> gw(1000), gb(10);
  for (size_t i = 0; i < gw.size(); ++i) gw[i] = seed * static_cast<float>(i % 7) - 1.0f;
  for (size_t i = 0; i < gb.size(); ++i) gb[i] = seed - static_cast<float>(i);
  TensorView views[] = {{"w", kShapeW, gw}, {"b", kShapeB, gb}};
  uint64_t version;
  ASSERT_TRUE(c->Push(UpdateKind::kGradient, views, {}, &version).ok());
}

std::vector<Tensor> PullAll(Client* c, uint64_t* version) {
  std::vector<Tensor> out;
  EXPECT_TRUE(c->PullAll(&out, version).ok());
  return out;
}

void ExpectBitIdentical(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].info.name, b[i].info.name);
    ASSERT_EQ(a[i].values.size(), b[i].values.size());
    EXPECT_EQ(std::memcmp(a[i].values.data(), b[i].values.data(), a[i].values.size() * 4), 0)
        << a[i].info.name;
  }
}

std::vector<std::pair<uint64_t, uint64_t>> TagsAndVersions(const std::vector<SnapshotInfo>& files) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const SnapshotInfo& f : files) out.emplace_back(f.tag, f.version);
  return out;
}

TEST(TaggedSnapshotServerTest, SnapshotWritesATaggedFileAndSnapshotsListsNewestFirst) {
  TempDir dir;
  auto server = StartServer(SnapshotOptions(dir.path()));
  auto c = ConnectClient(server->port());
  RegisterWithAdam(c.get());
  PushGradient(c.get(), 1);
  std::string name;
  uint64_t version = 0;
  Status s = c->Snapshot(1, &name, &version);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(name, storage::SnapshotFileName(1, 1));
  EXPECT_EQ(version, 1u);
  storage::SnapshotHeader h;
  ASSERT_TRUE(storage::ReadSnapshotHeader(dir.Sub(name), &h).ok());
  EXPECT_EQ(h.tag, 1u);
  PushGradient(c.get(), 2);
  std::string path;
  ASSERT_TRUE(server->Snapshot(&path).ok());  // untagged, version 2
  PushGradient(c.get(), 3);
  ASSERT_TRUE(c->Snapshot(2, nullptr, nullptr).ok());

  std::vector<SnapshotInfo> files;
  ASSERT_TRUE(c->Snapshots(&files).ok());
  EXPECT_EQ(TagsAndVersions(files),
            (std::vector<std::pair<uint64_t, uint64_t>>{{2, 3}, {0, 2}, {1, 1}}));
  EXPECT_EQ(files[0].name, storage::SnapshotFileName(3, 2));
  EXPECT_EQ(files[1].name, storage::SnapshotFileName(2));
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 3u);
}

TEST(TaggedSnapshotServerTest, RefusalsAndMalformedRequests) {
  auto plain = StartServer();  // no snapshot_dir
  auto c = ConnectClient(plain->port());
  std::vector<SnapshotInfo> files;
  uint64_t version = 0;
  for (Status s :
       {c->Snapshot(1, nullptr, nullptr), c->Snapshots(&files), c->Restore(1, &version)}) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(s.message(), "no snapshot directory; start it with --snapshot-dir"))
        << s.message();
  }
  EXPECT_TRUE(c->connected());

  TempDir dir;
  auto server = StartServer(SnapshotOptions(dir.path()));
  auto d = ConnectClient(server->port());
  Status s = d->Restore(3, &version);
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
  EXPECT_TRUE(Contains(s.message(), "holds no snapshot with tag 3")) << s.message();
  EXPECT_EQ(d->Snapshot(0, nullptr, nullptr).code(), StatusCode::kInvalidArgument);

  // The server checks too: tag 0, and payloads of the wrong length.
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  std::vector<uint8_t> tag0;
  protocol::EncodeTagRequest(0, &tag0);
  const uint16_t kSnapshot = static_cast<uint16_t>(protocol::Opcode::kSnapshot);
  const uint16_t kRestore = static_cast<uint16_t>(protocol::Opcode::kRestore);
  const uint16_t kSnapshots = static_cast<uint16_t>(protocol::Opcode::kSnapshots);
  ASSERT_TRUE(raw.Send(kSnapshot, 10, tag0, {}).ok());
  s = raw.ReadError(10);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "tag must be >= 1")) << s.message();
  ASSERT_TRUE(raw.Send(kRestore, 11, std::vector<uint8_t>(7), {}).ok());
  EXPECT_EQ(raw.ReadError(11).code(), StatusCode::kProtocolError);
  ASSERT_TRUE(raw.Send(kSnapshots, 12, std::vector<uint8_t>(1), {}).ok());
  EXPECT_EQ(raw.ReadError(12).code(), StatusCode::kProtocolError);
  // ... and the connection keeps serving.
  ASSERT_TRUE(raw.Send(kSnapshots, 13, {}, {}).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> payload;
  ASSERT_TRUE(raw.Read(&h, &payload).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse);
  ASSERT_TRUE(protocol::DecodeSnapshotsResponse(payload, &files).ok());
  EXPECT_TRUE(files.empty());
}

TEST(TaggedSnapshotServerTest, RestoreReplacesValuesOptimizerStateAndVersion) {
  TempDir dir;
  auto server = StartServer(SnapshotOptions(dir.path()));
  auto c = ConnectClient(server->port());
  RegisterWithAdam(c.get());
  for (float seed : {1.0f, 2.0f, 3.0f}) PushGradient(c.get(), seed);
  std::string name;
  ASSERT_TRUE(c->Snapshot(1, &name, nullptr).ok());
  uint64_t v1 = 0;
  const std::vector<Tensor> at_tag1 = PullAll(c.get(), &v1);
  ASSERT_EQ(v1, 3u);

  // Move on: more pushes, a new variable, another optimizer, newer files.
  for (float seed : {4.0f, 5.0f}) PushGradient(c.get(), seed);
  std::vector<float> extra(3, 7.0f);
  const std::vector<int64_t> es = {3};
  VariableSpec specs[] = {{"extra", es, extra}};
  std::vector<bool> created;
  uint64_t version = 0;
  ASSERT_TRUE(c->Register(specs, &created, &version).ok());
  OptimizerConfig sgd;
  ASSERT_TRUE(c->SetOptimizer(sgd, {}, &version).ok());
  ASSERT_TRUE(c->Snapshot(2, nullptr, nullptr).ok());
  std::string untagged;
  ASSERT_TRUE(server->Snapshot(&untagged).ok());

  ASSERT_TRUE(c->Restore(1, &version).ok());
  EXPECT_EQ(version, 3u);
  EXPECT_EQ(server->version(), 3u);
  uint64_t after = 0;
  ExpectBitIdentical(PullAll(c.get(), &after), at_tag1);  // no "extra" either
  EXPECT_EQ(after, 3u);
  EXPECT_EQ(StatsOf(*server)["restores"], 1u);
  // The newer files went with the history left behind.
  std::vector<SnapshotInfo> files;
  ASSERT_TRUE(c->Snapshots(&files).ok());
  EXPECT_EQ(TagsAndVersions(files), (std::vector<std::pair<uint64_t, uint64_t>>{{1, 3}}));
  EXPECT_FALSE(std::filesystem::exists(untagged));

  // Adam's slots and step came back: the next step matches a server
  // resumed from the same file, bit for bit.
  ServerOptions o = TestServerOptions();
  o.resume_from = dir.Sub(name);
  auto resumed = StartServer(o);
  auto r = ConnectClient(resumed->port());
  PushGradient(c.get(), 4);
  PushGradient(r.get(), 4);
  uint64_t va = 0, vb = 0;
  ExpectBitIdentical(PullAll(c.get(), &va), PullAll(r.get(), &vb));
  EXPECT_EQ(va, 4u);

  // A tag used again after the restore names the new snapshot.
  ASSERT_TRUE(c->Snapshot(2, &name, nullptr).ok());
  EXPECT_EQ(name, storage::SnapshotFileName(4, 2));
  const std::vector<Tensor> at_new_tag2 = PullAll(c.get(), &va);
  PushGradient(c.get(), 9);
  ASSERT_TRUE(c->Restore(2, &version).ok());
  EXPECT_EQ(version, 4u);
  ExpectBitIdentical(PullAll(c.get(), &va), at_new_tag2);

  // Nothing to write at Stop(): the restored state is on disk.
  const uint64_t written = StatsOf(*server)["snapshots_written"];
  c.reset();
  server->Stop();
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], written);
}

TEST(TaggedSnapshotServerTest, RestoreIsRefusedWhileAMemberIsLive) {
  TempDir dir;
  auto server = StartServer(SnapshotOptions(dir.path()));
  auto driver = ConnectClient(server->port());
  RegisterWithAdam(driver.get());
  ASSERT_TRUE(driver->Snapshot(1, nullptr, nullptr).ok());
  PushGradient(driver.get(), 1);

  ClientOptions wo = TestClientOptions(server->port());
  wo.partition_id = 4;
  std::unique_ptr<Client> worker;
  ASSERT_TRUE(Client::Connect(wo, &worker).ok());
  ASSERT_TRUE(worker->Join(nullptr).ok());
  uint64_t version = 0;
  Status s = driver->Restore(1, &version);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "while workers are live (partitions 4)")) << s.message();
  EXPECT_EQ(server->version(), 1u);  // unchanged
  EXPECT_EQ(StatsOf(*server)["restores"], 0u);

  ASSERT_TRUE(worker->Leave().ok());
  ASSERT_TRUE(driver->Restore(1, &version).ok());
  EXPECT_EQ(version, 0u);
  // The worker may join the restored model.
  ASSERT_TRUE(worker->Join(nullptr).ok());
  PushGradient(worker.get(), 2);
  EXPECT_EQ(server->version(), 1u);
}

TEST(TaggedSnapshotServerTest, RestoreWaitsForRequestsInFlight) {
  TempDir dir;
  auto server = StartServer(SnapshotOptions(dir.path()));
  auto driver = ConnectClient(server->port());
  RegisterWithAdam(driver.get());
  ASSERT_TRUE(driver->Snapshot(1, nullptr, nullptr).ok());
  // Non-member clients pull and push all along; every call succeeds and
  // sees a whole model (1010 values), before or after a restore.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      auto c = ConnectClient(server->port());
      while (!stop.load()) {
        uint64_t v;
        std::vector<Tensor> all;
        if (!c->PullAll(&all, &v).ok() || all.size() != 2) ++failures;
        if (t == 1) PushGradient(c.get(), 0.5f);
      }
    });
  }
  for (int i = 0; i < 20; ++i) {
    uint64_t version;
    Status s = driver->Restore(1, &version);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  stop.store(true);
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(StatsOf(*server)["restores"], 20u);
}

// ---- ShardedClient over two servers ------------------------------------------------

struct TwoServers {
  TempDir dirs[2];
  std::unique_ptr<Server> servers[2];
  std::vector<Endpoint> endpoints;

  TwoServers() {
    for (int i = 0; i < 2; ++i) {
      servers[i] = StartServer(SnapshotOptions(dirs[i].path()));
      endpoints.push_back({"127.0.0.1", servers[i]->port()});
    }
  }
  std::unique_ptr<ShardedClient> Connect() {
    std::unique_ptr<ShardedClient> c;
    EXPECT_TRUE(
        ShardedClient::Connect(TestClientOptions(0), endpoints, &c, /*chunk_bytes=*/64).ok());
    return c;
  }
};

// W's 40 floats are 3 chunks of 16 over both servers.
constexpr size_t kW = 40;

std::vector<float> PullW(ShardedClient* c) {
  std::vector<float> w(kW);
  MutableTensorView view{"W", w};
  uint64_t version;
  EXPECT_TRUE(c->Pull({&view, 1}, &version).ok());
  return w;
}

void PushW(ShardedClient* c, float x) {
  std::vector<float> d(kW, x);
  const std::vector<int64_t> shape = {static_cast<int64_t>(kW)};
  TensorView view{"W", shape, d};
  uint64_t version;
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, {&view, 1}, {}, &version).ok());
}

TEST(TaggedSnapshotServerTest, ShardedRestoreBringsEveryServerToTheNewestCommonTag) {
  TwoServers two;
  auto c = two.Connect();
  uint64_t tag = 9;
  bool found = true;
  ASSERT_TRUE(c->NewestCommonTag(&tag, &found).ok());
  EXPECT_FALSE(found);
  EXPECT_EQ(tag, 0u);

  std::vector<float> w(kW);
  for (size_t i = 0; i < kW; ++i) w[i] = static_cast<float>(i);
  const std::vector<int64_t> shape = {static_cast<int64_t>(kW)};
  VariableSpec spec{"W", shape, w};
  std::vector<bool> created;
  uint64_t version = 0;
  ASSERT_TRUE(c->Register({&spec, 1}, &created, &version).ok());
  for (const auto& s : two.servers) ASSERT_GE(StatsOf(*s)["variables"], 1u);  // both hold chunks
  PushW(c.get(), 1.0f);
  std::vector<std::string> names;
  ASSERT_TRUE(c->Snapshot(1, &names, &version).ok());
  EXPECT_EQ(names.size(), 2u);
  const std::vector<float> at_tag1 = PullW(c.get());

  // Tag 2 reaches only the first server (the driver died in between).
  PushW(c.get(), 10.0f);
  auto first = ConnectClient(two.servers[0]->port());
  ASSERT_TRUE(first->Snapshot(2, nullptr, nullptr).ok());
  PushW(c.get(), 100.0f);

  std::vector<std::vector<SnapshotInfo>> per_server;
  ASSERT_TRUE(c->Snapshots(&per_server).ok());
  ASSERT_EQ(per_server.size(), 2u);
  EXPECT_EQ(per_server[0].size(), 2u);
  EXPECT_EQ(per_server[1].size(), 1u);
  ASSERT_TRUE(c->NewestCommonTag(&tag, &found).ok());
  EXPECT_TRUE(found);
  EXPECT_EQ(tag, 1u);

  // A tag one server lacks changes neither.
  Status s = c->Restore(2);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "no server was changed")) << s.message();
  EXPECT_TRUE(Contains(s.message(), "127.0.0.1:" + std::to_string(two.servers[1]->port())));
  EXPECT_NE(PullW(c.get()), at_tag1);

  ASSERT_TRUE(c->Restore(tag, &version).ok());
  EXPECT_EQ(PullW(c.get()), at_tag1);
  EXPECT_EQ(version, two.servers[0]->version() + two.servers[1]->version());
  // The first server's tag 2 is gone with the history it belonged to.
  ASSERT_TRUE(c->Snapshots(&per_server).ok());
  EXPECT_EQ(per_server[0].size(), 1u);
  ASSERT_TRUE(c->NewestCommonTag(&tag, &found).ok());
  EXPECT_EQ(tag, 1u);
}

}  // namespace
}  // namespace tensorspark
