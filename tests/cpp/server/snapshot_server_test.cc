// Snapshots through the server: options, triggers, resume and failures.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <thread>

#include "storage/snapshot.h"
#include "tensorspark/server.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using testing::ConnectClient;
using testing::StartServer;
using testing::TempDir;
using testing::TestServerOptions;

std::map<std::string, uint64_t> StatsOf(const Server& s) {
  std::map<std::string, uint64_t> m;
  for (const auto& [k, v] : s.Stats()) m[k] = v;
  return m;
}

// Waits up to 10 s for `key` to reach at least `want`.
bool WaitForStat(const Server& s, const std::string& key, uint64_t want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline) {
    if (StatsOf(s)[key] >= want) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

std::vector<uint64_t> SnapshotVersions(const std::string& dir) {
  std::vector<std::pair<uint64_t, std::string>> files;
  EXPECT_TRUE(storage::ListSnapshots(dir, &files).ok());
  std::vector<uint64_t> out;
  for (const auto& f : files) out.push_back(f.first);
  return out;
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

void Corrupt(const std::string& path, size_t from_end) {
  std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
  f.seekg(-static_cast<std::streamoff>(from_end), std::ios::end);
  char c = 0;
  f.read(&c, 1);
  c ^= 0x20;
  f.seekp(-static_cast<std::streamoff>(from_end), std::ios::end);
  f.write(&c, 1);
}

void Truncate(const std::string& path, uintmax_t cut) {
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - cut);
}

const std::vector<int64_t> kShapeW = {40, 25};
const std::vector<int64_t> kShapeB = {10};

// Registers w and b, gives them Adam, and returns the client.
std::unique_ptr<Client> RegisterWithAdam(const Server& server) {
  auto c = ConnectClient(server.port());
  std::vector<float> w(1000, 0.5f), b(10, -1.0f);
  VariableSpec specs[] = {{"w", kShapeW, w}, {"b", kShapeB, b}};
  std::vector<bool> created;
  uint64_t version;
  EXPECT_TRUE(c->Register(specs, &created, &version).ok());
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.learning_rate = 0.01f;
  EXPECT_TRUE(c->SetOptimizer(adam, {}, &version).ok());
  return c;
}

// A gradient push of seeded random values to w and b.
void PushGradient(Client* c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> gw(1000), gb(10);
  for (float& g : gw) g = dist(rng);
  for (float& g : gb) g = dist(rng);
  TensorView views[] = {{"w", kShapeW, gw}, {"b", kShapeB, gb}};
  uint64_t version;
  ASSERT_TRUE(c->Push(UpdateKind::kGradient, views, {}, &version).ok());
}

void PushDelta(Client* c) {
  std::vector<float> d(10, 1.0f);
  TensorView views[] = {{"b", kShapeB, d}};
  uint64_t version;
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, views, {}, &version).ok());
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

ServerOptions SnapshotOptions(const std::string& dir) {
  ServerOptions o = TestServerOptions();
  o.snapshot_dir = dir;
  return o;
}

TEST(SnapshotServerTest, ResumedServerTakesTheSameNextStepBitForBit) {
  TempDir dir;
  auto a = StartServer(SnapshotOptions(dir.path()));
  auto ca = RegisterWithAdam(*a);
  for (uint32_t seed = 1; seed <= 5; ++seed) PushGradient(ca.get(), seed);
  std::string path;
  Status s = a->Snapshot(&path);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(path, dir.Sub(storage::SnapshotFileName(5)));
  auto stats = StatsOf(*a);
  EXPECT_EQ(stats["snapshots_written"], 1u);
  EXPECT_EQ(stats["snapshot_version"], 5u);
  EXPECT_EQ(stats["snapshot_errors"], 0u);
  EXPECT_EQ(stats["resumed_version"], 0u);

  // The server that never stopped takes step 6.
  PushGradient(ca.get(), 6);
  uint64_t va = 0;
  const std::vector<Tensor> expected = PullAll(ca.get(), &va);
  EXPECT_EQ(va, 6u);
  ca.reset();
  a->Stop();  // writes the final snapshot (version 6)
  EXPECT_EQ(SnapshotVersions(dir.path()), (std::vector<uint64_t>{6, 5}));

  // A server resumed from the version-5 file takes the same step 6.
  ServerOptions o = TestServerOptions();
  o.resume_from = path;
  auto b = StartServer(o);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->version(), 5u);
  EXPECT_EQ(StatsOf(*b)["resumed_version"], 5u);
  auto cb = ConnectClient(b->port());
  PushGradient(cb.get(), 6);
  uint64_t vb = 0;
  ExpectBitIdentical(PullAll(cb.get(), &vb), expected);
  EXPECT_EQ(vb, 6u);

  // Resuming from the directory takes the newest: the final snapshot.
  o.resume_from = dir.path();
  auto c = StartServer(o);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->version(), 6u);
  auto cc = ConnectClient(c->port());
  uint64_t vc = 0;
  ExpectBitIdentical(PullAll(cc.get(), &vc), expected);
}

