// Server behaviour on real loopback sockets, driven by raw frames.
#include "tensorspark/server.h"

#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <thread>

#include "test_util.h"

namespace tensorspark {
namespace {

using protocol::Opcode;
using testing::ConnectClient;
using testing::RawConn;
using testing::StartServer;
using testing::TestServerOptions;

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The server still serves a well-behaved client.
void ExpectServes(uint16_t port) {
  auto c = ConnectClient(port);
  ASSERT_NE(c, nullptr);
  std::vector<StatEntry> stats;
  Status s = c->Stats(&stats);
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(ServerTest, PortTakenIsAddressInUse) {
  auto a = StartServer();
  ServerOptions o = TestServerOptions();
  o.port = a->port();
  std::unique_ptr<Server> b;
  Status s = Server::Start(o, &b);
  EXPECT_EQ(s.code(), StatusCode::kAddressInUse) << s.ToString();
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(a->port())), std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("port 0"), std::string::npos) << s.message();
}

TEST(ServerTest, ShortSecretIsInvalidArgument) {
  ServerOptions o = TestServerOptions();
  o.secret = "short";
  std::unique_ptr<Server> s;
  EXPECT_EQ(Server::Start(o, &s).code(), StatusCode::kInvalidArgument);
}

TEST(ServerTest, OversizedFrameIsRefusedAndClosedWithoutReadingIt) {
  ServerOptions o = TestServerOptions();
  o.max_frame_bytes = 1024;
  auto server = StartServer(o);
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  RawConn::FrameOptions fo;
  fo.payload_len = uint64_t{1} << 40;  // never sent
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kPush), 7, {}, fo).ok());
  EXPECT_EQ(raw.ReadError(7).code(), StatusCode::kFrameTooLarge);
  EXPECT_TRUE(raw.PeerClosed());
  ExpectServes(server->port());
}

TEST(ServerTest, WrongVersionGetsUnsupportedVersionThenClose) {
  auto server = StartServer();
  for (bool after_handshake : {false, true}) {
    RawConn raw;
    ASSERT_TRUE(raw.Connect(server->port()).ok());
    if (after_handshake) ASSERT_TRUE(raw.Handshake().ok());
    RawConn::FrameOptions fo;
    fo.version = 2;
    ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kStats), 3, {}, fo).ok());
    Status e = raw.ReadError(3);
    EXPECT_EQ(e.code(), StatusCode::kUnsupportedVersion) << e.ToString();
    EXPECT_TRUE(raw.PeerClosed());
  }
  ExpectServes(server->port());
}

TEST(ServerTest, BadMagicClosesWithoutAnswer) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  std::string http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n......";
  ASSERT_TRUE(raw.SendBytes(std::vector<uint8_t>(http.begin(), http.end())).ok());
  EXPECT_TRUE(raw.PeerClosed());
  ExpectServes(server->port());
}

TEST(ServerTest, BadChecksumIsProtocolErrorThenClose) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  std::vector<uint8_t> payload = {0, 0, 0, 0};
  RawConn::FrameOptions fo;
  fo.checksum = 12345;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kPull), 9, payload, fo).ok());
  EXPECT_EQ(raw.ReadError(9).code(), StatusCode::kProtocolError);
  EXPECT_TRUE(raw.PeerClosed());
  ExpectServes(server->port());
}

