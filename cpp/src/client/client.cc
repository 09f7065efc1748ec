// Client and ClientImpl: one authenticated connection, blocking calls.
#include "tensorspark/client.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "net/socket.h"
#include "net/stream.h"
#include "optimizers/optimizers.h"
#include "protocol/auth.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"
#include "storage/sparse_table.h"

namespace tensorspark {

using protocol::FrameHeader;
using protocol::Opcode;

namespace {

// Error frames carry a short message; a larger one means a broken stream.
constexpr uint64_t kMaxErrorPayload = 1 << 20;

// Reads one response payload of known length from the socket, in order,
// keeping a running CRC-32C of every byte consumed (unless the connection
// negotiated checksums off). Small reads (headers of
// tensors) are served from a buffer; large ones go straight into the
// caller's memory. Never reads past the payload.
class PayloadReader {
 public:
  static constexpr size_t kBufSize = 64 * 1024;

  // `buf` is kBufSize bytes of scratch owned by the caller (reused per call).
  PayloadReader(net::Stream* stream, uint64_t len, net::Deadline deadline, uint8_t* buf,
                bool verify)
      : stream_(stream), unread_(len), deadline_(deadline), buf_(buf), verify_(verify) {}

  uint64_t remaining() const { return unread_ + (end_ - pos_); }
  // Whether the bytes consumed match the header's checksum (always true
  // when not verifying).
  bool Matches(uint32_t checksum) const { return !verify_ || crc_ == checksum; }

  Status Read(void* dst, size_t n) {
    if (n > remaining()) {
      return Status(StatusCode::kProtocolError, "response payload is shorter than its contents");
    }
    auto* out = static_cast<uint8_t*>(dst);
    size_t from_buf = std::min(n, end_ - pos_);
    if (from_buf > 0) {
      std::memcpy(out, buf() + pos_, from_buf);
      if (verify_) crc_ = protocol::Crc32cExtend(crc_, buf() + pos_, from_buf);
      pos_ += from_buf;
      out += from_buf;
      n -= from_buf;
    }
    if (n >= kDirectMin) {
      // Large: receive in place, checksumming each chunk while it is hot.
      while (n > 0) {
        size_t chunk = std::min(n, kChunk);
        TS_RETURN_IF_ERROR(stream_->ReadFull(out, chunk, deadline_));
        if (verify_) crc_ = protocol::Crc32cExtend(crc_, out, chunk);
        unread_ -= chunk;
        out += chunk;
        n -= chunk;
      }
      return Status::OK();
    }
    while (n > 0) {
      TS_RETURN_IF_ERROR(Fill());
      size_t take = std::min(n, end_ - pos_);
      std::memcpy(out, buf() + pos_, take);
      if (verify_) crc_ = protocol::Crc32cExtend(crc_, buf() + pos_, take);
      pos_ += take;
      out += take;
      n -= take;
    }
    return Status::OK();
  }

  // Consumes the rest of the payload (still checksummed).
  Status Drain() {
    std::vector<uint8_t> scratch(std::min<uint64_t>(remaining(), kChunk));
    while (remaining() > 0) {
      size_t take = static_cast<size_t>(std::min<uint64_t>(remaining(), scratch.size()));
      TS_RETURN_IF_ERROR(Read(scratch.data(), take));
    }
    return Status::OK();
  }

  Status U8(uint8_t* v) { return Read(v, 1); }
  Status U16(uint16_t* v) {
    uint8_t b[2];
    TS_RETURN_IF_ERROR(Read(b, 2));
    *v = protocol::LoadLE16(b);
    return Status::OK();
  }
  Status U32(uint32_t* v) {
    uint8_t b[4];
    TS_RETURN_IF_ERROR(Read(b, 4));
    *v = protocol::LoadLE32(b);
    return Status::OK();
  }
  Status U64(uint64_t* v) {
    uint8_t b[8];
    TS_RETURN_IF_ERROR(Read(b, 8));
    *v = protocol::LoadLE64(b);
    return Status::OK();
  }

  // A `meta`, with the same checks as protocol::Reader::ReadMeta.
  Status Meta(VariableInfo* info, uint64_t* numel) {
    uint16_t len;
    TS_RETURN_IF_ERROR(U16(&len));
    uint8_t head[1024 + 2];
    if (len > protocol::kMaxNameLen) {
      return Status(StatusCode::kProtocolError, "response has a variable name over 1024 bytes");
    }
    TS_RETURN_IF_ERROR(Read(head, len + 2u));
    uint8_t dims[8 * protocol::kMaxDims];
    uint8_t ndim = head[len + 1];
    if (ndim > protocol::kMaxDims) {
      return Status(StatusCode::kProtocolError, "response has a tensor with over 8 dimensions");
    }
    TS_RETURN_IF_ERROR(Read(dims, ndim * 8u));
    // Re-encode into one buffer and parse it with the shared checks.
    std::vector<uint8_t> enc;
    protocol::Writer w(&enc);
    w.U16(len);
    w.Bytes(head, len + 2u);
    w.Bytes(dims, ndim * 8u);
    protocol::Reader r(enc);
    TS_RETURN_IF_ERROR(r.ReadMeta(info, numel));
    return r.Finish();
  }

 private:
  static constexpr size_t kDirectMin = 16 * 1024;
  static constexpr size_t kChunk = 256 * 1024;  // checksummed while in L2

  uint8_t* buf() { return buf_; }

  Status Fill() {
    if (pos_ < end_) return Status::OK();
    size_t want = static_cast<size_t>(std::min<uint64_t>(unread_, kBufSize));
    size_t got = 0;
    TS_RETURN_IF_ERROR(stream_->ReadSome(buf(), want, deadline_, &got));
    pos_ = 0;
    end_ = got;
    unread_ -= got;
    return Status::OK();
  }

