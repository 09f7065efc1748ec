// Stream over a plain socket or TLS 1.3 (OpenSSL), and the TLS identities
// of tensorspark/tls.h.
#include "net/stream.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "tensorspark/tls.h"

namespace tensorspark {
namespace {

std::string Hex(const unsigned char* p, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(kDigits[p[i] >> 4]);
    out.push_back(kDigits[p[i] & 15]);
  }
  return out;
}

Status Fingerprint(X509* cert, std::string* out) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) {
    return Status(StatusCode::kInternal, net::TlsErrorText("X509_digest failed"));
  }
  *out = "sha256:" + Hex(md, len);
  return Status::OK();
}

// A memory BIO's contents as a string.
std::string BioText(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return n > 0 ? std::string(data, static_cast<size_t>(n)) : std::string();
}

struct Freer {
  void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
  void operator()(X509* p) const { X509_free(p); }
  void operator()(BIO* p) const { BIO_free(p); }
  void operator()(BIGNUM* p) const { BN_free(p); }
};
template <typename T>
using Owned = std::unique_ptr<T, Freer>;

Owned<BIO> ReadOnlyBio(std::string_view text) {
  return Owned<BIO>(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

}  // namespace

Status MakeTlsIdentity(TlsIdentity* out, int valid_days) {
  if (valid_days < 1) {
    return Status(StatusCode::kInvalidArgument, "MakeTlsIdentity: valid_days must be >= 1");
  }
  auto fail = [](const char* what) {
    return Status(StatusCode::kInternal,
                  std::string("making the TLS identity: ") + net::TlsErrorText(what));
  };
  ERR_clear_error();
  Owned<EVP_PKEY> key(EVP_EC_gen("P-256"));
  if (!key) return fail("EVP_EC_gen failed");
  Owned<X509> cert(X509_new());
  Owned<BIGNUM> serial(BN_new());
  if (!cert || !serial) return fail("out of memory");
  // A random 127-bit serial (positive, as RFC 5280 asks).
  if (BN_rand(serial.get(), 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ANY) != 1 ||
      BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(cert.get())) == nullptr) {
    return fail("serial number");
  }
  X509_NAME* name = X509_get_subject_name(cert.get());
  const auto* cn = reinterpret_cast<const unsigned char*>("tensorspark-ps");
  if (X509_set_version(cert.get(), 2) != 1 ||
      X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600) == nullptr ||
      X509_gmtime_adj(X509_getm_notAfter(cert.get()), 86400L * valid_days) == nullptr ||
      X509_set_pubkey(cert.get(), key.get()) != 1 ||
      X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, cn, -1, -1, 0) != 1 ||
      X509_set_issuer_name(cert.get(), name) != 1 ||
      X509_sign(cert.get(), key.get(), EVP_sha256()) == 0) {
    return fail("building the certificate");
  }
  Owned<BIO> cert_bio(BIO_new(BIO_s_mem())), key_bio(BIO_new(BIO_s_mem()));
  if (!cert_bio || !key_bio || PEM_write_bio_X509(cert_bio.get(), cert.get()) != 1 ||
      PEM_write_bio_PrivateKey(key_bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) !=
          1) {
    return fail("writing PEM");
  }
  TlsIdentity id;
  id.cert_pem = BioText(cert_bio.get());
  id.key_pem = BioText(key_bio.get());
  TS_RETURN_IF_ERROR(Fingerprint(cert.get(), &id.fingerprint));
  *out = std::move(id);
  return Status::OK();
}

Status TlsFingerprint(std::string_view cert_pem, std::string* out) {
  ERR_clear_error();
  Owned<BIO> bio = ReadOnlyBio(cert_pem);
  Owned<X509> cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) {
    return Status(StatusCode::kInvalidArgument,
                  "no PEM certificate (-----BEGIN CERTIFICATE-----) found: " +
                      net::TlsErrorText("unreadable"));
  }
  return Fingerprint(cert.get(), out);
}

