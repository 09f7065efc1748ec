// Wire options: fp16/bf16 encodings of pushes and pulls, Unix-domain sockets.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "protocol/half.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using protocol::Opcode;
using testing::RawConn;
using testing::StartServer;
using testing::TestClientOptions;
using testing::TestServerOptions;

std::unique_ptr<Client> Connect(ClientOptions o) {
  std::unique_ptr<Client> c;
  Status s = Client::Connect(o, &c);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return c;
}

std::unique_ptr<Client> ConnectEncoded(uint16_t port, WireEncoding e) {
  ClientOptions o = TestClientOptions(port);
  o.encoding = e;
  return Connect(o);
}

// Values spread over fp16's normal range, both signs.
std::vector<float> RandomValues(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> exp10(-4.0f, 4.0f);
  std::vector<float> v(n);
  for (float& x : v) x = std::pow(10.0f, exp10(rng)) * ((rng() & 1) != 0 ? 1.0f : -1.0f);
  return v;
}

double MaxRelError(const std::vector<float>& want, const std::vector<float>& got) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::abs(double(got[i]) - want[i]) / std::abs(double(want[i])));
  }
  return worst;
}

// Per-thread socket path under /tmp (short: sun_path holds 107 bytes).
std::string SocketPath(const char* tag) {
  return "/tmp/ts-wire-" + std::to_string(::getpid()) + "-" + tag + ".sock";
}

TEST(WireFrameTest, EncodedPushAndPullPayloadsDecode) {
  // A PUSH with a 3-element fp16 data section: 6 data bytes, not 12.
  std::vector<uint8_t> p;
  protocol::EncodePushHead({2, 1, 0.0f}, &p);
  protocol::Writer w(&p);
  w.U32(1);
  const int64_t shape[] = {3};
  w.Meta("x", shape);
  const float vals[3] = {1.0f, -2.5f, 1024.0f};
  uint16_t enc[3];
  protocol::FloatToHalf(vals, enc, 3);
  w.Bytes(enc, sizeof(enc));
  protocol::PushHead head;
  protocol::TensorSection t;
  ASSERT_TRUE(protocol::DecodePush(p, &head, &t, 2).ok());
  EXPECT_EQ(t.data_len, 6u);
  // The same bytes read as float32 do not match the metas.
  EXPECT_EQ(protocol::DecodePush(p, &head, &t, 4).code(), StatusCode::kProtocolError);
  // One byte short of the encoded size.
  std::vector<uint8_t> short_p(p.begin(), p.end() - 1);
  EXPECT_EQ(protocol::DecodePush(short_p, &head, &t, 2).code(), StatusCode::kProtocolError);

  // A PULL response with a bf16 data section.
  std::vector<uint8_t> r;
  protocol::Writer rw(&r);
  rw.U64(7);
  rw.U32(1);
  rw.Meta("x", shape);
  protocol::FloatToBFloat16(vals, enc, 3);
  rw.Bytes(enc, sizeof(enc));
  uint64_t version = 0;
  std::vector<Tensor> tensors;
  ASSERT_TRUE(protocol::DecodePullResponse(r, &version, &tensors, protocol::kFlagBf16).ok());
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].values, std::vector<float>(vals, vals + 3));  // exact in bf16
  EXPECT_FALSE(protocol::DecodePullResponse(r, &version, &tensors, 0).ok());

  // Header flags survive the codec.
  protocol::FrameHeader h;
  h.flags = protocol::kFlagResponse | protocol::kFlagFp16;
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(h, raw);
  EXPECT_EQ(protocol::DecodeHeader(raw).flags, h.flags);
}

class WireEncodingTest : public ::testing::TestWithParam<WireEncoding> {};

