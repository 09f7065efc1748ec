// Helpers for the loopback tests: a started server and a raw protocol
// connection that can send arbitrary (also malformed) frames.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "net/socket.h"
#include "protocol/auth.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "tensorspark/client.h"
#include "tensorspark/server.h"

namespace tensorspark::testing {

inline const std::string kSecret = "test-secret-0123456789abcdef";

// A fresh directory under $TMPDIR (or /tmp), removed with its contents.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base ? base : "/tmp") + "/ts-test-XXXXXX";
    EXPECT_NE(::mkdtemp(tmpl.data()), nullptr) << tmpl;
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline ServerOptions TestServerOptions() {
  ServerOptions o;
  o.bind_address = "127.0.0.1";
  o.port = 0;
  o.secret = kSecret;
  o.io_timeout_s = 5;
  o.handshake_timeout_s = 5;
  return o;
}

inline std::unique_ptr<Server> StartServer(ServerOptions o = TestServerOptions()) {
  std::unique_ptr<Server> s;
  Status st = Server::Start(o, &s);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return s;
}

inline ClientOptions TestClientOptions(uint16_t port) {
  ClientOptions o;
  o.host = "127.0.0.1";
  o.port = port;
  o.secret = kSecret;
  o.connect_timeout_s = 5;
  o.io_timeout_s = 5;
  return o;
}

inline std::unique_ptr<Client> ConnectClient(uint16_t port) {
  std::unique_ptr<Client> c;
  Status st = Client::Connect(TestClientOptions(port), &c);
  EXPECT_TRUE(st.ok()) << st.ToString();
  return c;
}

// Sends `request` on a fresh loopback connection to `port` and returns every
// byte the peer answers until it closes (used for HTTP requests).
inline std::string RequestReply(uint16_t port, const std::string& request) {
  net::Socket sock;
  EXPECT_TRUE(net::ConnectWithTimeout("127.0.0.1", port, net::Deadline::In(5), &sock).ok());
  EXPECT_TRUE(net::WriteFull(sock.fd(), request.data(), request.size(), net::Deadline::In(5)).ok());
  std::string reply;
  char buf[4096];
  for (;;) {
    size_t got = 0;
    if (!net::ReadSome(sock.fd(), buf, sizeof(buf), net::Deadline::In(5), &got).ok() || got == 0)
      break;
    reply.append(buf, got);
  }
  return reply;
}

// A connection that speaks the protocol by hand.
class RawConn {
 public:
  Status Connect(uint16_t port) {
    return net::ConnectWithTimeout("127.0.0.1", port, net::Deadline::In(5), &sock_);
  }

  struct FrameOptions {
    uint16_t version = protocol::kVersion;
    uint32_t flags = 0;
    std::optional<uint32_t> checksum;
    std::optional<uint64_t> payload_len;
  };

  Status Send(uint16_t opcode, uint64_t request_id, const std::vector<uint8_t>& payload,
              FrameOptions fo) {
    protocol::FrameHeader h;
    h.version = fo.version;
    h.opcode = opcode;
    h.flags = fo.flags;
    h.request_id = request_id;
    h.payload_len = fo.payload_len.value_or(payload.size());
    h.checksum = fo.checksum.value_or(protocol::Crc32c(payload.data(), payload.size()));
    uint8_t raw[protocol::kHeaderSize];
    protocol::EncodeHeader(h, raw);
    std::vector<uint8_t> bytes(raw, raw + sizeof(raw));
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    return SendBytes(bytes);
  }
  Status Send(protocol::Opcode op, uint64_t request_id, const std::vector<uint8_t>& payload) {
    return Send(static_cast<uint16_t>(op), request_id, payload, FrameOptions{});
  }

  Status SendBytes(const std::vector<uint8_t>& bytes) {
    return net::WriteFull(sock_.fd(), bytes.data(), bytes.size(), net::Deadline::In(5));
  }

  Status Read(protocol::FrameHeader* h, std::vector<uint8_t>* payload, double timeout_s = 5) {
    uint8_t raw[protocol::kHeaderSize];
    auto deadline = net::Deadline::In(timeout_s);
    TS_RETURN_IF_ERROR(net::ReadFull(sock_.fd(), raw, sizeof(raw), deadline));
    *h = protocol::DecodeHeader(raw);
    payload->resize(h->payload_len);
    TS_RETURN_IF_ERROR(net::ReadFull(sock_.fd(), payload->data(), payload->size(), deadline));
    if (verify_checksums_ && protocol::Crc32c(payload->data(), payload->size()) != h->checksum) {
      return Status(StatusCode::kProtocolError, "bad crc from server");
    }
    return Status::OK();
  }

  // Reads one frame that must be an error frame; returns the remote status.
  Status ReadError(uint64_t expect_request_id) {
    protocol::FrameHeader h;
    std::vector<uint8_t> p;
    Status s = Read(&h, &p);
    if (!s.ok()) return Status(StatusCode::kInternal, "no error frame: " + s.ToString());
    EXPECT_EQ(h.flags, protocol::kFlagResponse | protocol::kFlagError);
    EXPECT_EQ(h.request_id, expect_request_id);
    Status remote;
    EXPECT_TRUE(protocol::DecodeError(p, &remote).ok());
    return remote;
  }

  // True if the server closed the connection (EOF) within the timeout.
  bool PeerClosed(double timeout_s = 5) {
    uint8_t b;
    bool eof = false;
    Status s = net::ReadFull(sock_.fd(), &b, 1, net::Deadline::In(timeout_s), &eof);
    return !s.ok() && s.code() == StatusCode::kConnectionError;
  }

  Status Handshake(const std::string& secret = kSecret) {
    protocol::HelloRequest hello;
    TS_RETURN_IF_ERROR(protocol::RandomNonce(&hello.client_nonce));
    hello.partition_id = 1;
    hello.attempt = 0;
    hello.client_name = "raw-test";
    std::vector<uint8_t> p;
    protocol::EncodeHello(hello, &p);
    TS_RETURN_IF_ERROR(Send(protocol::Opcode::kHello, 1, p));
    protocol::FrameHeader h;
    std::vector<uint8_t> resp;
    TS_RETURN_IF_ERROR(Read(&h, &resp));
    if (h.flags & protocol::kFlagError) {
      Status remote;
      (void)protocol::DecodeError(resp, &remote);
      return remote;
    }
    protocol::Nonce server_nonce;
    TS_RETURN_IF_ERROR(protocol::DecodeNonce(resp, &server_nonce));
    protocol::Digest proof = protocol::ClientProof(secret, server_nonce, hello.client_nonce, 1, 0);
    TS_RETURN_IF_ERROR(
        Send(protocol::Opcode::kAuth, 2, std::vector<uint8_t>(proof.begin(), proof.end())));
    TS_RETURN_IF_ERROR(Read(&h, &resp));
    if (h.flags & protocol::kFlagError) {
      Status remote;
      (void)protocol::DecodeError(resp, &remote);
      return remote;
    }
    return Status::OK();
  }

  net::Socket& socket() { return sock_; }
  // Off for a connection that negotiated kOptionNoChecksum.
  void set_verify_checksums(bool on) { verify_checksums_ = on; }

 private:
  net::Socket sock_;
  bool verify_checksums_ = true;
};

}  // namespace tensorspark::testing