Status NormalizeTlsFingerprint(std::string_view fingerprint, std::string* out) {
  std::string_view v = fingerprint;
  for (std::string_view prefix : {"sha256:", "SHA256:"}) {
    if (v.starts_with(prefix)) v.remove_prefix(prefix.size());
  }
  std::string hex;
  for (char c : v) {
    if (c == ':') continue;
    const char lower = static_cast<char>(c >= 'A' && c <= 'F' ? c - 'A' + 'a' : c);
    if (!((lower >= '0' && lower <= '9') || (lower >= 'a' && lower <= 'f'))) {
      hex.clear();
      break;
    }
    hex.push_back(lower);
  }
  if (hex.size() != 64) {
    return Status(StatusCode::kInvalidArgument,
                  "'" + std::string(fingerprint.substr(0, 120)) +
                      "' is not a TLS certificate fingerprint: expected \"sha256:\" and the 64 "
                      "hex digits of the certificate's SHA-256 (as the server prints it)");
  }
  *out = "sha256:" + hex;
  return Status::OK();
}

namespace net {
namespace {

// A socket BIO of our own: send() with MSG_NOSIGNAL, so a peer that hangs
// up never raises SIGPIPE (OpenSSL's own socket BIO uses write()).
int BioWrite(BIO* bio, const char* data, int n) {
  const int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  for (;;) {
    const ssize_t w = ::send(fd, data, static_cast<size_t>(n), MSG_NOSIGNAL);
    if (w >= 0) return static_cast<int>(w);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_write(bio);
    return -1;
  }
}

int BioRead(BIO* bio, char* data, int n) {
  const int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  for (;;) {
    const ssize_t r = ::recv(fd, data, static_cast<size_t>(n), 0);
    if (r >= 0) return static_cast<int>(r);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(bio);
    return -1;
  }
}

long BioCtrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

// OpenSSL said SSL_ERROR_WANT_READ or _WANT_WRITE (`err`): wait for that.
Status WaitForSocket(int fd, int err, Deadline deadline, const char* what) {
  return PollFor(fd, err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline, what);
}

BIO_METHOD* SocketBioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "tensorspark-socket");
    if (m != nullptr) {
      BIO_meth_set_write(m, BioWrite);
      BIO_meth_set_read(m, BioRead);
      BIO_meth_set_ctrl(m, BioCtrl);
    }
    return m;
  }();
  return method;
}

Status NewContext(bool server, SSL_CTX** out) {
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (ctx == nullptr) {
    return Status(StatusCode::kInternal, TlsErrorText("SSL_CTX_new failed"));
  }
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  // No resumption: every connection does a full handshake against the pin.
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  // Frames are length-checked, so a missing close_notify is a plain EOF.
  SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // Whole records per recv where they fit: fewer syscalls on large pulls.
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, 64 * 1024);
  *out = ctx;
  return Status::OK();
}

}  // namespace

std::string TlsErrorText(const char* fallback) {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return fallback;
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  const char* reason = ERR_reason_error_string(e);
  return reason != nullptr ? std::string(reason) + " (" + buf + ")" : std::string(buf);
}

