// A connection's byte stream: a socket, read and written either directly
// or through TLS 1.3 (OpenSSL) on it. Client and server frame code does all
// its I/O through a Stream, so the protocol above never knows which.
//
// Threading: a Stream is used by one thread at a time, except socket()
// .Shutdown(), which any thread may call to wake a blocked one (the owner
// then sees a connection error). Lifetime: a Stream owns its socket and its
// TLS state; the TlsContext it was started with must outlive it (it holds a
// reference).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "net/socket.h"
#include "tensorspark/status.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

namespace tensorspark::net {

// Settings shared by every TLS connection of a server, or of one client's
// connections: TLS 1.3 only, no session tickets, no renegotiation. Immutable
// and thread-safe after creation.
class TlsContext {
 public:
  // A server's context, presenting `cert_pem` signed by `key_pem`.
  [[nodiscard]] static Status ForServer(std::string_view cert_pem, std::string_view key_pem,
                                        std::shared_ptr<TlsContext>* out);
  // A client's context, accepting a server only when its certificate's
  // SHA-256 fingerprint is one of `fingerprints` (any form
  // NormalizeTlsFingerprint accepts; at least one).
  [[nodiscard]] static Status ForClient(const std::vector<std::string>& fingerprints,
                                        std::shared_ptr<TlsContext>* out);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  bool server() const { return server_; }
  const std::vector<std::string>& pins() const { return pins_; }
  SSL_CTX* get() const { return ctx_; }

 private:
  TlsContext(SSL_CTX* ctx, bool server, std::vector<std::string> pins)
      : ctx_(ctx), server_(server), pins_(std::move(pins)) {}
  SSL_CTX* ctx_;
  bool server_;
  std::vector<std::string> pins_;  // canonical fingerprints (clients)
};

// The text of OpenSSL's newest queued error (and clears the queue), or
// `fallback` when there is none.
std::string TlsErrorText(const char* fallback);

class Stream {
 public:
  Stream() = default;
  explicit Stream(Socket socket) : socket_(std::move(socket)) {}
  ~Stream();
  Stream(Stream&& o) noexcept;
  Stream& operator=(Stream&& o) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  // Runs the TLS handshake as the side `ctx` was made for, within
  // `deadline`; afterwards every read and write is encrypted. A client
  // checks the server's certificate against the context's pins
  // (kAuthFailed on a mismatch, naming both fingerprints).
  [[nodiscard]] Status StartTls(std::shared_ptr<TlsContext> ctx, Deadline deadline);
  bool tls() const { return ssl_ != nullptr; }
  // True once a read found a TLS record that failed to authenticate or
  // decode (altered in transit, or a broken peer); the stream is unusable.
  bool tls_record_failed() const { return tls_record_failed_; }

  // The same contracts as the net:: functions of the same names. Reads go
  // through a per-stream input buffer: a small read receives up to
  // kInputBuffer bytes at once and later reads take from it first (a large
  // one goes straight into the caller's memory), so a small frame costs one
  // receive and pipelined frames behind it none.
  [[nodiscard]] Status ReadFull(void* buf, size_t n, Deadline deadline, bool* clean_eof = nullptr);
  [[nodiscard]] Status ReadSome(void* buf, size_t max, Deadline deadline, size_t* got);
  [[nodiscard]] Status WaitReadable(Deadline deadline);
  [[nodiscard]] Status WriteV(struct iovec* iov, size_t iovcnt, Deadline deadline);

  // Bytes received and not yet read, which socket-level polls cannot see.
  size_t buffered() const { return in_end_ - in_pos_; }
  std::span<const uint8_t> buffered_bytes() const {
    return {in_.get() + in_pos_, buffered()};
  }

  Socket& socket() { return socket_; }
  const Socket& socket() const { return socket_; }
  bool valid() const { return socket_.valid(); }
  // Frees the TLS state (without a close_notify) and closes the socket.
  void Close();

 private:
  // One SSL_read_ex of up to `max` bytes, waiting as OpenSSL asks.
  Status TlsRead(void* buf, size_t max, Deadline deadline, size_t* got, bool* eof);
  Status TlsWrite(const void* buf, size_t n, Deadline deadline);
  // One receive (plain or TLS) of up to `max` bytes; `eof` is set when the
  // peer closed the stream.
  Status RawReadSome(void* buf, size_t max, Deadline deadline, size_t* got, bool* eof);
  // Moves up to n buffered bytes to dst; returns how many.
  size_t TakeBuffered(uint8_t* dst, size_t n);

  static constexpr size_t kInputBuffer = 64 * 1024;

  Socket socket_;
  SSL* ssl_ = nullptr;
  std::shared_ptr<TlsContext> ctx_;  // keeps ssl_'s SSL_CTX alive
  bool tls_record_failed_ = false;
  // Input buffer (allocated on the first small read): bytes [in_pos_,
  // in_end_) are received and unread.
  std::unique_ptr<uint8_t[]> in_;
  size_t in_pos_ = 0;
  size_t in_end_ = 0;
};

}  // namespace tensorspark::net