TEST(ServerTest, MalformedPayloadUnknownOpcodeAndFlagsKeepConnectionOpen) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  // PULL claiming 2 names but carrying none.
  ASSERT_TRUE(raw.Send(Opcode::kPull, 10, {2, 0, 0, 0}).ok());
  EXPECT_EQ(raw.ReadError(10).code(), StatusCode::kProtocolError);
  // Trailing bytes after a LIST.
  ASSERT_TRUE(raw.Send(Opcode::kList, 11, {1}).ok());
  EXPECT_EQ(raw.ReadError(11).code(), StatusCode::kProtocolError);
  // Unknown opcode.
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(99), 12, {}, {}).ok());
  EXPECT_EQ(raw.ReadError(12).code(), StatusCode::kProtocolError);
  // Reserved flag bits.
  RawConn::FrameOptions fo;
  fo.flags = 8;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kStats), 13, {}, fo).ok());
  EXPECT_EQ(raw.ReadError(13).code(), StatusCode::kProtocolError);
  // Unknown variable.
  std::vector<uint8_t> pull;
  std::string_view names[] = {"nope"};
  protocol::EncodePullRequest(names, &pull);
  ASSERT_TRUE(raw.Send(Opcode::kPull, 14, pull).ok());
  EXPECT_EQ(raw.ReadError(14).code(), StatusCode::kNotFound);
  // Still usable.
  ASSERT_TRUE(raw.Send(Opcode::kStats, 15, {}).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> p;
  ASSERT_TRUE(raw.Read(&h, &p).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse);
  EXPECT_EQ(h.request_id, 15u);
  std::vector<StatEntry> stats;
  ASSERT_TRUE(protocol::DecodeStatsResponse(p, &stats).ok());
  bool saw_errors = false;
  for (auto& [k, v] : stats) {
    if (k == "errors") {
      saw_errors = true;
      EXPECT_GE(v, 5u);
    }
  }
  EXPECT_TRUE(saw_errors);
}

TEST(ServerTest, RequestBeforeHandshakeIsAuthFailed) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Send(Opcode::kStats, 1, {}).ok());
  EXPECT_EQ(raw.ReadError(1).code(), StatusCode::kAuthFailed);
  EXPECT_TRUE(raw.PeerClosed());
}

TEST(ServerTest, WrongSecretIsAuthFailed) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  EXPECT_EQ(raw.Handshake("another-secret-0123456789").code(), StatusCode::kAuthFailed);
  EXPECT_TRUE(raw.PeerClosed());
  uint64_t failures = 0;
  for (auto& [k, v] : server->Stats()) {
    if (k == "auth_failures") failures = v;
  }
  EXPECT_EQ(failures, 1u);
}

TEST(ServerTest, StalledFrameAndSilentHandshakeAreDropped) {
  ServerOptions o = TestServerOptions();
  o.io_timeout_s = 0.3;
  o.handshake_timeout_s = 0.3;
  auto server = StartServer(o);
  RawConn silent;
  ASSERT_TRUE(silent.Connect(server->port()).ok());
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(silent.PeerClosed(5));
  EXPECT_LT(SecondsSince(t0), 3.0);

  RawConn stalled;
  ASSERT_TRUE(stalled.Connect(server->port()).ok());
  ASSERT_TRUE(stalled.Handshake().ok());
  // Idle between requests is fine, well past io_timeout_s.
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  RawConn::FrameOptions fo;
  fo.payload_len = 100;
  ASSERT_TRUE(stalled.Send(static_cast<uint16_t>(Opcode::kPull), 5, {0, 0}, fo).ok());
  t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(stalled.PeerClosed(5));
  EXPECT_LT(SecondsSince(t0), 3.0);
  ExpectServes(server->port());
}

