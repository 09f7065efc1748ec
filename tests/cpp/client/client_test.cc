// Client + server round trips on loopback sockets.
#include "tensorspark/client.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <thread>

#include "test_util.h"

namespace tensorspark {
namespace {

using testing::ConnectClient;
using testing::StartServer;
using testing::TestClientOptions;
using testing::TestServerOptions;

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    ASSERT_NE(server_, nullptr);
    client_ = ConnectClient(server_->port());
    ASSERT_NE(client_, nullptr);
  }

  // Registers W [2,3] = 0..5 and b [3] = 1,1,1.
  void RegisterModel() {
    std::vector<VariableSpec> specs = {{"W", w_shape_, w_init_}, {"b", b_shape_, b_init_}};
    std::vector<bool> created;
    uint64_t version = 99;
    Status s = client_->Register(specs, &created, &version);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_EQ(created, (std::vector<bool>{true, true}));
    EXPECT_EQ(version, 0u);
  }

  std::vector<float> PullOne(const std::string& name, size_t n, uint64_t* version = nullptr) {
    std::vector<float> out(n, -1.0f);
    MutableTensorView view{name, out};
    uint64_t v;
    Status s = client_->Pull({&view, 1}, &v);
    EXPECT_TRUE(s.ok()) << s.ToString();
    if (version != nullptr) *version = v;
    return out;
  }

