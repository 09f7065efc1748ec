// ShardedClient as a member of a run: fencing, sync rounds, heartbeats,
// merged reports and optimizers on chunked names, against two real servers
// on loopback.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <future>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "tensorspark/sharded_client.h"
#include "test_util.h"

namespace tensorspark::testing {
namespace {

constexpr uint64_t kChunkBytes = 64;  // 16 floats per chunk
constexpr int64_t kW = 40;            // 3 chunks, on both servers
const int64_t kWShape[] = {kW};
const int64_t kBShape[] = {5};  // one chunk, on one server

uint64_t Stat(const std::vector<StatEntry>& stats, const std::string& key) {
  for (const auto& [k, v] : stats)
    if (k == key) return v;
  return 0;
}

class ShardedMembershipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 2; ++i) {
      servers_.push_back(StartServer());
      ASSERT_TRUE(servers_.back());
      endpoints_.push_back({"127.0.0.1", servers_.back()->port()});
    }
    // The test's premise: W's chunks sit on both servers.
    std::set<size_t> used;
    for (uint64_t k = 0; k < 3; ++k) used.insert(ShardedClient::ServerFor("W", k, 2));
    ASSERT_EQ(used.size(), 2u);
    driver_ = Connect(-1, 0);
    ASSERT_TRUE(driver_);
    std::vector<float> w(kW, 0.0f), b(5, 0.0f);
    VariableSpec specs[] = {{"W", kWShape, w}, {"b", kBShape, b}};
    std::vector<bool> created;
    uint64_t v = 0;
    ASSERT_TRUE(driver_->Register(specs, &created, &v).ok());
  }

  std::unique_ptr<ShardedClient> Connect(int32_t partition, int32_t attempt,
                                         double heartbeat_s = 0) {
    ClientOptions o = TestClientOptions(0);
    o.partition_id = partition;
    o.attempt = attempt;
    o.heartbeat_interval_s = heartbeat_s;
    std::unique_ptr<ShardedClient> c;
    Status s = ShardedClient::Connect(o, endpoints_, &c, kChunkBytes);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return c;
  }

  void ConfigureRun(ConsistencyMode mode, float heartbeat_timeout_s = 30) {
    RunConfig run;
    run.mode = mode;
    run.heartbeat_timeout_s = heartbeat_timeout_s;
    run.wait_timeout_s = 10;
    Status s = driver_->Configure(run);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  static Status PushDelta(ShardedClient* c, float x) {
    std::vector<float> w(kW, x), b(5, x);
    TensorView t[] = {{"W", kWShape, w}, {"b", kBShape, b}};
    uint64_t v = 0;
    return c->Push(UpdateKind::kDelta, t, PushOptions{}, &v);
  }

  // W and b as the servers hold them.
  std::vector<float> PullAll(ShardedClient* c) {
    std::vector<float> w(kW), b(5);
    MutableTensorView views[] = {{"W", w}, {"b", b}};
    uint64_t v = 0;
    Status s = c->Pull(views, &v);
    EXPECT_TRUE(s.ok()) << s.ToString();
    w.insert(w.end(), b.begin(), b.end());
    return w;
  }

  std::vector<std::vector<StatEntry>> Stats() {
    std::vector<std::vector<StatEntry>> stats;
    Status s = driver_->Stats(&stats);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return stats;
  }

  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<Endpoint> endpoints_;
  std::unique_ptr<ShardedClient> driver_;
};