  net::Stream* stream_;
  uint64_t unread_;  // payload bytes not yet received from the socket
  net::Deadline deadline_;
  uint32_t crc_ = 0;
  uint8_t* buf_;
  const bool verify_;
  size_t pos_ = 0;
  size_t end_ = 0;
};

std::string Where(const ClientOptions& o) {
  if (o.host.starts_with("unix:")) return o.host;
  return o.host + ":" + std::to_string(o.port);
}

Status ValidateSpec(std::string_view name, std::span<const int64_t> shape, size_t data_size,
                    uint64_t* numel) {
  TS_RETURN_IF_ERROR(protocol::ValidateMeta(name, shape, numel));
  if (*numel != data_size) {
    return Status(StatusCode::kInvalidArgument,
                  "tensor '" + std::string(name) + "' has shape " + protocol::ShapeToString(shape) +
                      " (" + std::to_string(*numel) + " elements) but its data holds " +
                      std::to_string(data_size) + " floats");
  }
  return Status::OK();
}

// What identifies one version of the dump file's content, cheaply (stat).
struct FileStamp {
  off_t size = 0;
  int64_t mtime_s = 0;
  int64_t mtime_ns = 0;
  ino_t ino = 0;
  dev_t dev = 0;
  bool operator==(const FileStamp&) const = default;
};

FileStamp StampOf(const struct stat& st) {
  return {st.st_size, static_cast<int64_t>(st.st_mtim.tv_sec),
          static_cast<int64_t>(st.st_mtim.tv_nsec), st.st_ino, st.st_dev};
}

// Reads the last protocol::kMaxReportBytes of a regular file, starting at a
// UTF-8 character boundary; `stamp` is of the bytes read. On failure
// returns a description (errno text).
std::string ReadFileTail(const std::string& path, std::string* text, FileStamp* stamp) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return std::string("cannot open: ") + std::strerror(errno);
  std::string err;
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    err = std::string("cannot stat: ") + std::strerror(errno);
  } else if (!S_ISREG(st.st_mode)) {
    err = "not a regular file";
  } else {
    *stamp = StampOf(st);
    const off_t want = std::min<off_t>(st.st_size, protocol::kMaxReportBytes);
    const off_t offset = st.st_size - want;
    text->resize(static_cast<size_t>(want));
    size_t got = 0;
    while (got < text->size()) {
      const ssize_t n =
          ::pread(fd, text->data() + got, text->size() - got, offset + static_cast<off_t>(got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        err = std::string("cannot read: ") + std::strerror(errno);
        break;
      }
      if (n == 0) break;  // truncated meanwhile
      got += static_cast<size_t>(n);
    }
    text->resize(got);
    // A cut at `offset` may split a character: skip its continuation bytes.
    size_t skip = 0;
    while (offset > 0 && skip < 3 && skip < got &&
           (static_cast<uint8_t>((*text)[skip]) & 0xC0) == 0x80) {
      ++skip;
    }
    text->erase(0, skip);
  }
  ::close(fd);
  return err;
}

}  // namespace

class ClientImpl {
 public:
  explicit ClientImpl(const ClientOptions& o) : options_(o) {}

  Status Connect();
  Status Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                  uint64_t* version);
  Status List(std::vector<VariableInfo>* out, uint64_t* version);
  Status Pull(std::span<const MutableTensorView> out, uint64_t* version);
  Status PullAll(std::vector<Tensor>* out, uint64_t* version);
  Status Push(UpdateKind kind, std::span<const TensorView> tensors, const PushOptions& options,
              uint64_t* version);
  Status SetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                      uint64_t* version);
  Status Stats(std::vector<StatEntry>* out);
  Status Shutdown();
  Status Join(uint64_t* clock);
  Status Leave();
  Status Heartbeat() { return SendHeartbeat(LatestProgress()); }
  Status Configure(const RunConfig& config);
  Status Report(std::string_view text);
  Status Reports(std::vector<WorkerReport>* out);
  Status Snapshot(uint64_t tag, std::string* name, uint64_t* version);
  Status Snapshots(std::vector<SnapshotInfo>* out);
  Status Restore(uint64_t tag, uint64_t* version);
  Status CreateTables(std::span<const TableConfig> tables, std::vector<bool>* created);
  Status PullRows(std::span<const RowsRequest> req, uint64_t* version);
  Status PushRows(UpdateKind kind, float learning_rate, std::span<const RowsUpdate> req,
                  uint64_t* version);
  Status ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                    std::vector<int64_t>* ids, std::vector<float>* values, uint32_t* dim,
                    uint64_t* next_cursor);
  Status ListTables(std::vector<TableInfo>* out);
  void SetDumpFile(std::string path) {
    std::lock_guard lock(dump_mu_);
    dump_path_ = std::move(path);
    ++dump_generation_;
  }
  void ReportProgress(const protocol::ProgressReport& report) {
    std::lock_guard lock(progress_mu_);
    progress_ = report;
  }
  void Close() {
    StopHeartbeat();
    joined_ = false;
    sock_.Close();
    connected_ = false;
  }
  ~ClientImpl() { StopHeartbeat(); }
  bool connected() const { return connected_; }
  bool checksums() const { return checksums_; }

 private:
  Status Handshake(net::Deadline deadline);
  // ClientOptions::checksums resolved for this connection's transport.
  bool WantChecksums() const;
  Status CheckConnected() const;
  // Marks the connection broken and returns `s` (the stream position is lost).
  Status Broken(const Status& s) {
    Close();
    return s;
  }
  // Sends header + payload parts (CRC and length computed here).
  Status SendRequest(Opcode op, struct iovec* parts, size_t nparts, net::Deadline deadline,
                     uint64_t* request_id, uint32_t flags = 0);
  // Reads the response header for `request_id`. An error frame becomes its
  // Status (read in full, so the stream stays usable).
  Status ReadResponseHeader(Opcode op, uint64_t request_id, net::Deadline deadline, FrameHeader* h);
  // Whole round trip for responses read into memory, within `deadline`
  // (default: io_timeout_s from now).
  Status Call(Opcode op, struct iovec* parts, size_t nparts, std::vector<uint8_t>* response,
              std::optional<net::Deadline> deadline = std::nullopt, uint32_t flags = 0);
  // A joined client's requests may wait on the server (member_wait_s).
  net::Deadline IoDeadline() const {
    return net::Deadline::In(options_.io_timeout_s +
                             (joined_ ? std::max(0.0, options_.member_wait_s) : 0.0));
  }
  Status ReadPayload(const FrameHeader& h, net::Deadline deadline, std::vector<uint8_t>* out);
  // Reads the PULL response after its header; `views` null means PullAll.
  Status ReadPullResponse(const FrameHeader& h, net::Deadline deadline,
                          std::span<const MutableTensorView>* views, std::vector<Tensor>* all,
                          uint64_t* version);

  // Empty-payload request answered by a version.
  Status CallForVersion(Opcode op, uint64_t* version);
  // SNAPSHOT or RESTORE: the u64 tag request, its response in `response`.
  Status CallWithTag(Opcode op, uint64_t tag, std::vector<uint8_t>* response);
  // HEARTBEAT, with a progress report if `report` is set.
  Status SendHeartbeat(const std::optional<protocol::ProgressReport>& report);
  std::optional<protocol::ProgressReport> LatestProgress() {
    std::lock_guard lock(progress_mu_);
    return progress_;
  }
  void StartHeartbeat();
  void StopHeartbeat();
  void HeartbeatLoop();
  // The heartbeat thread's view of the dump file (SetDumpFile).
  struct DumpFile {
    uint64_t generation = 0;  // of the SetDumpFile call `path` comes from
    std::string path;
    std::optional<FileStamp> sent;  // the content last shipped
    bool logged = false;            // an error was logged for this path
  };
  // Sends the dump file on `hb` when it changed since it was last sent.
  void ShipDumpFile(ClientImpl* hb, DumpFile* df);

  const ClientOptions options_;
  // Heartbeat thread (own connection); hb_mu_ guards hb_stop_.
  std::thread hb_thread_;
  std::mutex hb_mu_;
  std::condition_variable hb_cv_;
  bool hb_stop_ = false;
  // Latest ReportProgress values (any thread; read by the heartbeat thread).
  std::mutex progress_mu_;
  std::optional<protocol::ProgressReport> progress_;
  // SetDumpFile's path (any thread; read by the heartbeat thread) and a
  // count of its calls, so the thread notices every new setting.
  std::mutex dump_mu_;
  std::string dump_path_;
  uint64_t dump_generation_ = 0;
  bool joined_ = false;                   // between a successful Join and Leave/Close
  net::Stream sock_;                      // plain, or TLS (options_.tls_fingerprints)
  std::shared_ptr<net::TlsContext> tls_;  // made on the first Connect
  bool connected_ = false;
  // CRC-32C on frames: on for the handshake, then as negotiated in HELLO.
  bool checksums_ = true;
  // An older server refused HELLO's options: reconnect without them.
  bool legacy_hello_ = false;
  uint64_t next_request_id_ = 1;
  std::unique_ptr<uint8_t[]> recv_buf_;  // PayloadReader scratch, allocated on first pull
  // Header flag of options_.encoding (0 for float32).
  const uint32_t enc_flags_ = options_.encoding == WireEncoding::kFloat16    ? protocol::kFlagFp16
                              : options_.encoding == WireEncoding::kBFloat16 ? protocol::kFlagBf16
                                                                             : 0;
  std::vector<uint16_t> enc_buf_;  // encoded push data / pull scratch (fp16, bf16)
};

