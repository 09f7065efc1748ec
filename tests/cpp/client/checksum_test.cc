// Connection options: the checksum negotiated per connection in HELLO.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <thread>

#include "tensorspark/tls.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using protocol::Opcode;
using testing::RawConn;
using testing::StartServer;
using testing::TestClientOptions;
using testing::TestServerOptions;

uint64_t StatOf(Client* c, const std::string& key) {
  std::vector<StatEntry> stats;
  EXPECT_TRUE(c->Stats(&stats).ok());
  std::map<std::string, uint64_t> m(stats.begin(), stats.end());
  EXPECT_TRUE(m.count(key)) << key;
  return m[key];
}

// Registers w = [1, 2, 3], pushes a delta of 1 and pulls it back.
void PushPullWorks(Client* c) {
  const int64_t shape[1] = {3};
  std::vector<float> init = {1, 2, 3}, delta = {1, 1, 1}, out(3);
  VariableSpec spec{"w", shape, init};
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, nullptr).ok());
  TensorView tv{"w", shape, delta};
  ASSERT_TRUE(c->Push(UpdateKind::kDelta, {&tv, 1}, {}, nullptr).ok());
  MutableTensorView mv{"w", out};
  Status s = c->Pull({&mv, 1}, nullptr);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(out, (std::vector<float>{2, 3, 4}));
}

std::unique_ptr<Client> Connect(const ClientOptions& o) {
  std::unique_ptr<Client> c;
  Status s = Client::Connect(o, &c);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return c;
}

TEST(HelloOptionsTest, OptionsAreATrailingU32OnlyWhenSet) {
  protocol::HelloRequest plain;
  plain.client_name = "x";
  std::vector<uint8_t> a, b;
  protocol::EncodeHello(plain, &a);
  protocol::HelloRequest with = plain;
  with.has_options = true;
  with.options = protocol::kOptionNoChecksum;
  protocol::EncodeHello(with, &b);
  ASSERT_EQ(b.size(), a.size() + 4);
  protocol::HelloRequest got;
  ASSERT_TRUE(protocol::DecodeHello(a, &got).ok());
  EXPECT_FALSE(got.has_options);
  ASSERT_TRUE(protocol::DecodeHello(b, &got).ok());
  EXPECT_TRUE(got.has_options);
  EXPECT_EQ(got.options, protocol::kOptionNoChecksum);
  b.pop_back();  // a truncated u32 is malformed
  EXPECT_EQ(protocol::DecodeHello(b, &got).code(), StatusCode::kProtocolError);

  protocol::Nonce n{};
  n.fill(7);
  std::vector<uint8_t> r;
  protocol::EncodeHelloResponse(n, true, protocol::kOptionNoChecksum, &r);
  ASSERT_EQ(r.size(), 36u);
  protocol::Nonce back;
  uint32_t accepted = 0;
  ASSERT_TRUE(protocol::DecodeHelloResponse(r, true, &back, &accepted).ok());
  EXPECT_EQ(back, n);
  EXPECT_EQ(accepted, protocol::kOptionNoChecksum);
  // A plain client expects the nonce alone; an options client the u32 too.
  EXPECT_FALSE(protocol::DecodeHelloResponse(r, false, &back, &accepted).ok());
  r.resize(32);
  EXPECT_FALSE(protocol::DecodeHelloResponse(r, true, &back, &accepted).ok());
  r.clear();
  protocol::EncodeHelloResponse(n, true, 1u << 7, &r);
  EXPECT_FALSE(protocol::DecodeHelloResponse(r, true, &back, &accepted).ok());
}