  std::vector<int64_t> w_shape_ = {2, 3};
  std::vector<float> w_init_ = {0, 1, 2, 3, 4, 5};
  std::vector<int64_t> b_shape_ = {3};
  std::vector<float> b_init_ = {1, 1, 1};
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(ClientTest, RegisterFirstWinsAndShapeMismatch) {
  RegisterModel();
  std::vector<float> other = {9, 9, 9, 9, 9, 9};
  VariableSpec again{"W", w_shape_, other};
  std::vector<bool> created;
  ASSERT_TRUE(client_->Register({&again, 1}, &created, nullptr).ok());
  EXPECT_EQ(created, (std::vector<bool>{false}));
  EXPECT_EQ(PullOne("W", 6), w_init_);  // the server's values are kept

  std::vector<int64_t> wrong = {6};
  std::vector<float> c_init = {5};
  std::vector<int64_t> c_shape = {1};
  std::vector<VariableSpec> bad = {{"c", c_shape, c_init}, {"W", wrong, other}};
  Status s = client_->Register(bad, &created, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("[2,3]"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("[6]"), std::string::npos) << s.message();
  std::vector<VariableInfo> vars;
  uint64_t version;
  ASSERT_TRUE(client_->ListVariables(&vars, &version).ok());
  ASSERT_EQ(vars.size(), 2u);  // "c" was not registered either
  EXPECT_EQ(vars[0].name, "W");
  EXPECT_EQ(vars[0].shape, w_shape_);
  EXPECT_EQ(vars[1].name, "b");
}

TEST_F(ClientTest, RegisterRejectsBadSpecsLocally) {
  std::vector<float> three = {1, 2, 3};
  VariableSpec wrong_size{"W", w_shape_, three};
  EXPECT_EQ(client_->Register({&wrong_size, 1}, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);
  VariableSpec empty_name{"", b_shape_, three};
  EXPECT_EQ(client_->Register({&empty_name, 1}, nullptr, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(client_->connected());
}

TEST_F(ClientTest, PullNamedAndAll) {
  RegisterModel();
  std::vector<float> w(6), b(3);
  std::vector<MutableTensorView> views = {{"b", b}, {"W", w}};  // any order
  uint64_t version = 99;
  ASSERT_TRUE(client_->Pull(views, &version).ok());
  EXPECT_EQ(version, 0u);
  EXPECT_EQ(w, w_init_);
  EXPECT_EQ(b, b_init_);

  std::vector<Tensor> all;
  ASSERT_TRUE(client_->PullAll(&all, &version).ok());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].info.name, "W");
  EXPECT_EQ(all[0].info.shape, w_shape_);
  EXPECT_EQ(all[0].values, w_init_);
  EXPECT_EQ(all[1].info.name, "b");
  EXPECT_EQ(all[1].values, b_init_);
}

TEST_F(ClientTest, PushEachKind) {
  RegisterModel();
  uint64_t version = 0;
  // Mean with n = 2: w = (w + new) / 2.
  std::vector<float> w_new = {2, 3, 4, 5, 6, 7};
  TensorView t{"W", w_shape_, w_new};
  PushOptions mean;
  mean.mean_window = 2;
  ASSERT_TRUE(client_->Push(UpdateKind::kParameters, {&t, 1}, mean, &version).ok());
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(PullOne("W", 6), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  // Delta: w += d.
  std::vector<float> d = {0.5f, -1, 0, 0, 0, 10};
  t.data = d;
  ASSERT_TRUE(client_->Push(UpdateKind::kDelta, {&t, 1}, {}, &version).ok());
  EXPECT_EQ(version, 2u);
  EXPECT_EQ(PullOne("W", 6), (std::vector<float>{1.5f, 1, 3, 4, 5, 16}));
  // SGD: w -= lr * g, on two tensors at once.
  std::vector<float> gw = {1, 1, 1, 1, 1, 1}, gb = {2, 4, -2};
  std::vector<TensorView> grads = {{"W", w_shape_, gw}, {"b", b_shape_, gb}};
  PushOptions sgd;
  sgd.learning_rate = 0.5f;
  ASSERT_TRUE(client_->Push(UpdateKind::kGradient, grads, sgd, &version).ok());
  EXPECT_EQ(version, 3u);
  EXPECT_EQ(PullOne("W", 6), (std::vector<float>{1, 0.5f, 2.5f, 3.5f, 4.5f, 15.5f}));
  uint64_t pulled_version;
  EXPECT_EQ(PullOne("b", 3, &pulled_version), (std::vector<float>{0, -1, 2}));
  EXPECT_EQ(pulled_version, 3u);
  EXPECT_EQ(server_->version(), 3u);
}

TEST_F(ClientTest, RejectedPushesLeaveValuesAndConnectionIntact) {
  RegisterModel();
  std::vector<float> d = {1, 1, 1, 1, 1, 1};
  std::vector<float> d3 = {1, 1, 1};
  std::vector<int64_t> flat = {6};
  uint64_t version;
  // Unknown name after a valid tensor: nothing is applied.
  std::vector<TensorView> unknown = {{"W", w_shape_, d}, {"nope", b_shape_, d3}};
  Status s = client_->Push(UpdateKind::kDelta, unknown, {}, &version);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("nope"), std::string::npos);
  // Wrong shape (same element count).
  std::vector<TensorView> wrong = {{"b", b_shape_, d3}, {"W", flat, d}};
  s = client_->Push(UpdateKind::kDelta, wrong, {}, &version);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("[2,3]"), std::string::npos) << s.message();
  // Bad options.
  TensorView t{"W", w_shape_, d};
  PushOptions bad_lr;
  bad_lr.learning_rate = -1;
  EXPECT_EQ(client_->Push(UpdateKind::kGradient, {&t, 1}, bad_lr, &version).code(),
            StatusCode::kInvalidArgument);
  PushOptions bad_window;
  bad_window.mean_window = 0;
  EXPECT_EQ(client_->Push(UpdateKind::kParameters, {&t, 1}, bad_window, &version).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->Push(static_cast<UpdateKind>(7), {&t, 1}, {}, &version).code(),
            StatusCode::kInvalidArgument);
  // Pull of an unknown name.
  std::vector<float> out(3);
  MutableTensorView view{"missing", out};
  EXPECT_EQ(client_->Pull({&view, 1}, &version).code(), StatusCode::kNotFound);

  EXPECT_TRUE(client_->connected());
  EXPECT_EQ(PullOne("W", 6, &version), w_init_);
  EXPECT_EQ(PullOne("b", 3), b_init_);
  EXPECT_EQ(version, 0u);
}

TEST_F(ClientTest, PullIntoWrongSizedBufferIsShapeMismatchAndKeepsConnection) {
  RegisterModel();
  std::vector<float> small(4, 7.0f), b(3, 7.0f);
  std::vector<MutableTensorView> views = {{"b", b}, {"W", small}};
  uint64_t version;
  Status s = client_->Pull(views, &version);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("'W'"), std::string::npos) << s.message();
  EXPECT_EQ(small, std::vector<float>(4, 7.0f));  // untouched
  EXPECT_EQ(b, std::vector<float>(3, 7.0f));      // untouched too
  EXPECT_TRUE(client_->connected());
  EXPECT_EQ(PullOne("W", 6), w_init_);
}

TEST_F(ClientTest, ConcurrentPushesFromManyClientsCountVersions) {
  constexpr int kThreads = 4;
  constexpr int kPushes = 50;
  std::vector<int64_t> shape = {1024};
  std::vector<float> zeros(1024, 0.0f);
  VariableSpec spec{"acc", shape, zeros};
  ASSERT_TRUE(client_->Register({&spec, 1}, nullptr, nullptr).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto c = ConnectClient(server_->port());
      ASSERT_NE(c, nullptr);
      std::vector<float> delta(1024, static_cast<float>(t + 1));
      TensorView view{"acc", shape, delta};
      for (int i = 0; i < kPushes; ++i) {
        uint64_t v;
        Status s = c->Push(UpdateKind::kDelta, {&view, 1}, {}, &v);
        ASSERT_TRUE(s.ok()) << s.ToString();
        // Interleave pulls so shared and unique locks contend.
        std::vector<float> out(1024);
        MutableTensorView mv{"acc", out};
        ASSERT_TRUE(c->Pull({&mv, 1}, &v).ok());
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(server_->version(), uint64_t{kThreads * kPushes});
  // Each thread adds (t+1) per push: 50 * (1+2+3+4) = 500, exact in float.
  std::vector<float> acc = PullOne("acc", 1024);
  for (float x : acc) ASSERT_EQ(x, 500.0f);
}

TEST_F(ClientTest, LargeTensorsRoundTrip) {
  constexpr size_t kN = 8 << 20;  // 32 MiB per tensor
  std::vector<int64_t> shape = {static_cast<int64_t>(kN)};
  std::vector<float> init(kN);
  std::iota(init.begin(), init.end(), 0.0f);
  VariableSpec spec{"big", shape, init};
  ASSERT_TRUE(client_->Register({&spec, 1}, nullptr, nullptr).ok());
  std::vector<float> out(kN);
  MutableTensorView view{"big", out};
  uint64_t version;
  auto t0 = std::chrono::steady_clock::now();
  constexpr int kRounds = 4;
  for (int i = 0; i < kRounds; ++i) ASSERT_TRUE(client_->Pull({&view, 1}, &version).ok());
  double pull_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(out, init);
  std::vector<float> ones(kN, 1.0f);
  TensorView d{"big", shape, ones};
  t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kRounds; ++i) {
    ASSERT_TRUE(client_->Push(UpdateKind::kDelta, {&d, 1}, {}, &version).ok());
  }
  double push_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(client_->Pull({&view, 1}, &version).ok());
  for (size_t i = 0; i < kN; i += 4099) ASSERT_EQ(out[i], init[i] + kRounds) << i;
  std::printf("loopback: pull %.2f GB/s, push %.2f GB/s (32 MiB tensor)\n",
              kRounds * kN * 4 / pull_s / 1e9, kRounds * kN * 4 / push_s / 1e9);
}

TEST_F(ClientTest, StatsAndClose) {
  std::vector<StatEntry> stats;
  ASSERT_TRUE(client_->Stats(&stats).ok());
  EXPECT_EQ(stats.front().first, "version");
  client_->Close();
  EXPECT_FALSE(client_->connected());
  Status s = client_->Stats(&stats);
  EXPECT_EQ(s.code(), StatusCode::kConnectionError);
  EXPECT_NE(s.message().find("reconnect"), std::string::npos);
}

TEST_F(ClientTest, ReportProgressFromAnotherThreadRidesOnHeartbeat) {
  ClientOptions o = TestClientOptions(server_->port());
  o.partition_id = 4;
  std::unique_ptr<Client> worker;
  ASSERT_TRUE(Client::Connect(o, &worker).ok());
  ASSERT_TRUE(worker->Join(nullptr).ok());
  // A training callback reports while this thread talks to the server.
  std::thread reporter([&] {
    for (uint64_t step = 1; step <= 2000; ++step) worker->ReportProgress(step, step * 32, 1.0);
  });
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(worker->Heartbeat().ok());
  reporter.join();
  ASSERT_TRUE(worker->Heartbeat().ok());
  std::vector<StatEntry> stats;
  ASSERT_TRUE(client_->Stats(&stats).ok());
  std::map<std::string, uint64_t> m(stats.begin(), stats.end());
  EXPECT_EQ(m["worker_steps{partition=\"4\",attempt=\"0\"}"], 2000u);
  EXPECT_EQ(m["worker_samples{partition=\"4\",attempt=\"0\"}"], 64000u);
}

TEST(ClientConnectTest, WrongSecretIsAuthFailed) {
  auto server = StartServer();
  ClientOptions o = TestClientOptions(server->port());
  o.secret = "not-the-right-secret-at-all";
  std::unique_ptr<Client> c;
  Status s = Client::Connect(o, &c);
  EXPECT_EQ(s.code(), StatusCode::kAuthFailed) << s.ToString();
  EXPECT_EQ(c, nullptr);
}

TEST(ClientConnectTest, UnreachablePortFailsWithinBudget) {
  // A port that was free a moment ago: bind, note it, close.
  uint16_t port;
  {
    net::Socket s;
    ASSERT_TRUE(net::Listen("127.0.0.1", 0, &s, &port).ok());
  }
  ClientOptions o = TestClientOptions(port);
  o.connect_timeout_s = 0.5;
  o.initial_backoff_s = 0.02;
  o.max_retries = 100;
  auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Client> c;
  Status s = Client::Connect(o, &c);
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(s.code() == StatusCode::kTimeout || s.code() == StatusCode::kConnectionError)
      << s.ToString();
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(port)), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("attempts"), std::string::npos) << s.message();
  EXPECT_LT(elapsed, 1.5);
  EXPECT_GE(elapsed, 0.3);  // it did retry