Status ClientImpl::CheckConnected() const {
  if (!connected_) {
    return Status(StatusCode::kConnectionError,
                  "not connected to the parameter server at " + Where(options_) +
                      " (closed, or broken by an earlier error); reconnect with Client::Connect");
  }
  return Status::OK();
}

Status ClientImpl::Connect() {
  if (options_.secret.empty()) {
    return Status(StatusCode::kInvalidArgument,
                  "ClientOptions::secret is empty; pass the run secret");
  }
  // "unix:/path" selects a Unix-domain socket; the port is then unused.
  constexpr std::string_view kUnixPrefix = "unix:";
  const std::string unix_path = std::string_view(options_.host).starts_with(kUnixPrefix)
                                    ? options_.host.substr(kUnixPrefix.size())
                                    : std::string();
  if (unix_path.empty() && options_.port == 0) {
    return Status(StatusCode::kInvalidArgument, "ClientOptions::port is 0; pass the server's port");
  }
  if (!options_.tls_fingerprints.empty() && !tls_) {
    TS_RETURN_IF_ERROR(net::TlsContext::ForClient(options_.tls_fingerprints, &tls_));
  }
  const auto start = net::Clock::now();
  const net::Deadline budget = net::Deadline::In(options_.connect_timeout_s);
  double backoff = std::max(0.0, options_.initial_backoff_s);
  int attempts = 0;
  Status last;
  for (;;) {
    ++attempts;
    net::Socket s;
    last = unix_path.empty() ? net::ConnectWithTimeout(options_.host, options_.port, budget, &s)
                             : net::ConnectUnix(unix_path, budget, &s);
    if (last.code() == StatusCode::kInvalidArgument) return last;  // e.g. path too long
    if (last.ok()) {
      sock_ = net::Stream(std::move(s));
      break;
    }
    if (attempts > options_.max_retries || budget.Expired()) break;
    double sleep_s = std::min(backoff, std::max(0.0, budget.SecondsLeft()));
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
    backoff = std::min(backoff * 2, options_.max_backoff_s);
    if (budget.Expired()) break;
  }
  if (!last.ok()) {
    const double elapsed = std::chrono::duration<double>(net::Clock::now() - start).count();
    const bool timed_out = budget.Expired() || last.code() == StatusCode::kTimeout;
    char secs[32];
    std::snprintf(secs, sizeof(secs), "%.2f", elapsed);
    return Status(timed_out ? StatusCode::kTimeout : StatusCode::kConnectionError,
                  "could not connect to the parameter server at " + Where(options_) + " after " +
                      std::to_string(attempts) + (attempts == 1 ? " attempt" : " attempts") +
                      " in " + secs + " s (last error: " + last.message() +
                      "); check that the server is running, that host and port are right and "
                      "that no firewall blocks the port");
  }
  connected_ = true;
  // The handshake belongs to connecting: it gets what is left of the
  // connect budget (at least 1 s, at most io_timeout_s).
  const double hs_s = std::min(options_.io_timeout_s, std::max(1.0, budget.SecondsLeft()));
  const net::Deadline hs_deadline = net::Deadline::In(hs_s);
  if (tls_) {
    if (Status t = sock_.StartTls(tls_, hs_deadline); !t.ok()) {
      Close();
      if (t.code() == StatusCode::kConnectionError) {
        t = Status(t.code(), t.message() +
                                 "; is the server started with TLS (tls=True, tensorspark-ps "
                                 "--tls)? A plain server drops a TLS client");
      }
      return t.WithContext("TLS with " + Where(options_));
    }
  }
  const bool offered_options = !legacy_hello_;
  Status h = Handshake(hs_deadline);
  if (!h.ok() && offered_options && legacy_hello_) {
    Close();
    return Connect();  // once: legacy_hello_ now leaves the options out
  }
  if (!h.ok()) {
    Close();
    // A full server refuses the connection itself (LimitExceeded on the
    // wire, for old peers): for the caller that is a connection problem.
    if (h.code() == StatusCode::kLimitExceeded) {
      h = Status(StatusCode::kConnectionError, "the server refused the connection: " + h.message());
    }
    return h.WithContext("handshake with " + Where(options_));
  }
  return Status::OK();
}

Status ClientImpl::Handshake(net::Deadline deadline) {
  protocol::HelloRequest hello;
  TS_RETURN_IF_ERROR(protocol::RandomNonce(&hello.client_nonce));
  hello.partition_id = options_.partition_id;
  hello.attempt = options_.attempt;
  hello.client_name = "tensorspark-cpp";
  checksums_ = true;
  if (!WantChecksums() && !legacy_hello_) {
    hello.has_options = true;
    hello.options = protocol::kOptionNoChecksum;
  }
  std::vector<uint8_t> payload, response;
  protocol::EncodeHello(hello, &payload);
  struct iovec part = {payload.data(), payload.size()};
  if (Status s = Call(Opcode::kHello, &part, 1, &response, deadline); !s.ok()) {
    // A server older than connection options rejects HELLO's trailing u32
    // as malformed and closes: say so, and Connect retries without it.
    if (hello.has_options && s.code() == StatusCode::kProtocolError) legacy_hello_ = true;
    return s;
  }
  protocol::Nonce server_nonce;
  uint32_t accepted = 0;
  if (Status s =
          protocol::DecodeHelloResponse(response, hello.has_options, &server_nonce, &accepted);
      !s.ok()) {
    return Broken(s);
  }
  if ((accepted & ~hello.options) != 0) {
    return Broken(Status(StatusCode::kProtocolError,
                         "the server accepted connection options this client did not ask for"));
  }

  protocol::Digest proof = protocol::ClientProof(options_.secret, server_nonce, hello.client_nonce,
                                                 hello.partition_id, hello.attempt);
  part = {proof.data(), proof.size()};
  TS_RETURN_IF_ERROR(Call(Opcode::kAuth, &part, 1, &response, deadline));
  protocol::Nonce server_proof;
  if (Status s = protocol::DecodeNonce(response, &server_proof); !s.ok()) return Broken(s);
  protocol::Digest expected =
      protocol::ServerProof(options_.secret, hello.client_nonce, server_nonce);
  if (!protocol::ConstantTimeEqual(server_proof.data(), expected.data(), expected.size())) {
    return Broken(Status(StatusCode::kAuthFailed,
                         "the server could not prove that it knows the run secret: wrong server "
                         "at this address, or it belongs to another run"));
  }
  checksums_ = (accepted & protocol::kOptionNoChecksum) == 0;
  return Status::OK();
}