TEST(SnapshotServerTest, EveryNVersions) {
  TempDir dir;
  ServerOptions o = SnapshotOptions(dir.path());
  o.snapshot_every_versions = 5;
  o.snapshot_keep = 10;
  auto server = StartServer(o);
  auto c = RegisterWithAdam(*server);
  for (int i = 0; i < 5; ++i) PushDelta(c.get());
  ASSERT_TRUE(WaitForStat(*server, "snapshots_written", 1));
  EXPECT_EQ(StatsOf(*server)["snapshot_version"], 5u);
  for (int i = 0; i < 4; ++i) PushDelta(c.get());
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 1u);  // 9 - 5 < 5
  PushDelta(c.get());
  ASSERT_TRUE(WaitForStat(*server, "snapshots_written", 2));
  EXPECT_EQ(StatsOf(*server)["snapshot_version"], 10u);
  EXPECT_EQ(SnapshotVersions(dir.path()), (std::vector<uint64_t>{10, 5}));
}

TEST(SnapshotServerTest, EveryNSecondsOnlyWhenTheModelChanged) {
  TempDir dir;
  ServerOptions o = SnapshotOptions(dir.path());
  o.snapshot_every_s = 0.3;
  auto server = StartServer(o);
  auto c = RegisterWithAdam(*server);  // registering counts as a change
  ASSERT_TRUE(WaitForStat(*server, "snapshots_written", 1));
  EXPECT_EQ(StatsOf(*server)["snapshot_version"], 0u);
  // Nothing changes: no new snapshot.
  std::this_thread::sleep_for(std::chrono::milliseconds(900));
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 1u);
  PushDelta(c.get());
  ASSERT_TRUE(WaitForStat(*server, "snapshots_written", 2));
  EXPECT_EQ(StatsOf(*server)["snapshot_version"], 1u);
  EXPECT_EQ(SnapshotVersions(dir.path()), (std::vector<uint64_t>{1, 0}));
}

TEST(SnapshotServerTest, KeepsTheNewestK) {
  TempDir dir;
  ServerOptions o = SnapshotOptions(dir.path());
  o.snapshot_keep = 2;
  auto server = StartServer(o);
  auto c = RegisterWithAdam(*server);
  for (int i = 0; i < 4; ++i) {
    PushDelta(c.get());
    ASSERT_TRUE(server->Snapshot(nullptr).ok());
  }
  EXPECT_EQ(SnapshotVersions(dir.path()), (std::vector<uint64_t>{4, 3}));
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 4u);
}

TEST(SnapshotServerTest, FinalSnapshotOnStopOnlyAfterChanges) {
  TempDir dir;
  {
    auto idle = StartServer(SnapshotOptions(dir.path()));
    idle->Stop();
  }
  EXPECT_TRUE(SnapshotVersions(dir.path()).empty());

  auto server = StartServer(SnapshotOptions(dir.path()));
  auto c = RegisterWithAdam(*server);
  PushDelta(c.get());
  PushDelta(c.get());
  c.reset();
  server->Stop();
  EXPECT_EQ(SnapshotVersions(dir.path()), (std::vector<uint64_t>{2}));
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 1u);
  server->Stop();  // idempotent: nothing more written
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 1u);
}

