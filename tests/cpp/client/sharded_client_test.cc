// ShardedClient against several real servers on loopback.
#include "tensorspark/sharded_client.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "test_util.h"

namespace tensorspark::testing {
namespace {

uint64_t Stat(const std::vector<StatEntry>& stats, const std::string& key) {
  for (const auto& [k, v] : stats)
    if (k == key) return v;
  return 0;
}

class ShardedClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 3; ++i) {
      servers_.push_back(StartServer());
      endpoints_.push_back({"127.0.0.1", servers_.back()->port()});
    }
  }

  std::unique_ptr<ShardedClient> Connect(uint64_t chunk_bytes) {
    std::unique_ptr<ShardedClient> c;
    Status s = ShardedClient::Connect(TestClientOptions(0), endpoints_, &c, chunk_bytes);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return c;
  }

  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<Endpoint> endpoints_;
};

TEST(ShardedPlacement, RuleIsDeterministicAndSpreadsChunks) {
  EXPECT_EQ(ShardedClient::ServerFor("W", 0, 3), ShardedClient::ServerFor("W", 0, 3));
  std::set<size_t> used;
  for (uint64_t k = 0; k < 3; ++k) used.insert(ShardedClient::ServerFor("W", k, 3));
  EXPECT_EQ(used.size(), 3u);  // consecutive chunks go to consecutive servers
  EXPECT_EQ(ShardedClient::ChunkName("W", 0, 1), "W");
  EXPECT_EQ(ShardedClient::ChunkName("W", 2, 5), "W#2/5");
  EXPECT_EQ(ShardedClient::ChunkElements(ShardedClient::kDefaultChunkBytes), 1u << 20);
}

TEST_F(ShardedClientTest, RegisterPullPushAcrossServers) {
  auto c = Connect(64);  // 16 floats per chunk: W (100 floats) becomes 7 chunks
  std::vector<float> w(100), b(5, 2.0f);
  std::iota(w.begin(), w.end(), 0.0f);
  const int64_t w_shape[] = {10, 10}, b_shape[] = {5};
  VariableSpec specs[] = {{"W", w_shape, w}, {"b", b_shape, b}};
  std::vector<bool> created;
  uint64_t version = 1;
  ASSERT_TRUE(c->Register(specs, &created, &version).ok());
  EXPECT_EQ(created, std::vector<bool>({true, true}));
  EXPECT_EQ(version, 0u);

  // Every server got the chunks the rule assigns to it.
  size_t expected_vars[3] = {0, 0, 0};
  for (uint64_t k = 0; k < 7; ++k) ++expected_vars[ShardedClient::ServerFor("W", k, 3)];
  ++expected_vars[ShardedClient::ServerFor("b", 0, 3)];
  std::vector<std::vector<StatEntry>> stats;
  ASSERT_TRUE(c->Stats(&stats).ok());
  for (size_t s = 0; s < 3; ++s) EXPECT_EQ(Stat(stats[s], "variables"), expected_vars[s]) << s;

  std::vector<float> delta(100, 0.5f), bd(5, 1.0f);
  TensorView push[] = {{"W", w_shape, delta}, {"b", b_shape, bd}};
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, push, {}, &version).ok());

  std::vector<float> w_out(100), b_out(5);
  MutableTensorView views[] = {{"W", w_out}, {"b", b_out}};
  ASSERT_TRUE(c->Pull(views, &version).ok());
  for (int i = 0; i < 100; ++i) EXPECT_FLOAT_EQ(w_out[i], i + 0.5f);
  for (float v : b_out) EXPECT_FLOAT_EQ(v, 3.0f);
  // One push touched every server holding a chunk: the sum of versions.
  size_t touched = 0;
  for (size_t s = 0; s < 3; ++s) touched += expected_vars[s] > 0;
  EXPECT_EQ(version, touched);

  // A second client sees the same model (same rule, no coordination).
  auto c2 = Connect(64);
  std::vector<float> again(100);
  MutableTensorView view2[] = {{"W", again}};
  ASSERT_TRUE(c2->Pull(view2, &version).ok());
  EXPECT_EQ(again, w_out);
}

TEST_F(ShardedClientTest, OutputsMayBeNullAsForClient) {
  auto c = Connect(64);
  std::vector<float> w(40, 1.0f), out(40, 0.0f);
  const int64_t shape[] = {40};
  VariableSpec spec{"W", shape, w};
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, nullptr).ok());
  TensorView tv{"W", shape, w};
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, {&tv, 1}, PushOptions{}, nullptr).ok());
  MutableTensorView mv{"W", out};
  ASSERT_TRUE(c->Pull({&mv, 1}, nullptr).ok());
  EXPECT_EQ(out, std::vector<float>(40, 2.0f));
}

TEST_F(ShardedClientTest, ErrorsNameTheServer) {
  auto c = Connect(ShardedClient::kDefaultChunkBytes);
  std::vector<float> out(4);
  MutableTensorView views[] = {{"missing", out}};
  uint64_t version = 0;
  Status s = c->Pull(views, &version);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("127.0.0.1:"), std::string::npos) << s.message();
}

TEST_F(ShardedClientTest, UnreachableServerFailsConnect) {
  std::vector<Endpoint> eps = endpoints_;
  servers_[1]->Stop();
  ClientOptions o = TestClientOptions(0);
  o.connect_timeout_s = 1;
  std::unique_ptr<ShardedClient> c;
  Status s = ShardedClient::Connect(o, eps, &c);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(std::to_string(eps[1].port)), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tensorspark::testing