bool ClientImpl::WantChecksums() const {
  switch (options_.checksums) {
    case ChecksumMode::kOn:
      return true;
    case ChecksumMode::kOff:
      return false;
    case ChecksumMode::kAuto:
      break;
  }
  // The kernel copies a Unix socket's bytes memory to memory, and TLS
  // records carry their own AEAD tag: CRC-32C adds nothing there.
  return !options_.host.starts_with("unix:") && options_.tls_fingerprints.empty();
}

Status ClientImpl::SendRequest(Opcode op, struct iovec* parts, size_t nparts,
                               net::Deadline deadline, uint64_t* request_id, uint32_t flags) {
  FrameHeader h;
  h.opcode = static_cast<uint16_t>(op);
  h.flags = flags;
  h.request_id = next_request_id_++;
  uint32_t crc = 0;
  uint64_t len = 0;
  for (size_t i = 0; i < nparts; ++i) {
    if (checksums_) crc = protocol::Crc32cExtend(crc, parts[i].iov_base, parts[i].iov_len);
    len += parts[i].iov_len;
  }
  h.checksum = crc;
  h.payload_len = len;
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(h, raw);
  std::vector<struct iovec> iov;
  iov.reserve(nparts + 1);
  iov.push_back({raw, sizeof(raw)});
  iov.insert(iov.end(), parts, parts + nparts);
  Status s = sock_.WriteV(iov.data(), iov.size(), deadline);
  if (!s.ok()) {
    // The server may have refused the frame (e.g. FrameTooLarge) and closed
    // before reading it all: report its answer if one is waiting.
    if (s.code() == StatusCode::kConnectionError) {
      FrameHeader resp;
      Status answer = ReadResponseHeader(op, h.request_id, net::Deadline::In(0.5), &resp);
      if (!answer.ok() && answer.code() != StatusCode::kConnectionError &&
          answer.code() != StatusCode::kTimeout) {
        return Broken(answer);
      }
    }
    return Broken(s.WithContext(std::string("sending ") + protocol::OpcodeName(h.opcode)));
  }
  *request_id = h.request_id;
  return Status::OK();
}

Status ClientImpl::ReadResponseHeader(Opcode op, uint64_t request_id, net::Deadline deadline,
                                      FrameHeader* h) {
  uint8_t raw[protocol::kHeaderSize];
  // The server needs time to answer: wait first instead of a recv that
  // would only report EAGAIN.
  Status io = sock_.WaitReadable(deadline);
  if (io.ok()) io = sock_.ReadFull(raw, sizeof(raw), deadline);
  if (!io.ok()) {
    return Broken(io.WithContext(std::string("waiting for the ") +
                                 protocol::OpcodeName(static_cast<uint16_t>(op)) + " response"));
  }
  *h = protocol::DecodeHeader(raw);
  if (Status s = protocol::ValidateHeader(*h, options_.max_frame_bytes); !s.ok()) {
    return Broken(s.WithContext("response from " + Where(options_)));
  }
  if (Status s = protocol::CheckFlags(*h); !s.ok()) return Broken(s);
  if ((h->flags & protocol::kFlagResponse) == 0) {
    return Broken(Status(StatusCode::kProtocolError, "server sent a frame without RESPONSE set"));
  }
  const bool refusal = h->request_id == 0 && h->opcode == 0;  // connection-level error
  if (!refusal && (h->request_id != request_id || h->opcode != static_cast<uint16_t>(op))) {
    return Broken(Status(StatusCode::kProtocolError,
                         "response does not match the request (request id " +
                             std::to_string(h->request_id) + ", expected " +
                             std::to_string(request_id) + "; opcode " + std::to_string(h->opcode) +
                             ", expected " + std::to_string(static_cast<uint16_t>(op)) + ")"));
  }
  if ((h->flags & protocol::kFlagError) == 0) {
    if (refusal) {
      return Broken(Status(StatusCode::kProtocolError, "response does not match the request"));
    }
    return Status::OK();
  }
  if (h->payload_len > kMaxErrorPayload) {
    return Broken(Status(StatusCode::kProtocolError, "error frame too large"));
  }
  std::vector<uint8_t> payload;
  TS_RETURN_IF_ERROR(ReadPayload(*h, deadline, &payload));
  Status remote;
  if (Status s = protocol::DecodeError(payload, &remote); !s.ok()) return Broken(s);
  // After these the server closes the connection.
  switch (remote.code()) {
    case StatusCode::kUnsupportedVersion:
    case StatusCode::kFrameTooLarge:
    case StatusCode::kAuthFailed:
    case StatusCode::kShuttingDown:
      Close();
      break;
    default:
      if (refusal) Close();
  }
  return remote;
}

Status ClientImpl::ReadPayload(const FrameHeader& h, net::Deadline deadline,
                               std::vector<uint8_t>* out) {
  out->resize(h.payload_len);
  if (Status s = sock_.ReadFull(out->data(), out->size(), deadline); !s.ok()) {
    return Broken(s.WithContext("reading a response payload"));
  }
  if (checksums_ && protocol::Crc32c(out->data(), out->size()) != h.checksum) {
    return Broken(Status(StatusCode::kProtocolError,
                         "response checksum mismatch: data corrupted in transit"));
  }
  return Status::OK();
}

Status ClientImpl::Call(Opcode op, struct iovec* parts, size_t nparts,
                        std::vector<uint8_t>* response, std::optional<net::Deadline> deadline,
                        uint32_t flags) {
  uint64_t id;
  TS_RETURN_IF_ERROR(SendRequest(op, parts, nparts, deadline.value_or(IoDeadline()), &id, flags));
  const net::Deadline read_deadline = deadline.value_or(IoDeadline());
  FrameHeader h;
  TS_RETURN_IF_ERROR(ReadResponseHeader(op, id, read_deadline, &h));
  if ((h.flags & protocol::kEncodingFlags) != 0) {
    return Broken(
        Status(StatusCode::kProtocolError, std::string("server set an encoding flag on a ") +
                                               protocol::OpcodeName(h.opcode) + " response"));
  }
  return ReadPayload(h, read_deadline, response);
}

Status ClientImpl::Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                            uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> head;
  protocol::Writer w(&head);
  w.U32(static_cast<uint32_t>(vars.size()));
  std::vector<struct iovec> parts;
  parts.reserve(vars.size() + 1);
  parts.push_back({});
  for (const VariableSpec& v : vars) {
    uint64_t numel;
    TS_RETURN_IF_ERROR(ValidateSpec(v.name, v.shape, v.initial.size(), &numel));
    w.Meta(v.name, v.shape);
    parts.push_back({const_cast<float*>(v.initial.data()), v.initial.size_bytes()});
  }
  parts[0] = {head.data(), head.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kRegister, parts.data(), parts.size(), &response));
  protocol::RegisterResponse r;
  if (Status s = protocol::DecodeRegisterResponse(response, &r); !s.ok()) return s;
  if (r.created.size() != vars.size()) {
    return Status(StatusCode::kProtocolError, "REGISTER response has the wrong number of flags");
  }
  if (created != nullptr) created->assign(r.created.begin(), r.created.end());
  if (version != nullptr) *version = r.version;
  return Status::OK();
}