Status TlsContext::ForServer(std::string_view cert_pem, std::string_view key_pem,
                             std::shared_ptr<TlsContext>* out) {
  ERR_clear_error();
  Owned<BIO> cb = ReadOnlyBio(cert_pem), kb = ReadOnlyBio(key_pem);
  Owned<X509> cert(cb ? PEM_read_bio_X509(cb.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) {
    return Status(StatusCode::kInvalidArgument,
                  "tls_cert_pem holds no PEM certificate: " + TlsErrorText("unreadable"));
  }
  Owned<EVP_PKEY> key(kb ? PEM_read_bio_PrivateKey(kb.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!key) {
    return Status(
        StatusCode::kInvalidArgument,
        "tls_key_pem holds no unencrypted PEM private key: " + TlsErrorText("unreadable"));
  }
  SSL_CTX* ctx = nullptr;
  TS_RETURN_IF_ERROR(NewContext(true, &ctx));
  std::shared_ptr<TlsContext> c(new TlsContext(ctx, true, {}));
  if (SSL_CTX_use_certificate(ctx, cert.get()) != 1 ||
      SSL_CTX_use_PrivateKey(ctx, key.get()) != 1 || SSL_CTX_check_private_key(ctx) != 1) {
    return Status(StatusCode::kInvalidArgument,
                  "the TLS key does not match the certificate (or is unusable): " +
                      TlsErrorText("check failed"));
  }
  *out = std::move(c);
  return Status::OK();
}

Status TlsContext::ForClient(const std::vector<std::string>& fingerprints,
                             std::shared_ptr<TlsContext>* out) {
  if (fingerprints.empty()) {
    return Status(StatusCode::kInvalidArgument, "TLS needs at least one fingerprint to pin");
  }
  std::vector<std::string> pins;
  for (const std::string& f : fingerprints) {
    std::string canonical;
    TS_RETURN_IF_ERROR(NormalizeTlsFingerprint(f, &canonical));
    pins.push_back(std::move(canonical));
  }
  ERR_clear_error();
  SSL_CTX* ctx = nullptr;
  TS_RETURN_IF_ERROR(NewContext(false, &ctx));
  // No CA: the certificate is checked against the pins after the handshake,
  // before any frame is sent.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
  out->reset(new TlsContext(ctx, false, std::move(pins)));
  return Status::OK();
}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

Stream::~Stream() { Close(); }

Stream::Stream(Stream&& o) noexcept
    : socket_(std::move(o.socket_)),
      ssl_(o.ssl_),
      ctx_(std::move(o.ctx_)),
      in_(std::move(o.in_)),
      in_pos_(o.in_pos_),
      in_end_(o.in_end_) {
  o.ssl_ = nullptr;
  o.in_pos_ = o.in_end_ = 0;
}

Stream& Stream::operator=(Stream&& o) noexcept {
  if (this != &o) {
    Close();
    socket_ = std::move(o.socket_);
    ssl_ = o.ssl_;
    o.ssl_ = nullptr;
    ctx_ = std::move(o.ctx_);
    in_ = std::move(o.in_);
    in_pos_ = o.in_pos_;
    in_end_ = o.in_end_;
    o.in_pos_ = o.in_end_ = 0;
  }
  return *this;
}

void Stream::Close() {
  if (ssl_ != nullptr) {
    SSL_free(ssl_);
    ssl_ = nullptr;
  }
  ctx_.reset();
  socket_.Close();
  in_pos_ = in_end_ = 0;
}

Status Stream::StartTls(std::shared_ptr<TlsContext> ctx, Deadline deadline) {
  if (ssl_ != nullptr) return Status(StatusCode::kInternal, "TLS started twice on one stream");
  // Plain bytes read ahead would be lost to the TLS layer.
  if (buffered() > 0) {
    return Status(StatusCode::kProtocolError, "the peer sent data before the TLS handshake");
  }
  ERR_clear_error();
  BIO_METHOD* method = SocketBioMethod();
  SSL* ssl = method != nullptr ? SSL_new(ctx->get()) : nullptr;
  BIO* bio = ssl != nullptr ? BIO_new(method) : nullptr;
  if (bio == nullptr) {
    SSL_free(ssl);
    return Status(StatusCode::kInternal, TlsErrorText("cannot create the TLS state"));
  }
  BIO_set_data(bio, reinterpret_cast<void*>(static_cast<intptr_t>(socket_.fd())));
  BIO_set_init(bio, 1);
  SSL_set_bio(ssl, bio, bio);  // ssl owns bio
  ssl_ = ssl;
  ctx_ = ctx;
  for (;;) {
    ERR_clear_error();
    const int rc = ctx->server() ? SSL_accept(ssl_) : SSL_connect(ssl_);
    if (rc == 1) break;
    const int err = SSL_get_error(ssl_, rc);
    const int saved_errno = errno;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      TS_RETURN_IF_ERROR(WaitForSocket(socket_.fd(), err, deadline, "in the TLS handshake"));
      continue;
    }
    std::string why;
    if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && saved_errno == 0)) {
      why = "the peer closed the connection";
    } else if (err == SSL_ERROR_SYSCALL) {
      why = std::strerror(saved_errno);
    } else {
      why = TlsErrorText("protocol error");
    }
    return Status(StatusCode::kConnectionError, "TLS handshake failed: " + why);
  }
  if (!ctx->server()) {
    X509* cert = SSL_get1_peer_certificate(ssl_);
    if (cert == nullptr) {
      return Status(StatusCode::kAuthFailed, "the server presented no TLS certificate");
    }
    std::string got;
    Status s = Fingerprint(cert, &got);
    X509_free(cert);
    TS_RETURN_IF_ERROR(s);
    const auto& pins = ctx->pins();
    if (std::find(pins.begin(), pins.end(), got) == pins.end()) {
      return Status(StatusCode::kAuthFailed,
                    "the server's TLS certificate has fingerprint " + got + ", not the pinned " +
                        pins.front() + (pins.size() > 1 ? " (or another pinned one)" : "") +
                        ": another server at this address, another run's, or someone in the "
                        "middle");
    }
  }
  return Status::OK();
}