// Writes snapshots of versions 1 and 2 into `dir`; returns their paths.
std::vector<std::string> TwoSnapshots(const std::string& dir) {
  auto server = StartServer(SnapshotOptions(dir));
  auto c = RegisterWithAdam(*server);
  std::vector<std::string> paths(2);
  PushGradient(c.get(), 1);
  EXPECT_TRUE(server->Snapshot(&paths[0]).ok());
  PushGradient(c.get(), 2);
  EXPECT_TRUE(server->Snapshot(&paths[1]).ok());
  return paths;
}

void ExpectResumeFallsBack(const std::string& dir, const std::string& newest,
                           const std::string& why) {
  ServerOptions o = TestServerOptions();
  o.resume_from = dir;
  ::testing::internal::CaptureStderr();
  std::unique_ptr<Server> server;
  Status s = Server::Start(o, &server);
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(server->version(), 1u);
  EXPECT_EQ(StatsOf(*server)["resumed_version"], 1u);
  EXPECT_TRUE(Contains(log, "resume: skipping " + newest + ": " + why)) << log;
  EXPECT_TRUE(Contains(log, "falling back to an older snapshot")) << log;
  EXPECT_TRUE(Contains(log, "resumed from " + dir + "/" + storage::SnapshotFileName(1))) << log;
}

TEST(SnapshotServerTest, ResumeSkipsACorruptNewestSnapshot) {
  TempDir dir;
  const std::vector<std::string> paths = TwoSnapshots(dir.path());
  // The records end with b's tensor record (113 bytes: values from its
  // byte 69), its two 68-byte slot records and the 20-byte trailer: byte
  // 200 from the end is b's first value.
  Corrupt(paths[1], 200);
  ExpectResumeFallsBack(dir.path(), paths[1], "tensor 'b' checksum mismatch (record 3 at byte ");
}

TEST(SnapshotServerTest, ResumeSkipsATruncatedNewestSnapshot) {
  TempDir dir;
  const std::vector<std::string> paths = TwoSnapshots(dir.path());
  const uintmax_t size = std::filesystem::file_size(paths[1]);
  Truncate(paths[1], 100);
  ExpectResumeFallsBack(dir.path(), paths[1], "truncated at byte " + std::to_string(size - 100));
}

TEST(SnapshotServerTest, ResumeWithoutAValidSnapshotFailsClearly) {
  TempDir dir;
  ServerOptions o = TestServerOptions();
  std::unique_ptr<Server> server;

  o.resume_from = dir.Sub("missing");
  Status s = Server::Start(o, &server);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "missing' cannot be used")) << s.message();

  o.resume_from = dir.path();
  s = Server::Start(o, &server);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "holds no snapshot file")) << s.message();

  const std::vector<std::string> paths = TwoSnapshots(dir.Sub("snaps"));
  Truncate(paths[0], 1);
  Corrupt(paths[1], 30);
  o.resume_from = dir.Sub("snaps");
  s = Server::Start(o, &server);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "holds no valid snapshot (2 tried)")) << s.message();
  EXPECT_TRUE(Contains(s.message(), paths[0] + ": truncated at byte")) << s.message();
  EXPECT_TRUE(Contains(s.message(), paths[1] + ": ")) << s.message();
  EXPECT_EQ(server, nullptr);
}

TEST(SnapshotServerTest, BadOptions) {
  TempDir dir;
  std::unique_ptr<Server> server;
  ServerOptions o = TestServerOptions();
  o.snapshot_every_versions = 3;  // no snapshot_dir
  EXPECT_EQ(Server::Start(o, &server).code(), StatusCode::kInvalidArgument);

  o = SnapshotOptions(dir.path());
  o.snapshot_every_s = -1;
  EXPECT_EQ(Server::Start(o, &server).code(), StatusCode::kInvalidArgument);

  std::ofstream(dir.Sub("file")) << "x";
  o = SnapshotOptions(dir.Sub("file"));
  Status s = Server::Start(o, &server);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "snapshot_dir")) << s.message();

  // Missing directories are created.
  o = SnapshotOptions(dir.Sub("a/b/c"));
  ASSERT_TRUE(Server::Start(o, &server).ok());
  EXPECT_TRUE(std::filesystem::is_directory(dir.Sub("a/b/c")));

  auto plain = StartServer();
  s = plain->Snapshot(nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "snapshot_dir")) << s.message();
}