  // Few retries end early with a ConnectionError.
  o.max_retries = 1;
  o.connect_timeout_s = 10;
  t0 = std::chrono::steady_clock::now();
  s = Client::Connect(o, &c);
  EXPECT_EQ(s.code(), StatusCode::kConnectionError) << s.ToString();
  EXPECT_NE(s.message().find("2 attempts"), std::string::npos) << s.message();
}

TEST(ClientConnectTest, OversizedPushReportsFrameTooLarge) {
  ServerOptions so = TestServerOptions();
  so.max_frame_bytes = 64 * 1024;
  auto server = StartServer(so);
  auto c = ConnectClient(server->port());
  std::vector<int64_t> shape = {1 << 20};
  std::vector<float> data(1 << 20, 1.0f);
  TensorView t{"x", shape, data};
  uint64_t version;
  Status s = c->Push(UpdateKind::kDelta, {&t, 1}, {}, &version);
  EXPECT_TRUE(s.code() == StatusCode::kFrameTooLarge || s.code() == StatusCode::kConnectionError)
      << s.ToString();
  std::printf("oversized push -> %s\n", s.ToString().c_str());
  EXPECT_FALSE(c->connected());
}

TEST(ClientConnectTest, SecondClientSeesFirstClientsRegistration) {
  auto server = StartServer();
  auto a = ConnectClient(server->port());
  auto b = ConnectClient(server->port());
  std::vector<int64_t> shape = {2};
  std::vector<float> va = {1, 2}, vb = {3, 4};
  VariableSpec sa{"shared", shape, va}, sb{"shared", shape, vb};
  std::vector<bool> created;
  ASSERT_TRUE(a->Register({&sa, 1}, &created, nullptr).ok());
  EXPECT_TRUE(created[0]);
  ASSERT_TRUE(b->Register({&sb, 1}, &created, nullptr).ok());
  EXPECT_FALSE(created[0]);
  std::vector<Tensor> all;
  uint64_t version;
  ASSERT_TRUE(b->PullAll(&all, &version).ok());
  EXPECT_EQ(all[0].values, va);
}

}  // namespace
}  // namespace tensorspark