Status Stream::TlsRead(void* buf, size_t max, Deadline deadline, size_t* got, bool* eof) {
  *eof = false;
  for (;;) {
    ERR_clear_error();
    const int rc = SSL_read_ex(ssl_, buf, max, got);
    if (rc == 1) return Status::OK();
    const int err = SSL_get_error(ssl_, rc);
    const int saved_errno = errno;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      TS_RETURN_IF_ERROR(
          WaitForSocket(socket_.fd(), err, deadline, "waiting for data from the peer"));
      continue;
    }
    if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && saved_errno == 0)) {
      *eof = true;
      return Status(StatusCode::kConnectionError, "connection closed by peer");
    }
    if (err == SSL_ERROR_SYSCALL) {
      return Status(StatusCode::kConnectionError,
                    std::string("recv failed: ") + std::strerror(saved_errno));
    }
    tls_record_failed_ = true;
    return Status(StatusCode::kConnectionError,
                  "TLS record refused (" + TlsErrorText("protocol error") +
                      "): the bytes were altered in transit, or the peer broke the TLS stream");
  }
}

Status Stream::TlsWrite(const void* buf, size_t n, Deadline deadline) {
  auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    ERR_clear_error();
    size_t w = 0;
    const int rc = SSL_write_ex(ssl_, p, n, &w);
    if (rc == 1) {
      p += w;
      n -= w;
      continue;
    }
    const int err = SSL_get_error(ssl_, rc);
    const int saved_errno = errno;
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
      TS_RETURN_IF_ERROR(WaitForSocket(socket_.fd(), err, deadline, "waiting to send to the peer"));
      continue;
    }
    if (err == SSL_ERROR_SYSCALL && saved_errno != 0) {
      return Status(StatusCode::kConnectionError,
                    std::string("send failed: ") + std::strerror(saved_errno));
    }
    return Status(StatusCode::kConnectionError, "send failed (TLS): " + TlsErrorText("closed"));
  }
  return Status::OK();
}

Status Stream::RawReadSome(void* buf, size_t max, Deadline deadline, size_t* got, bool* eof) {
  if (ssl_ != nullptr) return TlsRead(buf, max, deadline, got, eof);
  *eof = false;
  for (;;) {
    const ssize_t r = ::recv(socket_.fd(), buf, max, 0);
    if (r > 0) {
      *got = static_cast<size_t>(r);
      return Status::OK();
    }
    if (r == 0) {
      *eof = true;
      return Status(StatusCode::kConnectionError, "connection closed by peer");
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      TS_RETURN_IF_ERROR(PollFor(socket_.fd(), POLLIN, deadline, "waiting for data from the peer"));
      continue;
    }
    return Status(StatusCode::kConnectionError, std::string("recv failed: ") + std::strerror(err));
  }
}