Status ClientImpl::List(std::vector<VariableInfo>* out, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kList, nullptr, 0, &response));
  uint64_t v = 0;
  std::vector<VariableInfo> vars;
  TS_RETURN_IF_ERROR(protocol::DecodeListResponse(response, &v, &vars));
  if (out != nullptr) *out = std::move(vars);
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::ReadPullResponse(const FrameHeader& h, net::Deadline deadline,
                                    std::span<const MutableTensorView>* views,
                                    std::vector<Tensor>* all, uint64_t* version) {
  if (!recv_buf_) recv_buf_.reset(new uint8_t[PayloadReader::kBufSize]);
  PayloadReader r(&sock_, h.payload_len, deadline, recv_buf_.get(), checksums_);
  uint64_t v = 0;
  uint32_t count = 0;
  Status s = r.U64(&v);
  if (s.ok()) s = r.U32(&count);
  if (!s.ok()) return Broken(s);
  if (count > r.remaining() / protocol::kMinMetaSize) {
    return Broken(Status(StatusCode::kProtocolError, "PULL response count does not fit"));
  }
  std::vector<VariableInfo> metas(count);
  std::vector<uint64_t> numels(count);
  uint64_t total = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (Status m = r.Meta(&metas[i], &numels[i]); !m.ok()) return Broken(m);
    // Saturate, as in protocol::ReadTensorSection: a wrapped sum would pass
    // the size check below.
    if (__builtin_add_overflow(total, numels[i], &total)) total = UINT64_MAX;
  }
  if ((h.flags & protocol::kEncodingFlags) != enc_flags_) {
    return Broken(Status(StatusCode::kProtocolError,
                         "PULL response encoding flags do not match the request's"));
  }
  const size_t elem = protocol::WireElementSize(h.flags);
  if (total > r.remaining() / elem || total * elem != r.remaining()) {
    return Broken(
        Status(StatusCode::kProtocolError, "PULL response data section does not match its metas"));
  }
  // Reads n values into dst: straight into it for float32, else via
  // enc_buf_ in chunks, decoded into dst.
  auto read_values = [&](float* dst, uint64_t n) -> Status {
    if (enc_flags_ == 0) return r.Read(dst, n * sizeof(float));
    constexpr uint64_t kChunk = 64 * 1024;
    if (enc_buf_.size() < kChunk) enc_buf_.resize(kChunk);
    for (uint64_t done = 0; done < n; done += kChunk) {
      const size_t c = static_cast<size_t>(std::min(kChunk, n - done));
      TS_RETURN_IF_ERROR(r.Read(enc_buf_.data(), c * 2));
      protocol::DecodeElements(enc_flags_, enc_buf_.data(), dst + done, c);
    }
    return Status::OK();
  };
  // Check everything against the request before writing into any buffer.
  Status mismatch;
  if (views != nullptr) {
    if (count != views->size()) {
      mismatch = Status(StatusCode::kProtocolError,
                        "PULL response has " + std::to_string(count) + " tensors for " +
                            std::to_string(views->size()) + " requested");
    }
    for (uint32_t i = 0; mismatch.ok() && i < count; ++i) {
      const MutableTensorView& view = (*views)[i];
      if (metas[i].name != view.name) {
        mismatch = Status(StatusCode::kProtocolError,
                          "PULL response tensor " + std::to_string(i) + " is '" + metas[i].name +
                              "' but '" + std::string(view.name) + "' was requested");
      } else if (numels[i] != view.data.size()) {
        mismatch =
            Status(StatusCode::kShapeMismatch, "variable '" + metas[i].name + "' has shape " +
                                                   protocol::ShapeToString(metas[i].shape) + " (" +
                                                   std::to_string(numels[i]) +
                                                   " elements) but the buffer for it holds " +
                                                   std::to_string(view.data.size()) + " floats");
      }
    }
  }
  if (!mismatch.ok()) {
    // Consume the data so the connection stays usable.
    if (Status d = r.Drain(); !d.ok()) return Broken(d);
    if (!r.Matches(h.checksum)) {
      return Broken(Status(StatusCode::kProtocolError, "response checksum mismatch"));
    }
    return mismatch;
  }
  if (views != nullptr) {
    for (uint32_t i = 0; i < count; ++i) {
      const MutableTensorView& view = (*views)[i];
      if (Status d = read_values(view.data.data(), view.data.size()); !d.ok()) return Broken(d);
    }
  } else {
    all->clear();
    all->resize(count);
    for (uint32_t i = 0; i < count; ++i) {
      Tensor& t = (*all)[i];
      t.info = std::move(metas[i]);
      t.values.resize(numels[i]);
      if (Status d = read_values(t.values.data(), numels[i]); !d.ok()) return Broken(d);
    }
  }
  if (!r.Matches(h.checksum)) {
    return Broken(Status(StatusCode::kProtocolError,
                         "PULL response checksum mismatch (data corrupted in transit); the "
                         "destination buffers hold unspecified values"));
  }
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::Pull(std::span<const MutableTensorView> out, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  if (out.empty()) return List(nullptr, version);  // count 0 would mean "all"
  std::vector<uint8_t> payload;
  protocol::Writer w(&payload);
  w.U32(static_cast<uint32_t>(out.size()));
  for (const MutableTensorView& v : out) {
    TS_RETURN_IF_ERROR(protocol::ValidateName(v.name));
    w.Str(v.name);
  }
  struct iovec part = {payload.data(), payload.size()};
  uint64_t id;
  TS_RETURN_IF_ERROR(SendRequest(Opcode::kPull, &part, 1, IoDeadline(), &id, enc_flags_));
  const net::Deadline deadline = IoDeadline();
  FrameHeader h;
  TS_RETURN_IF_ERROR(ReadResponseHeader(Opcode::kPull, id, deadline, &h));
  return ReadPullResponse(h, deadline, &out, nullptr, version);
}

Status ClientImpl::PullAll(std::vector<Tensor>* out, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  uint8_t zero[4] = {0, 0, 0, 0};
  struct iovec part = {zero, sizeof(zero)};
  uint64_t id;
  TS_RETURN_IF_ERROR(SendRequest(Opcode::kPull, &part, 1, IoDeadline(), &id, enc_flags_));
  const net::Deadline deadline = IoDeadline();
  FrameHeader h;
  TS_RETURN_IF_ERROR(ReadResponseHeader(Opcode::kPull, id, deadline, &h));
  return ReadPullResponse(h, deadline, nullptr, out, version);
}