TEST_P(WireEncodingTest, PushAndPullRoundTrip) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto c = ConnectEncoded(server->port(), GetParam());
  ASSERT_NE(c, nullptr);
  // Large enough to take several conversion chunks on both sides.
  const size_t n = 200'003;
  const int64_t shape[] = {static_cast<int64_t>(n)};
  std::vector<float> zeros(n, 0.0f);
  VariableSpec spec{"w", shape, zeros};
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, nullptr).ok());
  std::vector<float> want = RandomValues(n, 1);
  TensorView tv{"w", shape, want};
  uint64_t version = 0;
  Status s = c->Push(UpdateKind::kDelta, {&tv, 1}, {}, &version);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(version, 1u);
  std::vector<float> got(n, -1.0f);
  MutableTensorView mv{"w", got};
  s = c->Pull({&mv, 1}, &version);
  ASSERT_TRUE(s.ok()) << s.ToString();
  // Each value is rounded twice (push, then pull); the second rounding is
  // exact because the stored value is already representable.
  const double bound = GetParam() == WireEncoding::kFloat16    ? std::ldexp(1.0, -11)
                       : GetParam() == WireEncoding::kBFloat16 ? std::ldexp(1.0, -8)
                                                               : 0.0;
  EXPECT_LE(MaxRelError(want, got), bound);
  if (GetParam() == WireEncoding::kFloat16) EXPECT_LT(MaxRelError(want, got), 1e-3);
  // PullAll decodes the same way.
  std::vector<Tensor> all;
  ASSERT_TRUE(c->PullAll(&all, nullptr).ok());
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].values, got);
  // A size mismatch is reported and the connection stays usable.
  std::vector<float> small(3);
  MutableTensorView bad{"w", small};
  EXPECT_EQ(c->Pull({&bad, 1}, nullptr).code(), StatusCode::kShapeMismatch);
  EXPECT_TRUE(c->Pull({&mv, 1}, nullptr).ok());
}

INSTANTIATE_TEST_SUITE_P(Encodings, WireEncodingTest,
                         ::testing::Values(WireEncoding::kFloat32, WireEncoding::kFloat16,
                                           WireEncoding::kBFloat16));

TEST(WireTest, MixedClientsOnOneServer) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  auto f32 = ConnectEncoded(server->port(), WireEncoding::kFloat32);
  auto f16 = ConnectEncoded(server->port(), WireEncoding::kFloat16);
  ASSERT_NE(f32, nullptr);
  ASSERT_NE(f16, nullptr);
  const int64_t shape[] = {4};
  std::vector<float> init = {1.0f, 2.0f, 3.0f, 4.0f};
  VariableSpec spec{"v", shape, init};
  ASSERT_TRUE(f32->Register({&spec, 1}, nullptr, nullptr).ok());
  std::vector<float> delta = {0.5f, 0.25f, -1.0f, 0.1f};
  TensorView tv{"v", shape, delta};
  ASSERT_TRUE(f16->Push(UpdateKind::kDelta, {&tv, 1}, {}, nullptr).ok());
  ASSERT_TRUE(f32->Push(UpdateKind::kDelta, {&tv, 1}, {}, nullptr).ok());
  std::vector<float> a(4), b(4);
  MutableTensorView va{"v", a}, vb{"v", b};
  uint64_t version = 0;
  ASSERT_TRUE(f32->Pull({&va, 1}, &version).ok());
  EXPECT_EQ(version, 2u);
  ASSERT_TRUE(f16->Pull({&vb, 1}, nullptr).ok());
  const float half_01 = protocol::HalfToFloatScalar(protocol::FloatToHalfScalar(0.1f));
  std::vector<float> want = {2.0f, 2.5f, 1.0f, 4.0f + half_01 + 0.1f};
  EXPECT_EQ(a, want);  // the fp32 client sees the server's exact values
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(b[i], want[i], std::abs(want[i]) * 1e-3);
}

