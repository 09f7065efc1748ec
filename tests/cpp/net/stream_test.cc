// TLS: identities, pinned clients against a TLS server, and the refusals
// between plain and TLS peers.
#include "net/stream.h"

#include <gtest/gtest.h>

#include <numeric>

#include "tensorspark/tls.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using testing::StartServer;
using testing::TestClientOptions;
using testing::TestServerOptions;

TlsIdentity NewIdentity() {
  TlsIdentity id;
  Status s = MakeTlsIdentity(&id);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return id;
}

// Options of a client of `server` that pins `pins`.
ClientOptions Pinned(const Server& server, std::vector<std::string> pins) {
  ClientOptions co = TestClientOptions(server.port());
  co.tls_fingerprints = std::move(pins);
  return co;
}

std::unique_ptr<Server> StartTlsServer(const TlsIdentity& id) {
  ServerOptions o = TestServerOptions();
  o.tls_cert_pem = id.cert_pem;
  o.tls_key_pem = id.key_pem;
  return StartServer(o);
}

TEST(TlsIdentityTest, FingerprintIsTheCertificatesAndEveryIdentityIsNew) {
  TlsIdentity a = NewIdentity(), b = NewIdentity();
  EXPECT_EQ(a.fingerprint.size(), 7u + 64u) << a.fingerprint;
  EXPECT_TRUE(a.fingerprint.starts_with("sha256:"));
  EXPECT_NE(a.cert_pem.find("-----BEGIN CERTIFICATE-----"), std::string::npos);
  EXPECT_NE(a.key_pem.find("-----BEGIN PRIVATE KEY-----"), std::string::npos);
  std::string fp;
  ASSERT_TRUE(TlsFingerprint(a.cert_pem, &fp).ok());
  EXPECT_EQ(fp, a.fingerprint);
  EXPECT_NE(a.fingerprint, b.fingerprint);
  EXPECT_EQ(TlsFingerprint("not a certificate", &fp).code(), StatusCode::kInvalidArgument);
}

TEST(TlsIdentityTest, FingerprintFormsAreNormalizedAndOthersRefused) {
  const std::string hex(64, 'a');
  std::string colons;
  for (size_t i = 0; i < 64; i += 2) colons += (i ? ":" : "") + std::string("AA");
  std::string out;
  for (const std::string& f : {hex, "sha256:" + hex, "SHA256:" + colons, colons}) {
    ASSERT_TRUE(NormalizeTlsFingerprint(f, &out).ok()) << f;
    EXPECT_EQ(out, "sha256:" + hex);
  }
  for (const std::string& f :
       {std::string(), hex.substr(1), hex + "a", "sha1:" + hex, std::string(63, 'a') + "g"}) {
    Status s = NormalizeTlsFingerprint(f, &out);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << f;
    EXPECT_NE(s.message().find("fingerprint"), std::string::npos) << s.message();
  }
}

TEST(TlsServerTest, BadOrHalfIdentityIsRefusedAtStart) {
  TlsIdentity id = NewIdentity(), other = NewIdentity();
  std::unique_ptr<Server> s;
  ServerOptions o = TestServerOptions();
  o.tls_cert_pem = id.cert_pem;
  EXPECT_EQ(Server::Start(o, &s).code(), StatusCode::kInvalidArgument);  // no key
  o.tls_key_pem = "garbage";
  EXPECT_EQ(Server::Start(o, &s).code(), StatusCode::kInvalidArgument);
  o.tls_key_pem = other.key_pem;  // another certificate's key
  Status st = Server::Start(o, &s);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("does not match"), std::string::npos) << st.message();
}

TEST(TlsServerTest, PinnedClientPushesAndPullsLargeTensors) {
  TlsIdentity id = NewIdentity();
  auto server = StartTlsServer(id);
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> c;
  Status s = Client::Connect(Pinned(*server, {id.fingerprint}), &c);
  ASSERT_TRUE(s.ok()) << s.ToString();
  // Many TLS records each way, and a frame split across them.
  const size_t n = 1'000'003;
  std::vector<float> init(n);
  std::iota(init.begin(), init.end(), 0.0f);
  std::vector<int64_t> shape = {static_cast<int64_t>(n)};
  VariableSpec spec{"w", shape, init};
  std::vector<bool> created;
  ASSERT_TRUE(c->Register({&spec, 1}, &created, nullptr).ok());
  std::vector<float> delta(n, 1.0f);
  TensorView tv{"w", shape, delta};
  uint64_t version = 0;
  s = c->Push(UpdateKind::kDelta, {&tv, 1}, PushOptions{}, &version);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(version, 1u);
  std::vector<float> out(n);
  MutableTensorView mv{"w", out};
  ASSERT_TRUE(c->Pull({&mv, 1}, &version).ok());
  for (size_t i = 0; i < n; i += 99'991) EXPECT_EQ(out[i], init[i] + 1.0f) << i;
  EXPECT_EQ(out[n - 1], init[n - 1] + 1.0f);
}

TEST(TlsServerTest, WrongPinIsAuthFailedNamingBothFingerprints) {
  TlsIdentity id = NewIdentity(), other = NewIdentity();
  auto server = StartTlsServer(id);
  ASSERT_NE(server, nullptr);
  ClientOptions co = Pinned(*server, {other.fingerprint});
  std::unique_ptr<Client> c;
  Status s = Client::Connect(co, &c);
  EXPECT_EQ(s.code(), StatusCode::kAuthFailed) << s.ToString();
  EXPECT_NE(s.message().find(id.fingerprint), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(other.fingerprint), std::string::npos) << s.message();
  co.tls_fingerprints = {other.fingerprint, id.fingerprint};  // any pin may match
  ASSERT_TRUE(Client::Connect(co, &c).ok());
  co.tls_fingerprints = {"sha256:nothex"};
  EXPECT_EQ(Client::Connect(co, &c).code(), StatusCode::kInvalidArgument);
}

TEST(TlsServerTest, PlainClientIsToldTheServerWantsTls) {
  TlsIdentity id = NewIdentity();
  auto server = StartTlsServer(id);
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> c;
  Status s = Client::Connect(TestClientOptions(server->port()), &c);
  EXPECT_EQ(s.code(), StatusCode::kAuthFailed) << s.ToString();
  EXPECT_NE(s.message().find("TLS connections only"), std::string::npos) << s.message();
}

TEST(TlsServerTest, TlsClientOfAPlainServerIsAConnectionError) {
  auto server = StartServer();
  ASSERT_NE(server, nullptr);
  std::unique_ptr<Client> c;
  Status s = Client::Connect(Pinned(*server, {NewIdentity().fingerprint}), &c);
  EXPECT_EQ(s.code(), StatusCode::kConnectionError) << s.ToString();
  EXPECT_NE(s.message().find("started with TLS"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tensorspark