Status ClientImpl::Push(UpdateKind kind, std::span<const TensorView> tensors,
                        const PushOptions& options, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> head;
  protocol::EncodePushHead({static_cast<uint8_t>(kind), options.mean_window, options.learning_rate},
                           &head);
  protocol::Writer w(&head);
  w.U32(static_cast<uint32_t>(tensors.size()));
  std::vector<struct iovec> parts;
  parts.reserve(tensors.size() + 1);
  parts.push_back({});
  uint64_t total = 0;
  for (const TensorView& t : tensors) {
    uint64_t numel;
    TS_RETURN_IF_ERROR(ValidateSpec(t.name, t.shape, t.data.size(), &numel));
    w.Meta(t.name, t.shape);
    parts.push_back({const_cast<float*>(t.data.data()), t.data.size_bytes()});
    total += numel;
  }
  parts[0] = {head.data(), head.size()};
  if (enc_flags_ != 0) {
    // Encode every tensor into one scratch buffer sent as the data section.
    if (enc_buf_.size() < total) enc_buf_.resize(total);
    uint16_t* dst = enc_buf_.data();
    for (const TensorView& t : tensors) {
      protocol::EncodeElements(enc_flags_, t.data.data(), dst, t.data.size());
      dst += t.data.size();
    }
    parts.resize(2);
    parts[1] = {enc_buf_.data(), static_cast<size_t>(total * 2)};
  }
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(
      Call(Opcode::kPush, parts.data(), parts.size(), &response, std::nullopt, enc_flags_));
  uint64_t v;
  if (Status s = protocol::DecodeVersion(response, &v); !s.ok()) return s;
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::SetOptimizer(const OptimizerConfig& config,
                                std::span<const std::string_view> names, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  // Checked here too, for the same message without a round trip.
  TS_RETURN_IF_ERROR(optimizers::ValidateConfig(config));
  if (names.size() > UINT32_MAX) {
    return Status(StatusCode::kInvalidArgument, "too many names for one SetOptimizer call");
  }
  for (std::string_view n : names) TS_RETURN_IF_ERROR(protocol::ValidateName(n));
  std::vector<uint8_t> payload;
  protocol::EncodeSetOptimizer(config, names, &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kSetOptimizer, &part, 1, &response));
  uint64_t v;
  TS_RETURN_IF_ERROR(protocol::DecodeVersion(response, &v));
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::Stats(std::vector<StatEntry>* out) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kStats, nullptr, 0, &response));
  return protocol::DecodeStatsResponse(response, out);
}

Status ClientImpl::Shutdown() {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kShutdown, nullptr, 0, &response));
  if (!response.empty()) {
    return Status(StatusCode::kProtocolError, "SHUTDOWN response must be empty");
  }
  return Status::OK();
}

Status ClientImpl::CallForVersion(Opcode op, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(op, nullptr, 0, &response));
  uint64_t v;
  TS_RETURN_IF_ERROR(protocol::DecodeVersion(response, &v));
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::Join(uint64_t* clock) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kJoin, nullptr, 0, &response));
  uint64_t version, c;
  TS_RETURN_IF_ERROR(protocol::DecodeJoinResponse(response, &version, &c));
  if (clock != nullptr) *clock = c;
  joined_ = true;
  StartHeartbeat();
  return Status::OK();
}

Status ClientImpl::Leave() {
  StopHeartbeat();
  joined_ = false;
  return CallForVersion(Opcode::kLeave, nullptr);
}

Status ClientImpl::SendHeartbeat(const std::optional<protocol::ProgressReport>& report) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> payload;
  protocol::EncodeHeartbeat(report ? &*report : nullptr, &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kHeartbeat, &part, payload.empty() ? 0 : 1, &response));
  uint64_t v;
  return protocol::DecodeVersion(response, &v);
}

Status ClientImpl::Configure(const RunConfig& config) {
  TS_RETURN_IF_ERROR(CheckConnected());
  TS_RETURN_IF_ERROR(protocol::ValidateRunConfig(config));  // same message, no round trip
  std::vector<uint8_t> payload;
  protocol::EncodeConfigure(config, &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kConfigure, &part, 1, &response));
  uint64_t v;
  return protocol::DecodeVersion(response, &v);
}

Status ClientImpl::Report(std::string_view text) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> payload;
  protocol::EncodeReport(protocol::kReportStackDump, protocol::ReportTail(text), &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kReport, &part, 1, &response));
  uint64_t v;
  return protocol::DecodeVersion(response, &v);
}

Status ClientImpl::Reports(std::vector<WorkerReport>* out) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kReports, nullptr, 0, &response));
  return protocol::DecodeReportsResponse(response, out);
}

Status ClientImpl::CallWithTag(Opcode op, uint64_t tag, std::vector<uint8_t>* response) {
  TS_RETURN_IF_ERROR(CheckConnected());
  if (tag == 0) {  // same message as the server's, without a round trip
    return Status(StatusCode::kInvalidArgument,
                  std::string(op == protocol::Opcode::kSnapshot ? "snapshot" : "restore") +
                      ": the tag must be >= 1 (0 marks untagged snapshots)");
  }
  std::vector<uint8_t> payload;
  protocol::EncodeTagRequest(tag, &payload);
  struct iovec part = {payload.data(), payload.size()};
  return Call(op, &part, 1, response);
}

Status ClientImpl::Snapshot(uint64_t tag, std::string* name, uint64_t* version) {
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(CallWithTag(protocol::Opcode::kSnapshot, tag, &response));
  uint64_t v;
  std::string n;
  TS_RETURN_IF_ERROR(protocol::DecodeSnapshotResponse(response, &v, &n));
  if (name != nullptr) *name = std::move(n);
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::Snapshots(std::vector<SnapshotInfo>* out) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(protocol::Opcode::kSnapshots, nullptr, 0, &response));
  return protocol::DecodeSnapshotsResponse(response, out);
}

Status ClientImpl::Restore(uint64_t tag, uint64_t* version) {
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(CallWithTag(protocol::Opcode::kRestore, tag, &response));
  uint64_t v;
  TS_RETURN_IF_ERROR(protocol::DecodeVersion(response, &v));
  if (version != nullptr) *version = v;
  return Status::OK();
}

void ClientImpl::ShipDumpFile(ClientImpl* hb, DumpFile* df) {
  {
    std::lock_guard lock(dump_mu_);
    if (df->generation != dump_generation_) {
      *df = DumpFile{};
      df->generation = dump_generation_;
      df->path = dump_path_;
    }
  }
  if (df->path.empty()) return;
  auto log_once = [df](const std::string& what) {
    if (df->logged) return;
    df->logged = true;
    std::fprintf(stderr, "[tensorspark] dump file %s: %s; not shipped (logged once)\n",
                 df->path.c_str(), what.c_str());
  };
  struct stat st;
  if (::stat(df->path.c_str(), &st) != 0) {
    log_once(std::string("cannot stat: ") + std::strerror(errno));
    return;
  }
  if (st.st_size == 0 || (df->sent && *df->sent == StampOf(st))) return;
  std::string text;
  FileStamp stamp;
  if (std::string err = ReadFileTail(df->path, &text, &stamp); !err.empty()) {
    log_once(err);
    return;
  }
  // Recorded only once sent: a broken connection retries at the next beat.
  if (!text.empty() && hb->Report(text).ok()) df->sent = stamp;
}

void ClientImpl::StartHeartbeat() {
  if (!(options_.heartbeat_interval_s > 0) || hb_thread_.joinable()) return;
  {
    std::lock_guard lock(hb_mu_);
    hb_stop_ = false;
  }
  try {
    hb_thread_ = std::thread([this] { HeartbeatLoop(); });
  } catch (const std::system_error&) {
    // No thread: the member stays live only through its own requests.
  }
}