TEST(SnapshotServerTest, WriteErrorsAreCountedAndTheServerKeepsServing) {
  TempDir dir;
  ServerOptions o = SnapshotOptions(dir.Sub("snaps"));
  o.snapshot_every_versions = 1;
  auto server = StartServer(o);
  auto c = RegisterWithAdam(*server);
  std::filesystem::remove_all(dir.Sub("snaps"));
  std::string path;
  Status s = server->Snapshot(&path);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.message(), dir.Sub("snaps/.snapshot-"))) << s.message();
  EXPECT_EQ(StatsOf(*server)["snapshot_errors"], 1u);
  PushDelta(c.get());  // the background write fails too
  ASSERT_TRUE(WaitForStat(*server, "snapshot_errors", 2));
  uint64_t version = 0;
  EXPECT_EQ(PullAll(c.get(), &version).size(), 2u);
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(StatsOf(*server)["snapshots_written"], 0u);
  c.reset();
  server->Stop();  // the final snapshot fails as well, and is counted
  EXPECT_EQ(StatsOf(*server)["snapshot_errors"], 3u);
}

// Snapshots (background and requested) while clients push: no deadlock,
// and every variable of every snapshot is one consistent state (each push
// adds 1 to every element of every variable).
TEST(SnapshotServerTest, SnapshotsWhilePushesRun) {
  TempDir dir;
  ServerOptions o = SnapshotOptions(dir.path());
  o.snapshot_every_versions = 1;
  o.snapshot_keep = 0;
  o.update_threads = 2;
  auto server = StartServer(o);
  const std::vector<int64_t> shape = {1 << 18};
  std::vector<float> zeros(1 << 18, 0.0f), ones(1 << 18, 1.0f);
  {
    auto c = ConnectClient(server->port());
    VariableSpec specs[] = {{"x", shape, zeros}, {"y", shape, zeros}};
    std::vector<bool> created;
    uint64_t version;
    ASSERT_TRUE(c->Register(specs, &created, &version).ok());
  }
  std::atomic<bool> stop{false};
  std::vector<std::thread> pushers;
  for (int t = 0; t < 2; ++t) {
    pushers.emplace_back([&] {
      auto c = ConnectClient(server->port());
      TensorView views[] = {{"x", shape, ones}, {"y", shape, ones}};
      uint64_t version;
      while (!stop.load()) ASSERT_TRUE(c->Push(UpdateKind::kDelta, views, {}, &version).ok());
    });
  }
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(server->Snapshot(nullptr).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(30));  // lets the background thread in
  }
  stop.store(true);
  for (auto& t : pushers) t.join();
  server->Stop();
  std::vector<std::pair<uint64_t, std::string>> files;
  ASSERT_TRUE(storage::ListSnapshots(dir.path(), &files).ok());
  EXPECT_GE(files.size(), 2u);
  for (const auto& [version, file] : files) {
    storage::SnapshotData data;
    ASSERT_TRUE(storage::ReadSnapshot(file, &data).ok()) << file;
    for (const storage::VariableState& v : data.variables) {
      for (float x : v.values) ASSERT_EQ(x, v.values[0]) << file << " " << v.name;
      EXPECT_GE(v.values[0], static_cast<float>(version));
    }
  }
  EXPECT_EQ(files[0].first, server->version());  // the final snapshot
}

TEST(SnapshotServerTest, StatsKeysWithoutSnapshots) {
  auto server = StartServer();
  auto stats = StatsOf(*server);
  for (const char* key :
       {"snapshots_written", "snapshot_errors", "snapshot_version", "resumed_version"}) {
    ASSERT_EQ(stats.count(key), 1u) << key;
    EXPECT_EQ(stats[key], 0u) << key;
  }
}

}  // namespace
}  // namespace tensorspark