size_t Stream::TakeBuffered(uint8_t* dst, size_t n) {
  const size_t take = std::min(n, buffered());
  if (take > 0) {
    std::memcpy(dst, in_.get() + in_pos_, take);
    in_pos_ += take;
  }
  return take;
}

Status Stream::ReadFull(void* buf, size_t n, Deadline deadline, bool* clean_eof) {
  auto* p = static_cast<uint8_t*>(buf);
  if (clean_eof != nullptr) *clean_eof = false;
  size_t done = TakeBuffered(p, n);
  while (done < n) {
    const size_t want = n - done;
    size_t got = 0;
    bool eof = false;
    Status s;
    if (want >= kInputBuffer / 2) {
      // Large: straight into the caller's memory.
      s = RawReadSome(p + done, want, deadline, &got, &eof);
    } else {
      // Small: fill the buffer, so a header, its payload and any pipelined
      // frame behind them arrive in one receive.
      if (!in_) in_.reset(new uint8_t[kInputBuffer]);
      in_pos_ = in_end_ = 0;
      s = RawReadSome(in_.get(), kInputBuffer, deadline, &got, &eof);
      in_end_ = got;
      if (s.ok()) got = TakeBuffered(p + done, want);
    }
    if (!s.ok()) {
      if (eof && done == 0 && clean_eof != nullptr) *clean_eof = true;
      if (eof && done > 0) {
        return Status(StatusCode::kConnectionError,
                      "connection closed by peer in the middle of a frame (" +
                          std::to_string(done) + " of " + std::to_string(n) + " bytes received)");
      }
      return s;
    }
    done += got;
  }
  return Status::OK();
}

Status Stream::ReadSome(void* buf, size_t max, Deadline deadline, size_t* got) {
  if (buffered() > 0) {
    *got = TakeBuffered(static_cast<uint8_t*>(buf), max);
    return Status::OK();
  }
  bool eof = false;
  return RawReadSome(buf, max, deadline, got, &eof);
}

Status Stream::WaitReadable(Deadline deadline) {
  if (buffered() > 0) return Status::OK();
  // Decrypted bytes, or raw ones read ahead, are already here.
  if (ssl_ != nullptr && SSL_has_pending(ssl_) == 1) return Status::OK();
  return net::WaitReadable(socket_.fd(), deadline);
}

Status Stream::WriteV(struct iovec* iov, size_t iovcnt, Deadline deadline) {
  if (ssl_ == nullptr) return net::WriteV(socket_.fd(), iov, iovcnt, deadline);
  // Small parts (a header, a short request) share a record with what
  // follows; a large part goes to OpenSSL straight from the caller's memory.
  constexpr size_t kStage = 16 * 1024;
  uint8_t stage[kStage];
  size_t staged = 0;
  for (size_t i = 0; i < iovcnt; ++i) {
    const auto* base = static_cast<const uint8_t*>(iov[i].iov_base);
    size_t len = iov[i].iov_len;
    while (len > 0) {
      if (staged == 0 && len >= kStage) {
        TS_RETURN_IF_ERROR(TlsWrite(base, len, deadline));
        break;
      }
      const size_t take = std::min(len, kStage - staged);
      std::memcpy(stage + staged, base, take);
      staged += take;
      base += take;
      len -= take;
      if (staged == kStage) {
        TS_RETURN_IF_ERROR(TlsWrite(stage, staged, deadline));
        staged = 0;
      }
    }
  }
  if (staged > 0) TS_RETURN_IF_ERROR(TlsWrite(stage, staged, deadline));
  return Status::OK();
}

}  // namespace net
}  // namespace tensorspark