void ClientImpl::StopHeartbeat() {
  if (!hb_thread_.joinable()) return;
  {
    std::lock_guard lock(hb_mu_);
    hb_stop_ = true;
  }
  hb_cv_.notify_all();
  hb_thread_.join();
}

void ClientImpl::HeartbeatLoop() {
  ClientOptions o = options_;
  o.heartbeat_interval_s = 0;
  // Bounded, so Leave/Close wait at most about one interval for this thread.
  o.connect_timeout_s = std::min(o.connect_timeout_s, options_.heartbeat_interval_s + 1.0);
  std::unique_ptr<ClientImpl> hb;
  DumpFile dump;
  const auto interval = std::chrono::duration<double>(options_.heartbeat_interval_s);
  std::unique_lock lock(hb_mu_);
  while (!hb_cv_.wait_for(lock, interval, [this] { return hb_stop_; })) {
    lock.unlock();
    if (!hb || !hb->connected()) {
      hb = std::make_unique<ClientImpl>(o);
      if (!hb->Connect().ok()) hb.reset();  // retried at the next beat
    }
    if (hb) {
      (void)hb->SendHeartbeat(LatestProgress());
      ShipDumpFile(hb.get(), &dump);
    }
    lock.lock();
  }
}

// ---- Client -----------------------------------------------------------------

// ---- sparse tables ---------------------------------------------------------------

namespace {

Status CheckRowCount(std::string_view table, size_t n) {
  if (n > UINT32_MAX) {
    return Status(StatusCode::kInvalidArgument, "table '" + std::string(table) +
                                                    "': " + std::to_string(n) +
                                                    " ids in one request; send fewer than 2^32");
  }
  return Status::OK();
}

}  // namespace

Status ClientImpl::CreateTables(std::span<const TableConfig> tables, std::vector<bool>* created) {
  TS_RETURN_IF_ERROR(CheckConnected());
  if (tables.empty()) {
    if (created != nullptr) created->clear();
    return Status::OK();
  }
  for (const TableConfig& t : tables) {
    TS_RETURN_IF_ERROR(protocol::ValidateName(t.name).WithContext("table name"));
    TS_RETURN_IF_ERROR(storage::ValidateTableConfig(t));
  }
  std::vector<uint8_t> payload;
  protocol::EncodeTableCreate(tables, &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kTableCreate, &part, 1, &response));
  std::vector<uint8_t> flags;
  TS_RETURN_IF_ERROR(protocol::DecodeTableCreateResponse(response, &flags));
  if (flags.size() != tables.size()) {
    return Status(StatusCode::kProtocolError,
                  "TABLE_CREATE response has the wrong number of flags");
  }
  if (created != nullptr) created->assign(flags.begin(), flags.end());
  return Status::OK();
}

Status ClientImpl::PullRows(std::span<const RowsRequest> req, uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<protocol::PullRowsItem> items;
  items.reserve(req.size());
  for (const RowsRequest& r : req) {
    TS_RETURN_IF_ERROR(protocol::ValidateName(r.table).WithContext("table name"));
    TS_RETURN_IF_ERROR(CheckRowCount(r.table, r.ids.size()));
    items.push_back({r.table, r.ids});
  }
  std::vector<uint8_t> payload;
  protocol::EncodePullRowsRequest(items, &payload);
  struct iovec part = {payload.data(), payload.size()};
  uint64_t id;
  TS_RETURN_IF_ERROR(SendRequest(Opcode::kPullRows, &part, 1, IoDeadline(), &id));
  const net::Deadline deadline = IoDeadline();
  FrameHeader h;
  TS_RETURN_IF_ERROR(ReadResponseHeader(Opcode::kPullRows, id, deadline, &h));
  if ((h.flags & protocol::kEncodingFlags) != 0) {
    return Broken(Status(StatusCode::kProtocolError, "PULL_ROWS response has an encoding flag"));
  }
  // Streamed: each table's rows go from the socket into its `out`.
  if (!recv_buf_) recv_buf_.reset(new uint8_t[PayloadReader::kBufSize]);
  PayloadReader r(&sock_, h.payload_len, deadline, recv_buf_.get(), checksums_);
  uint64_t v = 0;
  uint32_t count = 0;
  Status s = r.U64(&v);
  if (s.ok()) s = r.U32(&count);
  if (s.ok() && count != req.size()) {
    s = Status(StatusCode::kProtocolError, "PULL_ROWS response has " + std::to_string(count) +
                                               " tables for " + std::to_string(req.size()) +
                                               " requested");
  }
  if (!s.ok()) return Broken(s);
  Status mismatch;
  for (const RowsRequest& q : req) {
    uint32_t dim = 0, n = 0;
    s = r.U32(&dim);
    if (s.ok()) s = r.U32(&n);
    if (s.ok() && n != q.ids.size()) {
      s = Status(StatusCode::kProtocolError, "PULL_ROWS response has " + std::to_string(n) +
                                                 " rows of table '" + std::string(q.table) +
                                                 "' for " + std::to_string(q.ids.size()) + " ids");
    }
    const uint64_t floats = uint64_t{n} * dim;
    if (s.ok() && floats > r.remaining() / 4) {
      s = Status(StatusCode::kProtocolError, "PULL_ROWS response is shorter than its rows");
    }
    if (!s.ok()) return Broken(s);
    if (mismatch.ok() && floats != q.out.size()) {
      mismatch = Status(StatusCode::kShapeMismatch,
                        "table '" + std::string(q.table) + "' has dim " + std::to_string(dim) +
                            " on the server, but the buffer for its " + std::to_string(n) +
                            " ids holds " + std::to_string(q.out.size()) + " floats (" +
                            std::to_string(floats) + " needed)");
    }
    if (mismatch.ok()) {
      s = r.Read(q.out.data(), floats * 4);
    } else {
      // Skip this table's rows, keeping the stream usable.
      std::vector<uint8_t> scratch(static_cast<size_t>(std::min<uint64_t>(floats * 4, 1 << 20)));
      for (uint64_t left = floats * 4; s.ok() && left > 0;) {
        const size_t take = static_cast<size_t>(std::min<uint64_t>(left, scratch.size()));
        s = r.Read(scratch.data(), take);
        left -= take;
      }
    }
    if (!s.ok()) return Broken(s);
  }
  if (r.remaining() != 0) {
    return Broken(Status(StatusCode::kProtocolError, "PULL_ROWS response has trailing bytes"));
  }
  if (!r.Matches(h.checksum)) {
    return Broken(Status(StatusCode::kProtocolError,
                         "PULL_ROWS response checksum mismatch (data corrupted in transit); the "
                         "destination buffers hold unspecified values"));
  }
  if (!mismatch.ok()) return mismatch;
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::PushRows(UpdateKind kind, float learning_rate, std::span<const RowsUpdate> req,
                            uint64_t* version) {
  TS_RETURN_IF_ERROR(CheckConnected());
  if (kind != UpdateKind::kDelta && kind != UpdateKind::kGradient) {
    return Status(StatusCode::kInvalidArgument,
                  "push_rows: kind must be delta (2) or gradient (3), got " +
                      std::to_string(static_cast<int>(kind)));
  }
  if (!std::isfinite(learning_rate) || learning_rate < 0.0f) {
    return Status(StatusCode::kInvalidArgument,
                  "push_rows: learning_rate must be finite and >= 0 (0: each table's own), got " +
                      std::to_string(learning_rate));
  }
  // One buffer holds every table's head; the ids and values are sent from
  // the caller's memory (iovecs point into `heads` once it stops growing).
  std::vector<uint8_t> heads;
  protocol::Writer w(&heads);
  w.U8(static_cast<uint8_t>(kind));
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.F32(learning_rate);
  w.U32(static_cast<uint32_t>(req.size()));
  std::vector<size_t> ends;  // end offset of each table's head
  ends.reserve(req.size());
  for (const RowsUpdate& u : req) {
    TS_RETURN_IF_ERROR(protocol::ValidateName(u.table).WithContext("table name"));
    TS_RETURN_IF_ERROR(CheckRowCount(u.table, u.ids.size()));
    if (u.dim == 0 || u.dim > kMaxTableDim) {
      return Status(StatusCode::kInvalidArgument, "table '" + std::string(u.table) + "': dim " +
                                                      std::to_string(u.dim) + " is outside 1.." +
                                                      std::to_string(kMaxTableDim));
    }
    if (u.values.size() != u.ids.size() * u.dim) {
      return Status(StatusCode::kShapeMismatch,
                    "table '" + std::string(u.table) + "': " + std::to_string(u.ids.size()) +
                        " ids of dim " + std::to_string(u.dim) + " need " +
                        std::to_string(u.ids.size() * u.dim) + " values, got " +
                        std::to_string(u.values.size()));
    }
    w.Str(u.table);
    w.U32(u.dim);
    w.U32(static_cast<uint32_t>(u.ids.size()));
    ends.push_back(heads.size());
  }
  std::vector<struct iovec> parts;
  parts.reserve(3 * req.size() + 1);
  size_t from = 0;
  for (size_t i = 0; i < req.size(); ++i) {
    parts.push_back({heads.data() + from, ends[i] - from});
    parts.push_back({const_cast<int64_t*>(req[i].ids.data()), req[i].ids.size_bytes()});
    parts.push_back({const_cast<float*>(req[i].values.data()), req[i].values.size_bytes()});
    from = ends[i];
  }
  if (req.empty()) parts.push_back({heads.data(), heads.size()});
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kPushRows, parts.data(), parts.size(), &response));
  uint64_t v = 0;
  TS_RETURN_IF_ERROR(protocol::DecodeVersion(response, &v));
  if (version != nullptr) *version = v;
  return Status::OK();
}