TEST(WireTest, EncodedRegisterAndBadFlagsOverRawFrames) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  // REGISTER with an fp16 data section.
  std::vector<uint8_t> p;
  protocol::Writer w(&p);
  w.U32(1);
  const int64_t shape[] = {2};
  w.Meta("r", shape);
  const float vals[2] = {0.5f, -3.0f};
  uint16_t enc[2];
  protocol::FloatToHalf(vals, enc, 2);
  w.Bytes(enc, sizeof(enc));
  RawConn::FrameOptions fp16;
  fp16.flags = protocol::kFlagFp16;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kRegister), 10, p, fp16).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> resp;
  ASSERT_TRUE(raw.Read(&h, &resp).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse);
  // Both encodings at once.
  RawConn::FrameOptions both;
  both.flags = protocol::kFlagFp16 | protocol::kFlagBf16;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kRegister), 11, p, both).ok());
  EXPECT_EQ(raw.ReadError(11).code(), StatusCode::kProtocolError);
  // An encoding flag on an operation without tensor data.
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kStats), 12, {}, fp16).ok());
  EXPECT_EQ(raw.ReadError(12).code(), StatusCode::kProtocolError);
  // fp16 bytes announced as float32: the sizes do not match the metas.
  ASSERT_TRUE(raw.Send(Opcode::kRegister, 13, p).ok());
  EXPECT_EQ(raw.ReadError(13).code(), StatusCode::kProtocolError);
  // A bf16 PULL: the response carries the flag and decodes to the values.
  std::vector<uint8_t> pull;
  std::string_view names[] = {"r"};
  protocol::EncodePullRequest(names, &pull);
  RawConn::FrameOptions bf16;
  bf16.flags = protocol::kFlagBf16;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kPull), 14, pull, bf16).ok());
  ASSERT_TRUE(raw.Read(&h, &resp).ok());
  EXPECT_EQ(h.flags, protocol::kFlagResponse | protocol::kFlagBf16);
  uint64_t version;
  std::vector<Tensor> tensors;
  ASSERT_TRUE(protocol::DecodePullResponse(resp, &version, &tensors, h.flags).ok());
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].values, std::vector<float>(vals, vals + 2));
}

TEST(UnixSocketTest, RoundTripAndCleanup) {
  ServerOptions so = TestServerOptions();
  so.unix_path = SocketPath("rt");
  ::unlink(so.unix_path.c_str());
  auto server = StartServer(so);
  ASSERT_NE(server, nullptr);
  struct stat st {};
  ASSERT_EQ(::lstat(so.unix_path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ClientOptions co = TestClientOptions(0);  // the port is ignored
  co.host = "unix:" + so.unix_path;
  co.encoding = WireEncoding::kFloat16;
  auto c = Connect(co);
  ASSERT_NE(c, nullptr);
  const int64_t shape[] = {3};
  std::vector<float> init = {1.0f, 2.0f, 3.0f};
  VariableSpec spec{"u", shape, init};
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, nullptr).ok());
  std::vector<float> out(3);
  MutableTensorView mv{"u", out};
  ASSERT_TRUE(c->Pull({&mv, 1}, nullptr).ok());
  EXPECT_EQ(out, init);
  // TCP still works beside it.
  auto tcp = testing::ConnectClient(server->port());
  ASSERT_NE(tcp, nullptr);
  // A second server cannot take a live socket.
  std::unique_ptr<Server> other;
  EXPECT_EQ(Server::Start(so, &other).code(), StatusCode::kAddressInUse);
  c.reset();
  server->Stop();
  EXPECT_NE(::lstat(so.unix_path.c_str(), &st), 0);  // removed on Stop
}

TEST(UnixSocketTest, StaleSocketFileIsReplaced) {
  const std::string path = SocketPath("stale");
  ::unlink(path.c_str());
  {
    // A socket file nobody listens on, as a crashed server leaves behind.
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path.c_str());
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ::close(fd);
  }
  ServerOptions so = TestServerOptions();
  so.unix_path = path;
  auto server = StartServer(so);
  ASSERT_NE(server, nullptr);
  ClientOptions co = TestClientOptions(0);
  co.host = "unix:" + path;
  EXPECT_NE(Connect(co), nullptr);
}

TEST(UnixSocketTest, BadPathsAreClearErrors) {
  ServerOptions so = TestServerOptions();
  so.unix_path = "/tmp/" + std::string(200, 'x') + ".sock";
  std::unique_ptr<Server> server;
  Status s = Server::Start(so, &server);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sun_path"), std::string::npos) << s.ToString();
  // A regular file in the way is never deleted.
  so.unix_path = SocketPath("file");
  std::FILE* f = std::fopen(so.unix_path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  EXPECT_EQ(Server::Start(so, &server).code(), StatusCode::kInvalidArgument);
  struct stat st {};
  EXPECT_EQ(::lstat(so.unix_path.c_str(), &st), 0);
  ::unlink(so.unix_path.c_str());
  // A client with no server at the path fails to connect.
  ClientOptions co = TestClientOptions(0);
  co.host = "unix:" + SocketPath("none");
  co.connect_timeout_s = 0.3;
  std::unique_ptr<Client> c;
  EXPECT_FALSE(Client::Connect(co, &c).ok());
}

}  // namespace
}  // namespace tensorspark
