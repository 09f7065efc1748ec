// Membership, fencing and the sync / bounded-staleness modes over loopback.
#include <gtest/gtest.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <map>
#include <string>
#include <thread>

#include "test_util.h"

namespace tensorspark::testing {
namespace {

using std::chrono::steady_clock;

double Since(steady_clock::time_point t) {
  return std::chrono::duration<double>(steady_clock::now() - t).count();
}

class ModesTest : public ::testing::Test {
 protected:
  void StartRun(ConsistencyMode mode, uint32_t staleness = 0, float heartbeat_timeout_s = 30,
                float wait_timeout_s = 10, int metrics_port = -1) {
    ServerOptions o = TestServerOptions();
    o.metrics_port = metrics_port;
    server_ = StartServer(o);
    ASSERT_TRUE(server_);
    driver_ = ConnectClient(server_->port());
    ASSERT_TRUE(driver_);
    const int64_t shape[] = {2};
    const float init[] = {0, 0};
    VariableSpec spec{"w", shape, init};
    std::vector<bool> created;
    uint64_t v;
    ASSERT_TRUE(driver_->Register({&spec, 1}, &created, &v).ok());
    RunConfig run;
    run.mode = mode;
    run.staleness = staleness;
    run.heartbeat_timeout_s = heartbeat_timeout_s;
    run.wait_timeout_s = wait_timeout_s;
    Status s = driver_->Configure(run);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  std::unique_ptr<Client> Worker(int32_t partition, int32_t attempt = 0, bool join = true) {
    ClientOptions o = TestClientOptions(server_->port());
    o.partition_id = partition;
    o.attempt = attempt;
    std::unique_ptr<Client> c;
    Status s = Client::Connect(o, &c);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (join && c) {
      uint64_t clock = 99;
      s = c->Join(&clock);
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return c;
  }

  static Status PushDelta(Client* c, float x) {
    const int64_t shape[] = {2};
    const float d[] = {x, x};
    TensorView t{"w", shape, d};
    uint64_t v;
    return c->Push(UpdateKind::kDelta, {&t, 1}, PushOptions{}, &v);
  }

  static Status PullW(Client* c, float* out) {
    float w[2] = {-1, -1};
    MutableTensorView view{"w", w};
    uint64_t v;
    Status s = c->Pull({&view, 1}, &v);
    *out = w[0];
    return s;
  }

  std::map<std::string, uint64_t> StatsMap() {
    std::map<std::string, uint64_t> m;
    for (auto& [k, v] : server_->Stats()) m[k] = v;
    return m;
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> driver_;
};

TEST_F(ModesTest, SyncRoundAveragesAndPullWaitsForTheRound) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1), w2 = Worker(2);
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  std::atomic<bool> done{false};
  float seen = -1;
  auto pull = std::async(std::launch::async, [&] {
    Status s = PullW(w0.get(), &seen);
    done = true;
    return s;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(done.load()) << "the pull must wait for round 0";
  ASSERT_TRUE(PushDelta(w1.get(), 2).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(done.load());
  EXPECT_EQ(server_->version(), 0u);
  ASSERT_TRUE(PushDelta(w2.get(), 3).ok());
  Status s = pull.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(seen, 2.0f);  // w += mean(1, 2, 3)
  EXPECT_EQ(server_->version(), 1u);
  // The driver never waits, and a second round averages again.
  float d = 0;
  ASSERT_TRUE(PullW(driver_.get(), &d).ok());
  EXPECT_EQ(d, 2.0f);
  ASSERT_TRUE(PushDelta(w0.get(), 3).ok());
  ASSERT_TRUE(PushDelta(w1.get(), 3).ok());
  ASSERT_TRUE(PushDelta(w2.get(), 6).ok());
  ASSERT_TRUE(PullW(w1.get(), &seen).ok());
  EXPECT_EQ(seen, 6.0f);
  EXPECT_EQ(server_->version(), 2u);
  auto stats = StatsMap();
  EXPECT_EQ(stats["members"], 3u);
  EXPECT_EQ(stats["worker_clock{partition=\"1\",attempt=\"0\"}"], 2u);
}

// fp16 and bf16 pushes of a sync round are decoded into its accumulator
// (the first push of a variable and the later ones).
TEST_F(ModesTest, SyncRoundAveragesEncodedPushes) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1);
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 2;
  o.encoding = WireEncoding::kBFloat16;
  std::unique_ptr<Client> w2;
  ASSERT_TRUE(Client::Connect(o, &w2).ok());
  uint64_t clock = 0;
  ASSERT_TRUE(w2->Join(&clock).ok());
  o.partition_id = 0;
  o.encoding = WireEncoding::kFloat16;
  std::unique_ptr<Client> w0_half;
  ASSERT_TRUE(Client::Connect(o, &w0_half).ok());  // a second connection of member 0
  ASSERT_TRUE(PushDelta(w0_half.get(), 1.5f).ok());
  ASSERT_TRUE(PushDelta(w1.get(), 2).ok());
  ASSERT_TRUE(PushDelta(w2.get(), 5.5f).ok());
  float seen = -1;
  ASSERT_TRUE(PullW(w0.get(), &seen).ok());
  EXPECT_EQ(seen, 3.0f);  // mean(1.5, 2, 5.5), all exact in fp16 and bf16
  EXPECT_EQ(server_->version(), 1u);
}

TEST_F(ModesTest, SyncEarlyPushWaitsForTheOpenRound) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1);
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  std::atomic<bool> done{false};
  auto second = std::async(std::launch::async, [&] {
    Status s = PushDelta(w0.get(), 10);
    done = true;
    return s;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(done.load());
  ASSERT_TRUE(PushDelta(w1.get(), 3).ok());
  ASSERT_TRUE(second.get().ok());
  ASSERT_TRUE(PushDelta(w1.get(), 20).ok());  // closes round 1
  float w = 0;
  ASSERT_TRUE(PullW(w0.get(), &w).ok());
  EXPECT_EQ(w, 2.0f + 15.0f);
}

TEST_F(ModesTest, SyncGradientRoundUsesTheMeanAndRefusesMixedKinds) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1);
  const int64_t shape[] = {2};
  const float g0[] = {1, 1}, g1[] = {3, 3};
  TensorView t0{"w", shape, g0}, t1{"w", shape, g1};
  uint64_t v;
  PushOptions no_lr;  // no optimizer and no learning rate: refused up front
  EXPECT_EQ(w0->Push(UpdateKind::kGradient, {&t0, 1}, no_lr, &v).code(),
            StatusCode::kInvalidArgument);
  PushOptions sgd;
  sgd.learning_rate = 0.5f;
  ASSERT_TRUE(w0->Push(UpdateKind::kGradient, {&t0, 1}, sgd, &v).ok());
  EXPECT_EQ(PushDelta(w1.get(), 1).code(), StatusCode::kInvalidArgument);  // another kind
  ASSERT_TRUE(w1->Push(UpdateKind::kGradient, {&t1, 1}, sgd, &v).ok());
  float w = 0;
  ASSERT_TRUE(PullW(w0.get(), &w).ok());
  EXPECT_EQ(w, -1.0f);  // w -= 0.5 * mean(1, 3)
  EXPECT_EQ(v, 1u);
}

TEST_F(ModesTest, SyncWorkerThatDiesIsNotWaitedFor) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1), w2 = Worker(2);
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  ASSERT_TRUE(PushDelta(w1.get(), 2).ok());
  auto t = steady_clock::now();
  auto pull = std::async(std::launch::async, [&] {
    float w = 0;
    Status s = PullW(w0.get(), &w);
    return std::make_pair(s, w);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  w2->Close();  // like a killed process: no LEAVE
  auto [s, w] = pull.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(w, 1.5f);
  EXPECT_LT(Since(t), 2.0);
  auto stats = StatsMap();
  EXPECT_EQ(stats["members"], 2u);
  EXPECT_EQ(stats["workers_lost"], 1u);
  EXPECT_EQ(stats["workers_retried"], 0u);
}

TEST_F(ModesTest, SyncSilentWorkerIsDroppedAfterTheHeartbeatTimeout) {
  StartRun(ConsistencyMode::kSync, 0, /*heartbeat_timeout_s=*/0.5f);
  auto w0 = Worker(0), w1 = Worker(1), w2 = Worker(2);  // w2 stays silent
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  ASSERT_TRUE(PushDelta(w1.get(), 2).ok());
  auto t = steady_clock::now();
  float w = 0;
  Status s = PullW(w0.get(), &w);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(w, 1.5f);
  EXPECT_GT(Since(t), 0.25);
  EXPECT_LT(Since(t), 3.0);
  // The dropped worker's later push is refused: it must join again.
  EXPECT_EQ(PushDelta(w2.get(), 5).code(), StatusCode::kInvalidArgument);
}

TEST_F(ModesTest, WaitingMemberIsNotSilent) {
  StartRun(ConsistencyMode::kSync, 0, /*heartbeat_timeout_s=*/0.3f);
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 1;
  o.heartbeat_interval_s = 0.05;
  std::unique_ptr<Client> busy;  // long local work, kept live by heartbeats
  ASSERT_TRUE(Client::Connect(o, &busy).ok());
  ASSERT_TRUE(busy->Join(nullptr).ok());
  auto w0 = Worker(0);
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  auto pull = std::async(std::launch::async, [&] {
    float w = 0;
    Status s = PullW(w0.get(), &w);
    return std::make_pair(s, w);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  EXPECT_EQ(StatsMap()["members"], 2u) << "the waiting worker must not be dropped";
  ASSERT_TRUE(PushDelta(busy.get(), 3).ok());
  auto [s, w] = pull.get();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(w, 2.0f);
}

TEST_F(ModesTest, EmptyPushesStillCloseTheRound) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1);
  uint64_t v;
  ASSERT_TRUE(w0->Push(UpdateKind::kDelta, {}, PushOptions{}, &v).ok());
  ASSERT_TRUE(w1->Push(UpdateKind::kDelta, {}, PushOptions{}, &v).ok());
  float w = -1;
  ASSERT_TRUE(PullW(w0.get(), &w).ok());
  EXPECT_EQ(w, 0.0f);
  EXPECT_EQ(StatsMap()["sync_round"], 1u);
}

TEST_F(ModesTest, HeartbeatThreadKeepsAQuietMemberLive) {
  StartRun(ConsistencyMode::kSync, 0, /*heartbeat_timeout_s=*/0.5f);
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 0;
  o.heartbeat_interval_s = 0.1;
  std::unique_ptr<Client> c;
  ASSERT_TRUE(Client::Connect(o, &c).ok());
  ASSERT_TRUE(c->Join(nullptr).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(900));
  EXPECT_EQ(StatsMap()["members"], 1u);
  ASSERT_TRUE(c->Leave().ok());
  EXPECT_EQ(StatsMap()["members"], 0u);
}

TEST_F(ModesTest, BoundedStalenessBlocksTheFastWorkerUntilTheSlowOneCatchesUp) {
  StartRun(ConsistencyMode::kBoundedStaleness, 1);
  auto fast = Worker(0), slow = Worker(1);
  float w = 0;
  ASSERT_TRUE(PushDelta(fast.get(), 1).ok());  // clock 1
  ASSERT_TRUE(PullW(fast.get(), &w).ok());     // needs min clock >= 0
  EXPECT_EQ(w, 1.0f);                          // applied on arrival
  ASSERT_TRUE(PushDelta(fast.get(), 1).ok());  // clock 2
  std::atomic<bool> done{false};
  auto pull = std::async(std::launch::async, [&] {
    float x;
    Status s = PullW(fast.get(), &x);
    done = true;
    return s;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_FALSE(done.load()) << "clock 2 with staleness 1 waits for clock 1";
  ASSERT_TRUE(PushDelta(slow.get(), 1).ok());  // slow reaches clock 1
  ASSERT_TRUE(pull.get().ok());
  // Clock 3 needs the slow worker at 2; it dies instead.
  ASSERT_TRUE(PushDelta(fast.get(), 1).ok());
  auto t = steady_clock::now();
  auto pull2 = std::async(std::launch::async, [&] {
    float x;
    return PullW(fast.get(), &x);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  slow->Close();
  ASSERT_TRUE(pull2.get().ok());
  EXPECT_LT(Since(t), 2.0);
}

TEST_F(ModesTest, BoundedStalenessSilentWorkerIsDropped) {
  StartRun(ConsistencyMode::kBoundedStaleness, 1, /*heartbeat_timeout_s=*/0.5f);
  auto fast = Worker(0), slow = Worker(1);
  ASSERT_TRUE(PushDelta(fast.get(), 1).ok());
  ASSERT_TRUE(PushDelta(fast.get(), 1).ok());
  auto t = steady_clock::now();
  float w = 0;
  Status s = PullW(fast.get(), &w);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_GT(Since(t), 0.25);
  EXPECT_LT(Since(t), 3.0);
  EXPECT_EQ(w, 2.0f);
}

TEST_F(ModesTest, NewerAttemptFencesTheOlderOne) {
  StartRun(ConsistencyMode::kAsync);
  auto old_attempt = Worker(3, 0);
  auto retry = Worker(3, 1);
  Status s = PushDelta(old_attempt.get(), 1);
  EXPECT_EQ(s.code(), StatusCode::kFenced) << s.ToString();
  EXPECT_NE(s.message().find("replaced by attempt 1"), std::string::npos) << s.message();
  EXPECT_EQ(old_attempt->Join(nullptr).code(), StatusCode::kFenced);
  EXPECT_TRUE(PushDelta(retry.get(), 1).ok());
  auto stats = StatsMap();
  EXPECT_EQ(stats["refused{reason=\"fenced\"}"], 2u);
  EXPECT_EQ(stats["members"], 1u);
  EXPECT_EQ(stats.count("worker_clock{partition=\"3\",attempt=\"0\"}"), 0u);
  EXPECT_EQ(stats["worker_clock{partition=\"3\",attempt=\"1\"}"], 1u);
  EXPECT_EQ(stats["workers_retried"], 1u);
  EXPECT_EQ(stats["workers_lost"], 1u);  // attempt 0, replaced
}

// Spark numbers task attempts per application, and a driver restarted
// against the same server starts again from 0: each Configure starts a new
// fencing epoch, and a member left over from the earlier run is refused.
TEST_F(ModesTest, ConfigureStartsANewRunThatFencesTheOldMembers) {
  StartRun(ConsistencyMode::kAsync, 0, /*heartbeat_timeout_s=*/0.3f);
  auto zombie = Worker(1, 7);
  ASSERT_TRUE(PushDelta(zombie.get(), 1).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(800));  // dropped as silent
  RunConfig run;
  run.mode = ConsistencyMode::kAsync;
  Status s = driver_->Configure(run);
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto fresh = Worker(1, 0);  // attempt numbers restart: not fenced by 7
  ASSERT_TRUE(fresh);
  s = PushDelta(zombie.get(), 1);
  EXPECT_EQ(s.code(), StatusCode::kFenced) << s.ToString();
  EXPECT_NE(s.message().find("earlier run"), std::string::npos) << s.message();
  EXPECT_EQ(zombie->Join(nullptr).code(), StatusCode::kFenced);
  zombie->Close();  // must not drop the new run's member
  ASSERT_TRUE(PushDelta(fresh.get(), 2).ok());
  auto stats = StatsMap();
  EXPECT_EQ(stats["members"], 1u);
  EXPECT_EQ(stats["worker_clock{partition=\"1\",attempt=\"0\"}"], 1u);
  EXPECT_EQ(stats["refused{reason=\"fenced\"}"], 2u);
  float w = 0;
  ASSERT_TRUE(PullW(fresh.get(), &w).ok());
  EXPECT_EQ(w, 3.0f);  // 1 from the zombie's first run, 2 from the new member
}

TEST_F(ModesTest, WaitTimeoutNamesTheMissingPartitions) {
  StartRun(ConsistencyMode::kSync, 0, 30, /*wait_timeout_s=*/0.3f);
  auto w0 = Worker(0), w1 = Worker(1), w2 = Worker(2);
  ASSERT_TRUE(PushDelta(w1.get(), 1).ok());
  float w;
  auto t = steady_clock::now();
  Status s = PullW(w1.get(), &w);
  EXPECT_EQ(s.code(), StatusCode::kTimeout) << s.ToString();
  EXPECT_NE(s.message().find("round 0: waiting for partitions 0, 2"), std::string::npos)
      << s.message();
  EXPECT_GT(Since(t), 0.2);
  EXPECT_LT(Since(t), 3.0);
}

TEST_F(ModesTest, ConfigureIsRefusedWhileWorkersAreLive) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0);
  RunConfig run;
  EXPECT_EQ(driver_->Configure(run).code(), StatusCode::kInvalidArgument);
  run.wait_timeout_s = -1;
  EXPECT_EQ(driver_->Configure(run).code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(w0->Leave().ok());
  run.wait_timeout_s = 5;
  EXPECT_TRUE(driver_->Configure(run).ok());
  EXPECT_EQ(driver_->Join(nullptr).code(), StatusCode::kInvalidArgument);  // not a worker
}

TEST_F(ModesTest, StopWakesAWaitingPull) {
  StartRun(ConsistencyMode::kSync);
  auto w0 = Worker(0), w1 = Worker(1);
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  auto pull = std::async(std::launch::async, [&] {
    float w;
    return PullW(w0.get(), &w);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  auto t = steady_clock::now();
  server_->Stop();
  Status s = pull.get();
  EXPECT_EQ(s.code(), StatusCode::kShuttingDown) << s.ToString();
  EXPECT_LT(Since(t), 2.0);
}

std::string HttpGet(uint16_t port, const std::string& path) {
  return RequestReply(port, "GET " + path + " HTTP/1.0\r\nHost: x\r\n\r\n");
}

TEST_F(ModesTest, MetricsStalenessAndPrometheusEndpoint) {
  StartRun(ConsistencyMode::kAsync, 0, 30, 10, /*metrics_port=*/0);
  ASSERT_GT(server_->metrics_port(), 0);
  auto a = Worker(0), b = Worker(1);
  float w;
  ASSERT_TRUE(PullW(a.get(), &w).ok());
  ASSERT_TRUE(PullW(b.get(), &w).ok());
  ASSERT_TRUE(PushDelta(a.get(), 1).ok());  // staleness 0
  ASSERT_TRUE(PushDelta(b.get(), 1).ok());  // staleness 1 (a's push since b's pull)
  ASSERT_TRUE(PushDelta(b.get(), 1).ok());  // staleness 2
  auto stats = StatsMap();
  EXPECT_EQ(stats["worker_clock{partition=\"0\",attempt=\"0\"}"], 1u);
  EXPECT_EQ(stats["worker_clock{partition=\"1\",attempt=\"0\"}"], 2u);
  EXPECT_EQ(stats.count("worker_last_seen_ms{partition=\"1\",attempt=\"0\"}"), 1u);
  EXPECT_EQ(stats["worker_connections{partition=\"1\",attempt=\"0\"}"], 1u);
  EXPECT_EQ(stats["staleness_count"], 3u);
  EXPECT_EQ(stats["staleness_sum"], 3u);
  EXPECT_EQ(stats["staleness_bucket{le=\"0\"}"], 1u);
  EXPECT_EQ(stats["staleness_bucket{le=\"1\"}"], 2u);
  EXPECT_EQ(stats["staleness_bucket{le=\"2\"}"], 3u);
  EXPECT_EQ(stats["staleness_bucket{le=\"+Inf\"}"], 3u);
  EXPECT_EQ(stats["refused{reason=\"fenced\"}"], 0u);
  // Per member: the last push's staleness, and sum and count.
  EXPECT_EQ(stats["worker_staleness{partition=\"0\",attempt=\"0\"}"], 0u);
  EXPECT_EQ(stats["worker_staleness_count{partition=\"0\",attempt=\"0\"}"], 1u);
  EXPECT_EQ(stats["worker_staleness{partition=\"1\",attempt=\"0\"}"], 2u);
  EXPECT_EQ(stats["worker_staleness_sum{partition=\"1\",attempt=\"0\"}"], 3u);
  EXPECT_EQ(stats["worker_staleness_count{partition=\"1\",attempt=\"0\"}"], 2u);

  std::string page = HttpGet(static_cast<uint16_t>(server_->metrics_port()), "/metrics");
  EXPECT_NE(page.find("200 OK"), std::string::npos) << page;
  EXPECT_NE(page.find("tensorspark_worker_clock{partition=\"1\",attempt=\"0\"} 2"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("tensorspark_staleness_bucket{le=\"+Inf\"} 3"), std::string::npos) << page;
  EXPECT_NE(page.find("tensorspark_members 2"), std::string::npos) << page;
  EXPECT_NE(page.find("tensorspark_worker_staleness{partition=\"1\",attempt=\"0\"} 2"),
            std::string::npos)
      << page;
}

// Sync rounds count each member's staleness too; each fenced attempt counts
// once in workers_fenced, however many of its frames are refused.
TEST_F(ModesTest, PerWorkerStalenessInSyncAndFencedAttemptsCountedOnce) {
  StartRun(ConsistencyMode::kSync);
  auto a = Worker(0), b = Worker(1);
  float w;
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(PullW(a.get(), &w).ok());
    ASSERT_TRUE(PullW(b.get(), &w).ok());
    ASSERT_TRUE(PushDelta(a.get(), 1).ok());
    ASSERT_TRUE(PushDelta(b.get(), 1).ok());
  }
  auto stats = StatsMap();
  EXPECT_EQ(stats["worker_staleness_count{partition=\"0\",attempt=\"0\"}"], 2u);
  EXPECT_EQ(stats["worker_staleness_count{partition=\"1\",attempt=\"0\"}"], 2u);
  EXPECT_EQ(stats["worker_staleness_sum{partition=\"1\",attempt=\"0\"}"], 0u);
  EXPECT_EQ(stats["workers_fenced"], 0u);

  auto retry = Worker(1, 1);  // fences attempt 0 of partition 1
  EXPECT_EQ(PushDelta(b.get(), 1).code(), StatusCode::kFenced);
  EXPECT_EQ(PushDelta(b.get(), 1).code(), StatusCode::kFenced);
  EXPECT_EQ(b->Join(nullptr).code(), StatusCode::kFenced);
  stats = StatsMap();
  EXPECT_EQ(stats["refused{reason=\"fenced\"}"], 3u);
  EXPECT_EQ(stats["workers_fenced"], 1u);
  EXPECT_EQ(stats["worker_staleness_count{partition=\"1\",attempt=\"1\"}"], 0u);
}

TEST_F(ModesTest, RefusedFramesAreCountedByReason) {
  StartRun(ConsistencyMode::kAsync);
  RawConn bad;
  ASSERT_TRUE(bad.Connect(server_->port()).ok());
  ASSERT_TRUE(bad.Handshake("wrong-secret-0123456789abcdef").code() != StatusCode::kOk);
  RawConn crc;
  ASSERT_TRUE(crc.Connect(server_->port()).ok());
  ASSERT_TRUE(crc.Handshake().ok());
  RawConn::FrameOptions fo;
  fo.checksum = 1234;
  ASSERT_TRUE(crc.Send(static_cast<uint16_t>(protocol::Opcode::kStats), 2, {}, fo).ok());
  (void)crc.ReadError(2);
  RawConn version;
  ASSERT_TRUE(version.Connect(server_->port()).ok());
  ASSERT_TRUE(version.Handshake().ok());
  RawConn::FrameOptions v2;
  v2.version = 2;
  ASSERT_TRUE(version.Send(static_cast<uint16_t>(protocol::Opcode::kStats), 3, {}, v2).ok());
  EXPECT_EQ(version.ReadError(3).code(), StatusCode::kUnsupportedVersion);
  RawConn big;
  ASSERT_TRUE(big.Connect(server_->port()).ok());
  ASSERT_TRUE(big.Handshake().ok());
  RawConn::FrameOptions huge;
  huge.payload_len = uint64_t{1} << 40;
  ASSERT_TRUE(big.Send(static_cast<uint16_t>(protocol::Opcode::kPush), 4, {}, huge).ok());
  EXPECT_EQ(big.ReadError(4).code(), StatusCode::kFrameTooLarge);
  auto stats = StatsMap();
  EXPECT_EQ(stats["refused{reason=\"auth\"}"], 1u);
  EXPECT_EQ(stats["refused{reason=\"bad_checksum\"}"], 1u);
  EXPECT_EQ(stats["refused{reason=\"bad_version\"}"], 1u);
  EXPECT_EQ(stats["refused{reason=\"frame_too_large\"}"], 1u);
}

TEST_F(ModesTest, MalformedMembershipFramesAreProtocolErrors) {
  StartRun(ConsistencyMode::kAsync);
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server_->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());  // partition 1, attempt 0
  ASSERT_TRUE(raw.Send(protocol::Opcode::kJoin, 3, {1}).ok());
  EXPECT_EQ(raw.ReadError(3).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> config;
  protocol::EncodeConfigure(RunConfig{}, &config);
  config[2] = 7;  // reserved
  ASSERT_TRUE(raw.Send(protocol::Opcode::kConfigure, 4, config).ok());
  EXPECT_EQ(raw.ReadError(4).code(), StatusCode::kProtocolError);
  // The connection stays usable: a well-formed JOIN answers version, clock.
  ASSERT_TRUE(raw.Send(protocol::Opcode::kJoin, 5, {}).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> p;
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  uint64_t version = 9, clock = 9;
  ASSERT_TRUE(protocol::DecodeJoinResponse(p, &version, &clock).ok());
  EXPECT_EQ(version, 0u);
  EXPECT_EQ(clock, 0u);
  EXPECT_EQ(StatsMap()["members"], 1u);
}

std::string Key(const char* name, int partition) {
  return std::string(name) + "{partition=\"" + std::to_string(partition) + "\",attempt=\"0\"}";
}

TEST_F(ModesTest, ProgressReportsShowInStats) {
  StartRun(ConsistencyMode::kAsync);
  auto w0 = Worker(0), w1 = Worker(1);
  // Nothing reported yet: zero counts, unknown loss, age since JOIN.
  ASSERT_TRUE(w1->Heartbeat().ok());  // an empty HEARTBEAT, as before
  auto stats = StatsMap();
  EXPECT_EQ(stats[Key("worker_steps", 1)], 0u);
  EXPECT_EQ(stats[Key("worker_samples", 1)], 0u);
  EXPECT_TRUE(std::isnan(std::bit_cast<double>(stats[Key("worker_loss_f64", 1)])));
  EXPECT_EQ(stats.count(Key("worker_progress_age_ms", 1)), 1u);

  w0->ReportProgress(10, 320, 0.6931471805599453);
  ASSERT_TRUE(w0->Heartbeat().ok());
  stats = StatsMap();
  EXPECT_EQ(stats[Key("worker_steps", 0)], 10u);
  EXPECT_EQ(stats[Key("worker_samples", 0)], 320u);
  EXPECT_EQ(std::bit_cast<double>(stats[Key("worker_loss_f64", 0)]), 0.6931471805599453);
  EXPECT_LT(stats[Key("worker_progress_age_ms", 0)], 250u);

  // The same step count again: alive, but no progress, so the age grows.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  w0->ReportProgress(10, 320, 0.5);
  ASSERT_TRUE(w0->Heartbeat().ok());
  stats = StatsMap();
  const uint64_t stuck = stats[Key("worker_progress_age_ms", 0)];
  EXPECT_GE(stuck, 300u);
  EXPECT_LT(stats[Key("worker_last_seen_ms", 0)], stuck);
  EXPECT_EQ(std::bit_cast<double>(stats[Key("worker_loss_f64", 0)]), 0.5);

  // One more step resets it.
  w0->ReportProgress(11, 352, 0.25);
  ASSERT_TRUE(w0->Heartbeat().ok());
  stats = StatsMap();
  EXPECT_EQ(stats[Key("worker_steps", 0)], 11u);
  EXPECT_LT(stats[Key("worker_progress_age_ms", 0)], stuck);
  // The never-reporting worker's age runs from its JOIN.
  EXPECT_GE(stats[Key("worker_progress_age_ms", 1)], 300u);
  // Reports from a connection that is not a live member are ignored.
  driver_->ReportProgress(5, 5, 5);
  ASSERT_TRUE(driver_->Heartbeat().ok());
  ASSERT_TRUE(w1->Leave().ok());
  w1->ReportProgress(99, 99, 1);
  ASSERT_TRUE(w1->Heartbeat().ok());
  EXPECT_EQ(StatsMap().count(Key("worker_steps", 1)), 0u);
  ASSERT_TRUE(w1->Join(nullptr).ok());  // a fresh member: nothing kept
  stats = StatsMap();
  EXPECT_EQ(stats[Key("worker_steps", 1)], 0u);
  EXPECT_LT(stats[Key("worker_progress_age_ms", 1)], stuck);
  EXPECT_EQ(stats.count("worker_steps{partition=\"-1\",attempt=\"0\"}"), 0u);
}

TEST_F(ModesTest, HeartbeatOfAnotherLengthIsAProtocolError) {
  StartRun(ConsistencyMode::kAsync);
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server_->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());  // partition 1, attempt 0
  ASSERT_TRUE(raw.Send(protocol::Opcode::kJoin, 3, {}).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> p;
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  ASSERT_TRUE(raw.Send(protocol::Opcode::kHeartbeat, 4, std::vector<uint8_t>(8, 1)).ok());
  Status e = raw.ReadError(4);
  EXPECT_EQ(e.code(), StatusCode::kProtocolError);
  EXPECT_NE(e.message().find("24-byte progress report"), std::string::npos) << e.message();
  // The connection keeps serving: a well-formed report is stored.
  const protocol::ProgressReport report{3, 96, 1.5};
  std::vector<uint8_t> beat;
  protocol::EncodeHeartbeat(&report, &beat);
  ASSERT_TRUE(raw.Send(protocol::Opcode::kHeartbeat, 5, beat).ok());
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse);
  uint64_t version = 9;
  ASSERT_TRUE(protocol::DecodeVersion(p, &version).ok());
  auto stats = StatsMap();
  EXPECT_EQ(stats[Key("worker_steps", 1)], 3u);
  EXPECT_EQ(stats[Key("worker_samples", 1)], 96u);
  EXPECT_EQ(std::bit_cast<double>(stats[Key("worker_loss_f64", 1)]), 1.5);
  EXPECT_EQ(stats["members"], 1u);
}

TEST_F(ModesTest, HeartbeatThreadCarriesTheLatestReport) {
  StartRun(ConsistencyMode::kAsync);
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 2;
  o.heartbeat_interval_s = 0.05;
  std::unique_ptr<Client> c;
  ASSERT_TRUE(Client::Connect(o, &c).ok());
  ASSERT_TRUE(c->Join(nullptr).ok());
  c->ReportProgress(7, 224, 2.5);  // no request of this connection carries it
  auto t = steady_clock::now();
  std::map<std::string, uint64_t> stats;
  while (Since(t) < 5.0) {
    stats = StatsMap();
    if (stats[Key("worker_steps", 2)] == 7u) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(stats[Key("worker_steps", 2)], 7u);
  EXPECT_EQ(stats[Key("worker_samples", 2)], 224u);
  EXPECT_EQ(std::bit_cast<double>(stats[Key("worker_loss_f64", 2)]), 2.5);
  ASSERT_TRUE(c->Leave().ok());
}

TEST_F(ModesTest, ProgressInThePrometheusEndpoint) {
  StartRun(ConsistencyMode::kAsync, 0, 30, 10, /*metrics_port=*/0);
  auto w = Worker(0);
  w->ReportProgress(4, 128, 0.375);
  ASSERT_TRUE(w->Heartbeat().ok());
  std::string page = HttpGet(static_cast<uint16_t>(server_->metrics_port()), "/metrics");
  EXPECT_NE(page.find("tensorspark_worker_steps{partition=\"0\",attempt=\"0\"} 4\n"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("tensorspark_worker_samples{partition=\"0\",attempt=\"0\"} 128\n"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("# TYPE tensorspark_worker_loss_f64 gauge\n"
                      "tensorspark_worker_loss_f64{partition=\"0\",attempt=\"0\"} 0.375\n"),
            std::string::npos)
      << page;
  EXPECT_NE(page.find("tensorspark_worker_progress_age_ms{partition=\"0\",attempt=\"0\"} "),
            std::string::npos)
      << page;
}

TEST_F(ModesTest, LostWorkerJoinsAgainAtTheOpenRound) {
  StartRun(ConsistencyMode::kSync, 0, /*heartbeat_timeout_s=*/0.3f);
  auto w0 = Worker(0), w1 = Worker(1);
  ASSERT_TRUE(PushDelta(w0.get(), 2).ok());
  ASSERT_TRUE(PushDelta(w1.get(), 4).ok());                     // round 0 closes: w = 3
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // both silent: lost
  EXPECT_EQ(StatsMap()["members"], 0u);
  EXPECT_EQ(PushDelta(w0.get(), 1).code(), StatusCode::kInvalidArgument);
  uint64_t clock = 0;
  ASSERT_TRUE(w0->Join(&clock).ok());
  EXPECT_EQ(clock, 1u);  // the open round
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());
  float w = 0;
  ASSERT_TRUE(PullW(w0.get(), &w).ok());
  EXPECT_EQ(w, 4.0f);
}

// Reports() as a map by partition.
std::map<int32_t, WorkerReport> ReportsOf(Client* c) {
  std::vector<WorkerReport> list;
  Status s = c->Reports(&list);
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::map<int32_t, WorkerReport> m;
  for (auto& r : list) m[r.partition] = std::move(r);
  return m;
}

TEST_F(ModesTest, WorkerReportsShowInReportsWithAges) {
  StartRun(ConsistencyMode::kAsync);
  auto w0 = Worker(0), w1 = Worker(1);
  auto reports = ReportsOf(driver_.get());
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_EQ(reports[1].report_age_ms, WorkerReport::kNoReport);
  EXPECT_TRUE(reports[1].text.empty());

  const std::string dump = "Thread 0x01 (most recent call first):\n  File \"t.py\", line 3 in f\n";
  ASSERT_TRUE(w0->Report(dump).ok());
  w0->ReportProgress(5, 160, 0.5);
  ASSERT_TRUE(w0->Heartbeat().ok());
  ASSERT_TRUE(PushDelta(w0.get(), 1).ok());  // clock 1
  reports = ReportsOf(driver_.get());
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_EQ(reports[0].attempt, 0);
  EXPECT_EQ(reports[0].text, dump);
  EXPECT_EQ(reports[0].clock, 1u);
  EXPECT_EQ(reports[0].steps, 5u);
  EXPECT_LT(reports[0].report_age_ms, 250u);
  EXPECT_LT(reports[0].progress_age_ms, 250u);
  EXPECT_EQ(reports[1].report_age_ms, WorkerReport::kNoReport);

  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  reports = ReportsOf(w1.get());  // any connection may ask
  EXPECT_GE(reports[0].report_age_ms, 300u);
  EXPECT_GE(reports[1].progress_age_ms, 300u);  // since its JOIN

  // A newer report replaces the old one; over 64 KiB keeps the last 64 KiB.
  const std::string big = std::string(100, 'h') + std::string(protocol::kMaxReportBytes, 'x');
  ASSERT_TRUE(w0->Report(big).ok());
  reports = ReportsOf(driver_.get());
  EXPECT_EQ(reports[0].text, big.substr(100));
  EXPECT_LT(reports[0].report_age_ms, 250u);
  ASSERT_TRUE(w0->Report("second").ok());
  EXPECT_EQ(ReportsOf(driver_.get())[0].text, "second");
}

TEST_F(ModesTest, ReportsFromNonMembersAreIgnored) {
  StartRun(ConsistencyMode::kAsync);
  auto w0 = Worker(0);
  auto idle = Worker(2, 0, /*join=*/false);
  ASSERT_TRUE(driver_->Report("from the driver").ok());
  ASSERT_TRUE(idle->Report("not joined").ok());
  auto reports = ReportsOf(driver_.get());
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_EQ(reports.count(0), 1u);
  EXPECT_EQ(reports[0].report_age_ms, WorkerReport::kNoReport);
  // A worker that left is not listed; its reports are ignored, and joining
  // again starts without one.
  ASSERT_TRUE(w0->Report("before leaving").ok());
  ASSERT_TRUE(w0->Leave().ok());
  ASSERT_TRUE(w0->Report("after leaving").ok());
  EXPECT_TRUE(ReportsOf(driver_.get()).empty());
  ASSERT_TRUE(w0->Join(nullptr).ok());
  reports = ReportsOf(driver_.get());
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_TRUE(reports[0].text.empty());
  EXPECT_EQ(reports[0].report_age_ms, WorkerReport::kNoReport);
}

TEST_F(ModesTest, MalformedReportFramesAreProtocolErrors) {
  StartRun(ConsistencyMode::kAsync);
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server_->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());  // partition 1, attempt 0
  ASSERT_TRUE(raw.Send(protocol::Opcode::kJoin, 3, {}).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> p;
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  std::vector<uint8_t> report;
  protocol::EncodeReport(protocol::kReportStackDump, "dump", &report);
  std::vector<uint8_t> bad_kind = report;
  bad_kind[0] = 2;
  ASSERT_TRUE(raw.Send(protocol::Opcode::kReport, 4, bad_kind).ok());
  EXPECT_EQ(raw.ReadError(4).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> reserved = report;
  reserved[3] = 1;
  ASSERT_TRUE(raw.Send(protocol::Opcode::kReport, 5, reserved).ok());
  EXPECT_EQ(raw.ReadError(5).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> big;
  protocol::EncodeReport(protocol::kReportStackDump,
                         std::string(protocol::kMaxReportBytes + 1, 'x'), &big);
  ASSERT_TRUE(raw.Send(protocol::Opcode::kReport, 6, big).ok());
  Status e = raw.ReadError(6);
  EXPECT_EQ(e.code(), StatusCode::kProtocolError);
  EXPECT_NE(e.message().find("exceeds the limit of 65536 bytes"), std::string::npos) << e.message();
  ASSERT_TRUE(raw.Send(protocol::Opcode::kReports, 7, {0}).ok());
  EXPECT_EQ(raw.ReadError(7).code(), StatusCode::kProtocolError);
  // The connection keeps serving: a well-formed REPORT answers a version.
  ASSERT_TRUE(raw.Send(protocol::Opcode::kReport, 8, report).ok());
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse);
  uint64_t version = 9;
  ASSERT_TRUE(protocol::DecodeVersion(p, &version).ok());
  EXPECT_EQ(version, 0u);
  auto reports = ReportsOf(driver_.get());
  EXPECT_EQ(reports[1].text, "dump");
}

void WriteFile(const std::string& path, const std::string& content) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(std::fwrite(content.data(), 1, content.size(), f), content.size());
  ASSERT_EQ(std::fclose(f), 0);
}

TEST_F(ModesTest, HeartbeatThreadShipsTheDumpFileWhenItChanges) {
  StartRun(ConsistencyMode::kAsync);
  TempDir dir;
  const std::string path = dir.Sub("stack.txt");
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 4;
  o.heartbeat_interval_s = 0.05;
  std::unique_ptr<Client> c;
  ASSERT_TRUE(Client::Connect(o, &c).ok());
  c->SetDumpFile(path);  // does not exist yet: ignored (logged once)
  ASSERT_TRUE(c->Join(nullptr).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  EXPECT_EQ(ReportsOf(driver_.get())[4].report_age_ms, WorkerReport::kNoReport);

  // Waits (bounded) until the driver sees `want` from partition 4.
  auto wait_for = [&](const std::string& want) {
    auto t = steady_clock::now();
    WorkerReport r;
    while (Since(t) < 5.0) {
      r = ReportsOf(driver_.get())[4];
      if (r.text == want) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return r;
  };
  const std::string first = "Thread 0x01 (most recent call first):\n  File \"a.py\", line 1\n";
  WriteFile(path, first);
  WorkerReport r = wait_for(first);
  ASSERT_EQ(r.text, first);
  // Unchanged: not sent again, so the report ages.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_GE(ReportsOf(driver_.get())[4].report_age_ms, 250u);

  const std::string second = first + "Thread 0x02:\n  File \"b.py\", line 2\n";
  WriteFile(path, second);
  r = wait_for(second);
  ASSERT_EQ(r.text, second);
  EXPECT_LT(r.report_age_ms, 1000u);

  // Larger than 64 KiB: the last 64 KiB.
  const std::string big =
      std::string(5000, 'o') + std::string(protocol::kMaxReportBytes - 4, 'n') + "LAST";
  WriteFile(path, big);
  const std::string tail = big.substr(big.size() - protocol::kMaxReportBytes);
  r = wait_for(tail);
  EXPECT_EQ(r.text.size(), protocol::kMaxReportBytes);
  EXPECT_TRUE(r.text == tail);

  c->SetDumpFile("");  // stops shipping
  WriteFile(path, "ignored");
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(ReportsOf(driver_.get())[4].text == tail);
  ASSERT_TRUE(c->Leave().ok());
}

}  // namespace
}  // namespace tensorspark::testing