TEST_F(ShardedMembershipTest, NewerAttemptFencesTheOldOneOnEveryServer) {
  auto old_attempt = Connect(1, 0);
  uint64_t clock = 99;
  ASSERT_TRUE(old_attempt->Join(&clock).ok());
  EXPECT_EQ(clock, 0u);
  ASSERT_TRUE(PushDelta(old_attempt.get(), 1.0f).ok());

  auto retry = Connect(1, 1);
  ASSERT_TRUE(retry->Join(&clock).ok());
  for (const auto& s : Stats()) {
    EXPECT_EQ(Stat(s, "members"), 1u);
    EXPECT_EQ(Stat(s, "workers_retried"), 1u);
    EXPECT_EQ(Stat(s, "worker_clock{partition=\"1\",attempt=\"1\"}"), 1u);
  }

  // The zombie's push is refused by the servers, naming one.
  Status s = PushDelta(old_attempt.get(), 100.0f);
  EXPECT_EQ(s.code(), StatusCode::kFenced) << s.ToString();
  EXPECT_NE(s.message().find("server 127.0.0.1:"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("replaced by attempt 1"), std::string::npos) << s.message();
  s = old_attempt->Join(nullptr);
  EXPECT_EQ(s.code(), StatusCode::kFenced) << s.ToString();
  for (const auto& st : Stats()) EXPECT_GE(Stat(st, "refused{reason=\"fenced\"}"), 2u);

  ASSERT_TRUE(PushDelta(retry.get(), 2.0f).ok());
  for (float v : PullAll(driver_.get())) EXPECT_FLOAT_EQ(v, 3.0f);  // 1 + 2, never the 100
  ASSERT_TRUE(retry->Leave().ok());
  for (const auto& st : Stats()) EXPECT_EQ(Stat(st, "members"), 0u);
}

TEST_F(ShardedMembershipTest, SyncRoundsCloseOnBothServers) {
  ConfigureRun(ConsistencyMode::kSync);
  for (const auto& s : Stats()) EXPECT_EQ(Stat(s, "mode"), 1u);
  auto a = Connect(0, 0);
  auto b = Connect(1, 0);
  ASSERT_TRUE(a->Join(nullptr).ok());
  ASSERT_TRUE(b->Join(nullptr).ok());

  // Each member pushes and pulls; the pull returns once the round has closed
  // on every server, with the average of the two pushes.
  auto member = [this](ShardedClient* c, float x) {
    Status s = PushDelta(c, x);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return PullAll(c);
  };
  auto fa = std::async(std::launch::async, member, a.get(), 1.0f);
  auto fb = std::async(std::launch::async, member, b.get(), 3.0f);
  for (float v : fa.get()) EXPECT_FLOAT_EQ(v, 2.0f);
  for (float v : fb.get()) EXPECT_FLOAT_EQ(v, 2.0f);
  for (const auto& s : Stats()) {
    EXPECT_EQ(Stat(s, "sync_round"), 1u);
    EXPECT_EQ(Stat(s, "members"), 2u);
  }
  // A retried member joins the open round: the largest clock over servers.
  auto b2 = Connect(1, 1);
  uint64_t clock = 0;
  ASSERT_TRUE(b2->Join(&clock).ok());
  EXPECT_EQ(clock, 1u);
}

TEST_F(ShardedMembershipTest, ServerHoldingNoPartOfAPushDoesNotStallSyncRounds) {
  ConfigureRun(ConsistencyMode::kSync);
  const size_t holder = ShardedClient::ServerFor("b", 0, 2);
  auto a = Connect(0, 0);
  auto b = Connect(1, 0);
  ASSERT_TRUE(a->Join(nullptr).ok());
  ASSERT_TRUE(b->Join(nullptr).ok());
  // Two rounds over "b" alone: the other server sees only the joins.
  auto member = [](ShardedClient* c, float x) {
    std::vector<float> out(5);
    for (int round = 0; round < 2; ++round) {
      std::vector<float> d(5, x);
      TensorView t{"b", kBShape, d};
      uint64_t v = 0;
      Status s = c->Push(UpdateKind::kDelta, {&t, 1}, PushOptions{}, &v);
      EXPECT_TRUE(s.ok()) << s.ToString();
      MutableTensorView view{"b", out};
      s = c->Pull({&view, 1}, &v);
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    return out;
  };
  auto fa = std::async(std::launch::async, member, a.get(), 1.0f);
  auto fb = std::async(std::launch::async, member, b.get(), 3.0f);
  for (float v : fa.get()) EXPECT_FLOAT_EQ(v, 4.0f);  // two rounds of mean 2
  for (float v : fb.get()) EXPECT_FLOAT_EQ(v, 4.0f);
  auto stats = Stats();
  EXPECT_EQ(Stat(stats[holder], "sync_round"), 2u);
  EXPECT_EQ(Stat(stats[1 - holder], "sync_round"), 0u);
  EXPECT_EQ(Stat(stats[1 - holder], "members"), 2u);
  uint64_t clock = 0;
  auto late = Connect(2, 0);
  ASSERT_TRUE(late->Join(&clock).ok());
  EXPECT_EQ(clock, 2u);  // the max: the idle server stays at round 0
}

TEST_F(ShardedMembershipTest, HeartbeatsPerServerAndMergedReports) {
  ConfigureRun(ConsistencyMode::kAsync, /*heartbeat_timeout_s=*/1.0f);
  TempDir dir;
  const std::string dump = dir.Sub("stack-0.txt");
  std::ofstream(dump) << "Thread 0x1 (most recent call first):\n  File \"train.py\", line 7\n";
  auto a = Connect(0, 0, /*heartbeat_s=*/0.1);
  auto b = Connect(1, 0, /*heartbeat_s=*/0.1);
  a->SetDumpFile(dump);
  ASSERT_TRUE(a->Join(nullptr).ok());
  ASSERT_TRUE(b->Join(nullptr).ok());
  a->ReportProgress(5, 50, 0.5);
  b->ReportProgress(7, 70, 0.25);

  // Silent for longer than the timeout: only the heartbeat threads of both
  // servers keep the members live.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  auto stats = Stats();
  for (const auto& s : stats) {
    EXPECT_EQ(Stat(s, "members"), 2u);
    EXPECT_EQ(Stat(s, "workers_lost"), 0u);
    EXPECT_EQ(Stat(s, "worker_steps{partition=\"0\",attempt=\"0\"}"), 5u);
    EXPECT_EQ(Stat(s, "worker_steps{partition=\"1\",attempt=\"0\"}"), 7u);
  }

  std::vector<WorkerReport> reports;
  ASSERT_TRUE(driver_->Reports(&reports).ok());
  ASSERT_EQ(reports.size(), 2u);  // one per member, not per server
  EXPECT_EQ(reports[0].partition, 0);
  EXPECT_EQ(reports[1].partition, 1);
  EXPECT_EQ(reports[0].steps, 5u);
  EXPECT_EQ(reports[1].steps, 7u);
  EXPECT_NE(reports[0].text.find("train.py"), std::string::npos) << reports[0].text;
  EXPECT_NE(reports[0].report_age_ms, WorkerReport::kNoReport);
  EXPECT_EQ(reports[1].report_age_ms, WorkerReport::kNoReport);
  EXPECT_TRUE(reports[1].text.empty());

  // The dump went to the first server only.
  auto second = ConnectClient(endpoints_[1].port);
  std::vector<WorkerReport> on_second;
  ASSERT_TRUE(second->Reports(&on_second).ok());
  ASSERT_EQ(on_second.size(), 2u);
  EXPECT_TRUE(on_second[0].text.empty());

  // An explicit report too, then leaving stops the heartbeats everywhere.
  ASSERT_TRUE(b->Report("dump of b").ok());
  ASSERT_TRUE(driver_->Reports(&reports).ok());
  ASSERT_EQ(reports.size(), 2u);
  EXPECT_EQ(reports[1].text, "dump of b");
  EXPECT_TRUE(a->connected());
  ASSERT_TRUE(a->Leave().ok());
  ASSERT_TRUE(b->Leave().ok());
  for (const auto& s : Stats()) EXPECT_EQ(Stat(s, "members"), 0u);
  b->Close();
  EXPECT_FALSE(b->connected());
}

TEST_F(ShardedMembershipTest, SetOptimizerReachesEveryChunk) {
  auto c = Connect(-1, 0);
  OptimizerConfig sgd;
  sgd.kind = OptimizerKind::kSgd;
  sgd.learning_rate = 0.5f;
  std::string_view w_only[] = {"W"};
  uint64_t version = 99;
  Status s = c->SetOptimizer(sgd, w_only, &version);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(version, 0u);

  // A gradient push with learning_rate 0 needs an optimizer: every chunk of
  // W has one, b has none.
  std::vector<float> g(kW, 1.0f), gb(5, 1.0f);
  TensorView w_grad{"W", kWShape, g};
  ASSERT_TRUE(c->Push(UpdateKind::kGradient, {&w_grad, 1}, PushOptions{}, &version).ok());
  std::vector<float> all = PullAll(c.get());
  for (int64_t i = 0; i < kW; ++i) EXPECT_FLOAT_EQ(all[i], -0.5f) << i;
  TensorView b_grad{"b", kBShape, gb};
  s = c->Push(UpdateKind::kGradient, {&b_grad, 1}, PushOptions{}, &version);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();

  std::string_view unknown[] = {"W", "nope"};
  s = c->SetOptimizer(sgd, unknown, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
  EXPECT_NE(s.message().find("'nope'"), std::string::npos) << s.message();

  // With no names: every variable of every server, b included.
  ASSERT_TRUE(c->SetOptimizer(sgd, {}, nullptr).ok());
  ASSERT_TRUE(c->Push(UpdateKind::kGradient, {&b_grad, 1}, PushOptions{}, &version).ok());
  all = PullAll(c.get());
  for (int64_t i = kW; i < kW + 5; ++i) EXPECT_FLOAT_EQ(all[i], -0.5f) << i;

  // A bad config changes no server.
  sgd.learning_rate = -1.0f;
  EXPECT_EQ(c->SetOptimizer(sgd, w_only, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tensorspark::testing