TEST(ChecksumModeTest, TcpChecksumsByDefaultAndOffOnRequest) {
  auto server = StartServer();
  auto on = Connect(TestClientOptions(server->port()));
  EXPECT_TRUE(on->checksums());
  ClientOptions o = TestClientOptions(server->port());
  o.checksums = ChecksumMode::kOff;
  auto off = Connect(o);
  EXPECT_FALSE(off->checksums());
  EXPECT_EQ(StatOf(on.get(), "connections_unchecked"), 1u);
  PushPullWorks(off.get());
  off->Close();
  // The gauge counts open connections only.
  for (int i = 0; i < 100 && StatOf(on.get(), "connections_unchecked") != 0; ++i) {
    ::usleep(10'000);
  }
  EXPECT_EQ(StatOf(on.get(), "connections_unchecked"), 0u);
}

TEST(ChecksumModeTest, UnixAndTlsSkipChecksumsByDefault) {
  ServerOptions so = TestServerOptions();
  so.unix_path = "/tmp/ts-crc-" + std::to_string(::getpid()) + ".sock";
  auto server = StartServer(so);
  ClientOptions uo = TestClientOptions(0);
  uo.host = "unix:" + so.unix_path;
  auto unix_client = Connect(uo);
  EXPECT_FALSE(unix_client->checksums());
  PushPullWorks(unix_client.get());
  uo.checksums = ChecksumMode::kOn;
  auto checked = Connect(uo);
  EXPECT_TRUE(checked->checksums());
  server->Stop();

  TlsIdentity id;
  ASSERT_TRUE(MakeTlsIdentity(&id).ok());
  ServerOptions to = TestServerOptions();
  to.tls_cert_pem = id.cert_pem;
  to.tls_key_pem = id.key_pem;
  auto tls_server = StartServer(to);
  ClientOptions co = TestClientOptions(tls_server->port());
  co.tls_fingerprints = {id.fingerprint};
  auto tls_client = Connect(co);
  EXPECT_FALSE(tls_client->checksums());
  PushPullWorks(tls_client.get());
}

// By hand: after a HELLO asking for no checksum, the server answers with
// the accepted options (unknown bits declined), ignores request checksums
// and writes 0 in its own; the handshake frames keep theirs.
TEST(ChecksumModeTest, UncheckedFramesCarryZeroAndAreNotVerified) {
  auto server = StartServer();
  RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  protocol::HelloRequest hello;
  ASSERT_TRUE(protocol::RandomNonce(&hello.client_nonce).ok());
  hello.partition_id = 1;
  hello.has_options = true;
  hello.options = protocol::kOptionNoChecksum | (1u << 20);
  std::vector<uint8_t> p;
  protocol::EncodeHello(hello, &p);
  ASSERT_TRUE(raw.Send(Opcode::kHello, 1, p).ok());
  protocol::FrameHeader h;
  std::vector<uint8_t> resp;
  ASSERT_TRUE(raw.Read(&h, &resp).ok());  // verifies the CRC
  protocol::Nonce server_nonce;
  uint32_t accepted = 0;
  ASSERT_TRUE(protocol::DecodeHelloResponse(resp, true, &server_nonce, &accepted).ok());
  EXPECT_EQ(accepted, protocol::kOptionNoChecksum);
  protocol::Digest proof =
      protocol::ClientProof(testing::kSecret, server_nonce, hello.client_nonce, 1, 0);
  ASSERT_TRUE(raw.Send(Opcode::kAuth, 2, std::vector<uint8_t>(proof.begin(), proof.end())).ok());
  ASSERT_TRUE(raw.Read(&h, &resp).ok());
  ASSERT_EQ(h.flags & protocol::kFlagError, 0u);

  // REGISTER with a wrong checksum is applied; the answer carries 0.
  std::vector<uint8_t> reg;
  protocol::Writer w(&reg);
  w.U32(1);
  const int64_t shape[1] = {2};
  w.Meta("v", shape);
  w.F32(5);
  w.F32(6);
  RawConn::FrameOptions fo;
  fo.checksum = 0xdeadbeef;
  ASSERT_TRUE(raw.Send(static_cast<uint16_t>(Opcode::kRegister), 3, reg, fo).ok());
  raw.set_verify_checksums(false);
  ASSERT_TRUE(raw.Read(&h, &resp).ok());
  EXPECT_EQ(h.flags & protocol::kFlagError, 0u);
  EXPECT_EQ(h.checksum, 0u);
  EXPECT_FALSE(resp.empty());
}

// A server from before connection options, in front of a real one: it
// refuses a HELLO with trailing bytes as malformed and closes, and relays
// every other connection unchanged.
class OldServerFront {
 public:
  explicit OldServerFront(uint16_t backend) : backend_(backend) {
    EXPECT_TRUE(net::Listen("127.0.0.1", 0, &listener_, &port_).ok());
    thread_ = std::thread([this] { Loop(); });
  }
  ~OldServerFront() {
    stop_ = true;
    thread_.join();
  }
  uint16_t port() const { return port_; }
  int connections() const { return connections_; }
  int refused() const { return refused_; }

 private:
  void Loop() {
    while (!stop_) {
      net::Socket in;
      std::string peer;
      if (!net::Accept(listener_, net::Deadline::In(0.05), &in, &peer).ok()) continue;
      ++connections_;
      uint8_t raw[protocol::kHeaderSize];
      if (!net::ReadFull(in.fd(), raw, sizeof(raw), net::Deadline::In(5)).ok()) continue;
      const protocol::FrameHeader h = protocol::DecodeHeader(raw);
      std::vector<uint8_t> payload(h.payload_len);
      if (!net::ReadFull(in.fd(), payload.data(), payload.size(), net::Deadline::In(5)).ok()) {
        continue;
      }
      protocol::HelloRequest hello;
      if (protocol::DecodeHello(payload, &hello).ok() && hello.has_options) {
        // What the old DecodeHello said: its Finish() saw trailing bytes.
        ++refused_;
        std::vector<uint8_t> err;
        protocol::EncodeError(Status(StatusCode::kProtocolError, "trailing bytes in HELLO"), &err);
        protocol::FrameHeader e;
        e.opcode = h.opcode;
        e.flags = protocol::kFlagResponse | protocol::kFlagError;
        e.request_id = h.request_id;
        e.payload_len = err.size();
        e.checksum = protocol::Crc32c(err.data(), err.size());
        uint8_t eh[protocol::kHeaderSize];
        protocol::EncodeHeader(e, eh);
        (void)net::WriteFull(in.fd(), eh, sizeof(eh), net::Deadline::In(5));
        (void)net::WriteFull(in.fd(), err.data(), err.size(), net::Deadline::In(5));
        continue;  // closes
      }
      net::Socket out;
      if (!net::ConnectWithTimeout("127.0.0.1", backend_, net::Deadline::In(5), &out).ok()) {
        continue;
      }
      (void)net::WriteFull(out.fd(), raw, sizeof(raw), net::Deadline::In(5));
      (void)net::WriteFull(out.fd(), payload.data(), payload.size(), net::Deadline::In(5));
      relays_.emplace_back(
          [a = std::move(in), b = std::move(out), this]() mutable { Relay(a.fd(), b.fd()); });
    }
    for (auto& t : relays_) t.join();
  }
  // Copies both ways until either side closes or the front stops.
  void Relay(int a, int b) {
    uint8_t buf[65536];
    while (!stop_) {
      for (auto [from, to] : {std::pair{a, b}, std::pair{b, a}}) {
        size_t got = 0;
        Status s = net::ReadSome(from, buf, sizeof(buf), net::Deadline::In(0.01), &got);
        if (s.code() == StatusCode::kTimeout) continue;
        if (!s.ok() || got == 0 || !net::WriteFull(to, buf, got, net::Deadline::In(5)).ok()) {
          return;
        }
      }
    }
  }

  const uint16_t backend_;
  net::Socket listener_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::atomic<int> refused_{0};
  std::thread thread_;
  std::vector<std::thread> relays_;  // the accept thread's only
};

TEST(ChecksumModeTest, OlderServerKeepsChecksumsAfterOneRetry) {
  auto server = StartServer();
  OldServerFront front(server->port());
  ClientOptions o = TestClientOptions(front.port());
  o.checksums = ChecksumMode::kOff;
  auto c = Connect(o);
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->checksums());
  EXPECT_EQ(front.refused(), 1);
  EXPECT_EQ(front.connections(), 2);
  PushPullWorks(c.get());
  // A client that asks for nothing connects once, as before.
  auto plain = Connect(TestClientOptions(front.port()));
  EXPECT_TRUE(plain->checksums());
  EXPECT_EQ(front.connections(), 3);
  c->Close();
  plain->Close();
}

}  // namespace
}  // namespace tensorspark