// Refused as LimitExceeded on the wire; the client reports a connection error.
TEST(ServerTest, MaxConnectionsRefusesWithAConnectionError) {
  ServerOptions o = TestServerOptions();
  o.max_connections = 1;
  auto server = StartServer(o);
  auto first = ConnectClient(server->port());
  ASSERT_NE(first, nullptr);
  std::unique_ptr<Client> second;
  Status s = Client::Connect(testing::TestClientOptions(server->port()), &second);
  EXPECT_EQ(s.code(), StatusCode::kConnectionError) << s.ToString();
  EXPECT_NE(s.message().find("max_connections"), std::string::npos) << s.ToString();
  first.reset();
  // Once the first one leaves there is room again.
  for (int i = 0; i < 100; ++i) {
    s = Client::Connect(testing::TestClientOptions(server->port()), &second);
    if (s.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(s.ok()) << s.ToString();
}

TEST(ServerTest, StopWithClientsConnectedReturnsPromptly) {
  auto server = StartServer();
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < 4; ++i) clients.push_back(ConnectClient(server->port()));
  RawConn midframe;
  ASSERT_TRUE(midframe.Connect(server->port()).ok());
  ASSERT_TRUE(midframe.Handshake().ok());
  RawConn::FrameOptions fo;
  fo.payload_len = 1000;
  ASSERT_TRUE(midframe.Send(static_cast<uint16_t>(Opcode::kPush), 3, {1, 0}, fo).ok());
  RawConn handshaking;
  ASSERT_TRUE(handshaking.Connect(server->port()).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto t0 = std::chrono::steady_clock::now();
  server->Stop();
  EXPECT_LT(SecondsSince(t0), 2.0);
  EXPECT_TRUE(server->WaitUntilStopped(0));
  server->Stop();  // idempotent
  std::vector<StatEntry> stats;
  EXPECT_FALSE(clients[0]->Stats(&stats).ok());
  EXPECT_FALSE(clients[0]->connected());
}

TEST(ServerTest, ShutdownOpMakesWaitUntilStoppedReturn) {
  auto server = StartServer();
  EXPECT_FALSE(server->WaitUntilStopped(0.05));
  auto c = ConnectClient(server->port());
  std::thread t([&] {
    Status s = c->ShutdownServer();
    EXPECT_TRUE(s.ok()) << s.ToString();
  });
  EXPECT_TRUE(server->WaitUntilStopped(5));
  t.join();
  server->Stop();
}

TEST(ServerTest, StatsCountTraffic) {
  auto server = StartServer();
  auto c = ConnectClient(server->port());
  std::vector<int64_t> shape = {4};
  std::vector<float> init = {1, 2, 3, 4};
  VariableSpec spec{"v", shape, init};
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, nullptr).ok());
  TensorView d{"v", shape, init};
  uint64_t version;
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, {&d, 1}, {}, &version).ok());
  std::vector<float> out(4);
  MutableTensorView view{"v", out};
  ASSERT_TRUE(c->Pull({&view, 1}, &version).ok());
  std::vector<StatEntry> stats;
  ASSERT_TRUE(c->Stats(&stats).ok());
  std::map<std::string, uint64_t> m(stats.begin(), stats.end());
  EXPECT_EQ(m["version"], 1u);
  EXPECT_EQ(m["variables"], 1u);
  EXPECT_EQ(m["parameters"], 4u);
  EXPECT_EQ(m["connections"], 1u);
  EXPECT_EQ(m["connections_total"], 1u);
  EXPECT_EQ(m["pushes"], 1u);
  EXPECT_EQ(m["pulls"], 1u);
  EXPECT_EQ(m["registers"], 1u);
  EXPECT_GT(m["bytes_in"], 100u);
  EXPECT_GT(m["bytes_out"], 100u);
  EXPECT_EQ(m["errors"], 0u);
  EXPECT_EQ(m["auth_failures"], 0u);
  // Plus the 4 snapshot keys and restores, members, workers_lost, workers_retried,
  // workers_fenced, mode, sync_round, 8 staleness
  // buckets, staleness_sum and _count, and 9 refused{reason} counters (no
  // member: no worker_* keys), and the 6 sparse-table totals (no table: no
  // table_*{table=...} keys).
  EXPECT_EQ(m["snapshots_written"], 0u);
  EXPECT_EQ(m["tables"], 0u);
  EXPECT_EQ(m["row_pushes"], 0u);
  EXPECT_EQ(m["members"], 0u);
  EXPECT_EQ(m["refused{reason=\"auth\"}"], 0u);
  EXPECT_EQ(m["refused{reason=\"tls\"}"], 0u);
  EXPECT_EQ(m["workers_lost"], 0u);
  EXPECT_EQ(m["restores"], 0u);
  EXPECT_EQ(m["workers_fenced"], 0u);
  EXPECT_EQ(m["connections_unchecked"], 0u);  // TCP keeps CRC-32C by default
  EXPECT_EQ(m.size(), 13u + 5u + 6u + 8u + 2u + 9u + 6u);
}

}  // namespace
}  // namespace tensorspark