Status ClientImpl::ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                              std::vector<int64_t>* ids, std::vector<float>* values, uint32_t* dim,
                              uint64_t* next_cursor) {
  TS_RETURN_IF_ERROR(CheckConnected());
  TS_RETURN_IF_ERROR(protocol::ValidateName(table).WithContext("table name"));
  if (max_rows == 0) {
    return Status(StatusCode::kInvalidArgument, "export_rows: max_rows must be at least 1");
  }
  std::vector<uint8_t> payload;
  protocol::EncodeExportRowsRequest(table, cursor, max_rows, &payload);
  struct iovec part = {payload.data(), payload.size()};
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kExportRows, &part, 1, &response));
  protocol::RowsBlock rows;
  TS_RETURN_IF_ERROR(protocol::DecodeExportRowsResponse(response, next_cursor, &rows));
  *ids = std::move(rows.ids);
  *values = std::move(rows.values);
  *dim = rows.dim;
  return Status::OK();
}

Status ClientImpl::ListTables(std::vector<TableInfo>* out) {
  TS_RETURN_IF_ERROR(CheckConnected());
  std::vector<uint8_t> response;
  TS_RETURN_IF_ERROR(Call(Opcode::kListTables, nullptr, 0, &response));
  return protocol::DecodeListTablesResponse(response, out);
}

Status Client::Connect(const ClientOptions& options, std::unique_ptr<Client>* out) {
  auto impl = std::make_unique<ClientImpl>(options);
  TS_RETURN_IF_ERROR(impl->Connect());
  out->reset(new Client(std::move(impl)));
  return Status::OK();
}

Client::Client(std::unique_ptr<ClientImpl> impl) : impl_(std::move(impl)) {}
Client::~Client() = default;

Status Client::Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                        uint64_t* version) {
  return impl_->Register(vars, created, version);
}
Status Client::ListVariables(std::vector<VariableInfo>* out, uint64_t* version) {
  return impl_->List(out, version);
}
Status Client::Pull(std::span<const MutableTensorView> out, uint64_t* version) {
  return impl_->Pull(out, version);
}
Status Client::PullAll(std::vector<Tensor>* out, uint64_t* version) {
  return impl_->PullAll(out, version);
}
Status Client::Push(UpdateKind kind, std::span<const TensorView> tensors,
                    const PushOptions& options, uint64_t* version) {
  return impl_->Push(kind, tensors, options, version);
}
Status Client::SetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                            uint64_t* version) {
  return impl_->SetOptimizer(config, names, version);
}
Status Client::Join(uint64_t* clock) { return impl_->Join(clock); }
Status Client::Leave() { return impl_->Leave(); }
Status Client::Heartbeat() { return impl_->Heartbeat(); }
void Client::ReportProgress(uint64_t steps, uint64_t samples, double loss) {
  impl_->ReportProgress({steps, samples, loss});
}
Status Client::Configure(const RunConfig& config) { return impl_->Configure(config); }
Status Client::Report(std::string_view text) { return impl_->Report(text); }
Status Client::Reports(std::vector<WorkerReport>* out) { return impl_->Reports(out); }
void Client::SetDumpFile(std::string path) { impl_->SetDumpFile(std::move(path)); }
Status Client::Snapshot(uint64_t tag, std::string* name, uint64_t* version) {
  return impl_->Snapshot(tag, name, version);
}
Status Client::Snapshots(std::vector<SnapshotInfo>* out) { return impl_->Snapshots(out); }
Status Client::Restore(uint64_t tag, uint64_t* version) { return impl_->Restore(tag, version); }
Status Client::Stats(std::vector<StatEntry>* out) { return impl_->Stats(out); }
Status Client::CreateTables(std::span<const TableConfig> tables, std::vector<bool>* created) {
  return impl_->CreateTables(tables, created);
}
Status Client::PullRows(std::span<const RowsRequest> req, uint64_t* version) {
  return impl_->PullRows(req, version);
}
Status Client::PushRows(UpdateKind kind, float learning_rate, std::span<const RowsUpdate> req,
                        uint64_t* version) {
  return impl_->PushRows(kind, learning_rate, req, version);
}
Status Client::ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                          std::vector<int64_t>* ids, std::vector<float>* values, uint32_t* dim,
                          uint64_t* next_cursor) {
  return impl_->ExportRows(table, cursor, max_rows, ids, values, dim, next_cursor);
}
Status Client::ListTables(std::vector<TableInfo>* out) { return impl_->ListTables(out); }
Status Client::ShutdownServer() { return impl_->Shutdown(); }
void Client::Close() { impl_->Close(); }
bool Client::connected() const { return impl_->connected(); }
bool Client::checksums() const { return impl_->checksums(); }

}  // namespace tensorspark
