#include "server/connection.h"

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <shared_mutex>

#include "protocol/auth.h"
#include "protocol/crc32c.h"
#include "protocol/half.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"

namespace tensorspark::server {

using protocol::FrameHeader;
using protocol::Opcode;

namespace {

// Handshake frames are tiny; a larger one before authentication is refused
// so an unauthenticated peer cannot make the server allocate.
constexpr uint64_t kMaxHandshakePayload = 4096;
// The first byte of a TLS connection: a handshake record (RFC 8446, 5.1).
constexpr uint8_t kTlsHandshakeRecord = 22;
// Alignment of a PUSH data section inside the receive buffer.
constexpr size_t kAlign = 16;
// Payloads are received and checksummed in chunks of this size (fits L2).
constexpr uint64_t kRecvChunk = 256 * 1024;
// Elements converted (and checksummed) per step of the fp16/bf16 codecs.
constexpr uint64_t kConvertChunk = 64 * 1024;

Status Err(StatusCode code, std::string msg) { return Status(code, std::move(msg)); }

}  // namespace

void LogEvent(const std::string& message) {
  std::fprintf(stderr, "[tensorspark-ps] %s\n", message.c_str());
}

void LogThrottle::Event(const std::string& message) {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard lock(mu_);
  FlushLocked(now);
  if (window_open_) {
    ++suppressed_;
    latest_ = message;
    return;
  }
  window_open_ = true;
  window_start_ = now;
  LogEvent(message);
}

void LogThrottle::Flush() {
  std::lock_guard lock(mu_);
  FlushLocked(std::chrono::steady_clock::now());
}

void LogThrottle::FlushLocked(std::chrono::steady_clock::time_point now) {
  if (!window_open_ || std::chrono::duration<double>(now - window_start_).count() < period_s_)
    return;
  if (suppressed_ > 0) {
    char secs[32];
    std::snprintf(secs, sizeof(secs), "%.0f", period_s_);
    LogEvent(std::to_string(suppressed_) + " more " + what_ + " in the last " + secs +
             " s (counted in STATS refused{...}); the latest: " + latest_);
  }
  window_open_ = false;
  suppressed_ = 0;
  latest_.clear();
}

namespace {

// A Prometheus label value: backslash, quote and newline escaped.
std::string LabelValue(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// Per-table counters, labelled table="<name>", then server totals.
void AppendTableStats(const storage::TableStore& store, std::vector<StatEntry>* out) {
  std::vector<storage::SparseTable*> tables;
  store.All(&tables);
  storage::TableStats total;
  for (const storage::SparseTable* t : tables) {
    const storage::TableStats st = t->Stats();
    const std::string l = "{table=\"" + LabelValue(t->config().name) + "\"}";
    out->emplace_back("table_rows" + l, st.rows);
    out->emplace_back("table_bytes" + l, st.bytes);
    out->emplace_back("table_evictions" + l, st.evictions);
    out->emplace_back("table_expired" + l, st.expired);
    out->emplace_back("table_admissions_refused" + l, st.admissions_refused);
    out->emplace_back("table_rows_pulled" + l, st.rows_pulled);
    out->emplace_back("table_rows_pushed" + l, st.rows_pushed);
    total.rows += st.rows;
    total.bytes += st.bytes;
    total.rows_pulled += st.rows_pulled;
    total.rows_pushed += st.rows_pushed;
  }
  out->emplace_back("tables", tables.size());
  out->emplace_back("table_rows", total.rows);
  out->emplace_back("table_bytes", total.bytes);
  out->emplace_back("rows_pulled", total.rows_pulled);
  out->emplace_back("rows_pushed", total.rows_pushed);
}

}  // namespace

std::vector<StatEntry> ServerContext::Snapshot() const {
  auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  std::vector<StatEntry> out = {
      {"version", store.version()},
      {"variables", store.num_variables()},
      {"parameters", store.num_parameters()},
      {"connections", get(counters.connections)},
      {"connections_total", get(counters.connections_total)},
      {"pushes", get(counters.pushes)},
      {"pulls", get(counters.pulls)},
      {"registers", get(counters.registers)},
      {"bytes_in", get(counters.bytes_in)},
      {"bytes_out", get(counters.bytes_out)},
      {"errors", get(counters.errors)},
      {"auth_failures", get(counters.auth_failures)},
      {"snapshots_written", get(counters.snapshots_written)},
      {"snapshot_errors", get(counters.snapshot_errors)},
      {"snapshot_version", get(counters.snapshot_version)},
      {"resumed_version", get(counters.resumed_version)},
      {"restores", get(counters.restores)},
      {"row_pushes", get(counters.row_pushes)},
      {"connections_unchecked", get(counters.connections_unchecked)},
  };
  AppendTableStats(tables, &out);
  membership.AppendStats(&out);
  return out;
}

Connection::Connection(ServerContext* ctx, net::Socket socket, std::string peer)
    : ctx_(ctx), peer_(std::move(peer)), who_(peer_), stream_(std::move(socket)) {
  session_.conn_id = ctx_->next_conn_id.fetch_add(1, std::memory_order_relaxed);
}

bool Connection::PeerSentData() {
  std::lock_guard lock(socket_mu_);
  if (!stream_.valid()) return false;
  uint8_t byte;
  return ::recv(stream_.socket().fd(), &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

void Connection::Shutdown() {
  shut_.store(true, std::memory_order_release);
  std::lock_guard lock(socket_mu_);
  stream_.socket().Shutdown();
}

net::Deadline Connection::IoDeadline() const {
  return net::Deadline::In(ctx_->options.io_timeout_s);
}

void Connection::Run() {
  bool opened = false;
  try {
    Status s = Handshake();
    if (!s.ok()) {
      // AuthFailed and LimitExceeded were counted where they were found, an
      // eviction (shut_) by the acceptor that evicted it.
      const bool evicted = shut_down();
      if (!evicted && s.code() != StatusCode::kAuthFailed && s.code() != StatusCode::kLimitExceeded)
        ctx_->membership.CountRefused(RefuseReason::kHandshake);
      if (!evicted && !ctx_->stopping.load())
        ctx_->handshake_log.Event("connection from " + who_ +
                                  " closed during the handshake: " + s.ToString());
    } else {
      opened = true;
      ctx_->membership.Opened(session_);
      for (;;) {
        // Idle between requests: wait without a limit (Shutdown() wakes us).
        Status w = stream_.WaitReadable(net::Deadline::Never());
        if (!w.ok() || ctx_->stopping.load()) break;
        FrameHeader h;
        bool peer_left = false;
        // Once the first byte is here, the rest of the frame has io_timeout_s.
        Status r = ReceiveFrame(IoDeadline(), ctx_->options.max_frame_bytes, &h, &peer_left);
        if (!r.ok()) {
          if (stream_.tls_record_failed()) ctx_->membership.CountRefused(RefuseReason::kTls);
          if (!peer_left && !ctx_->stopping.load()) {
            LogEvent("closing connection from " + who_ + ": " + r.ToString());
          }
          break;
        }
        ctx_->membership.Touch(session_);
        const bool keep = Dispatch(h).ok();
        ctx_->membership.Settle(&session_);  // the answer is sent
        if (!keep) break;
      }
    }
  } catch (const std::exception& e) {
    LogEvent("closing connection from " + who_ + " after an internal error: " + e.what());
  } catch (...) {
    LogEvent("closing connection from " + who_ + " after an unknown internal error");
  }
  {
    std::lock_guard lock(socket_mu_);
    stream_.Close();
  }
  if (opened) {
    ctx_->membership.Settle(&session_);
    ctx_->membership.Closed(session_, ctx_->stopping.load());
  }
  if (stage() == kAuthenticated)
    ctx_->counters.authenticated.fetch_sub(1, std::memory_order_relaxed);
  if (!checksums_) ctx_->counters.connections_unchecked.fetch_sub(1, std::memory_order_relaxed);
  ctx_->counters.connections.fetch_sub(1, std::memory_order_relaxed);
  done_.store(true, std::memory_order_release);
}

Status Connection::ReceiveFrame(net::Deadline deadline, uint64_t max_payload, FrameHeader* h,
                                bool* peer_left) {
  uint8_t raw[protocol::kHeaderSize];
  TS_RETURN_IF_ERROR(stream_.ReadFull(raw, sizeof(raw), deadline, peer_left));
  *h = protocol::DecodeHeader(raw);
  ctx_->counters.bytes_in.fetch_add(sizeof(raw), std::memory_order_relaxed);
  Status v = protocol::ValidateHeader(*h, max_payload);
  if (!v.ok()) {
    if (v.code() == StatusCode::kFrameTooLarge)
      ctx_->membership.CountRefused(RefuseReason::kFrameTooLarge);
    if (v.code() == StatusCode::kUnsupportedVersion)
      ctx_->membership.CountRefused(RefuseReason::kBadVersion);
    // Bad magic: the stream cannot be trusted, close without answering.
    if (v.code() != StatusCode::kProtocolError) (void)SendError(*h, v);
    return v;
  }
  payload_len_ = h->payload_len;
  // Capacity grows (doubling) with the bytes that actually arrive, so a peer
  // announcing a huge frame and sending nothing costs no memory. The final
  // kAlign bytes of slack let HandlePush move the payload to any shift.
  const uint64_t full = payload_len_ + kAlign;
  uint32_t crc = 0;
  for (uint64_t off = 0; off < payload_len_; off += kRecvChunk) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kRecvChunk, payload_len_ - off));
    const uint64_t want = off + n == payload_len_ ? full : shift_ + off + n;
    if (cap_ < want && !Grow(std::min(full, std::max(want, 2 * cap_)), shift_ + off)) {
      Status e =
          Err(StatusCode::kLimitExceeded, "server cannot allocate " + std::to_string(payload_len_) +
                                              " bytes for this frame; send smaller frames");
      ctx_->membership.CountRefused(RefuseReason::kLimit);
      (void)SendError(*h, e);
      return e;
    }
    uint8_t* dst = buf_.get() + shift_ + off;
    TS_RETURN_IF_ERROR(stream_.ReadFull(dst, n, deadline));
    // Checksum each chunk right after it arrives, while it is still in cache.
    if (checksums_) crc = protocol::Crc32cExtend(crc, dst, n);
  }
  ctx_->counters.bytes_in.fetch_add(payload_len_, std::memory_order_relaxed);
  if (checksums_ && crc != h->checksum) {
    Status e =
        Err(StatusCode::kProtocolError,
            std::string("payload checksum mismatch on a ") + protocol::OpcodeName(h->opcode) +
                " frame (CRC-32C " + std::to_string(crc) + ", header says " +
                std::to_string(h->checksum) + "): data corrupted in transit");
    ctx_->membership.CountRefused(RefuseReason::kBadChecksum);
    (void)SendError(*h, e);
    return e;
  }
  return Status::OK();
}

bool Connection::Grow(uint64_t capacity, uint64_t keep) {
  if (capacity > SIZE_MAX) return false;
  // Default-initialized (not zeroed): pages are touched only when written.
  std::unique_ptr<uint8_t[]> bigger(new (std::nothrow) uint8_t[capacity]);
  if (!bigger) return false;
  if (keep > 0) std::memcpy(bigger.get(), buf_.get(), keep);
  buf_ = std::move(bigger);
  cap_ = capacity;
  return true;
}

Status Connection::SendResponse(const FrameHeader& req, uint32_t flags,
                                const std::vector<uint8_t>& payload) {
  FrameHeader h;
  h.opcode = req.opcode;
  h.flags = protocol::kFlagResponse | flags;
  h.request_id = req.request_id;
  h.payload_len = payload.size();
  h.checksum = checksums_ ? protocol::Crc32c(payload.data(), payload.size()) : 0;
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(h, raw);
  struct iovec iov[2] = {{raw, sizeof(raw)},
                         {const_cast<uint8_t*>(payload.data()), payload.size()}};
  Status s = stream_.WriteV(iov, 2, IoDeadline());
  if (!s.ok()) {
    if (io_status_.ok()) io_status_ = s;
    return s;
  }
  ctx_->counters.bytes_out.fetch_add(sizeof(raw) + payload.size(), std::memory_order_relaxed);
  return Status::OK();
}

Status Connection::SendError(const FrameHeader& req, const Status& error) {
  ctx_->counters.errors.fetch_add(1, std::memory_order_relaxed);
  std::vector<uint8_t> payload;
  protocol::EncodeError(error, &payload);
  return SendResponse(req, protocol::kFlagError, payload);
}

Status Connection::StartTls(net::Deadline deadline) {
  // A TLS connection opens with a handshake record (content type 22); a
  // plain client's first byte is the frame magic's. That one gets a plain
  // answer saying what to change instead of a TLS alert it cannot read.
  TS_RETURN_IF_ERROR(stream_.WaitReadable(deadline));
  uint8_t first = 0;
  const ssize_t n = ::recv(stream_.socket().fd(), &first, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return Err(StatusCode::kConnectionError, "connection closed by peer");
  if (n == 1 && first != kTlsHandshakeRecord) {
    ctx_->counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
    ctx_->membership.CountRefused(RefuseReason::kAuth);
    Status e = Err(StatusCode::kAuthFailed,
                   "this parameter server accepts TLS connections only: connect with TLS and "
                   "pin its certificate's fingerprint (tls=True in a tensorspark run; "
                   "tls_fingerprints for PSClient; ClientOptions::tls_fingerprints)");
    (void)SendError(FrameHeader{}, e);
    return e;
  }
  return stream_.StartTls(ctx_->tls, deadline);
}

Status Connection::Handshake() {
  const net::Deadline deadline = net::Deadline::In(ctx_->options.handshake_timeout_s);
  auto auth_failed = [&](const FrameHeader& h, std::string msg) {
    ctx_->counters.auth_failures.fetch_add(1, std::memory_order_relaxed);
    ctx_->membership.CountRefused(RefuseReason::kAuth);
    Status e = Err(StatusCode::kAuthFailed, std::move(msg));
    (void)SendError(h, e);
    return e;
  };
  if (ctx_->tls) TS_RETURN_IF_ERROR(StartTls(deadline));
  FrameHeader h;
  bool peer_left = false;
  TS_RETURN_IF_ERROR(ReceiveFrame(deadline, kMaxHandshakePayload, &h, &peer_left));
  if (h.opcode != static_cast<uint16_t>(Opcode::kHello) || h.flags != 0) {
    return auth_failed(h, std::string("expected HELLO to start the handshake but got ") +
                              protocol::OpcodeName(h.opcode) +
                              "; authenticate before sending requests");
  }
  protocol::HelloRequest hello;
  if (Status s = protocol::DecodeHello(payload_span(), &hello); !s.ok()) {
    (void)SendError(h, s);
    return s;
  }
  stage_.store(kHelloRead, std::memory_order_release);
  who_ = peer_ + " (partition " + std::to_string(hello.partition_id) + ", attempt " +
         std::to_string(hello.attempt) +
         (hello.client_name.empty() ? "" : ", " + hello.client_name) + ")";
  session_.partition = hello.partition_id;
  session_.attempt = hello.attempt;
  protocol::Nonce server_nonce;
  if (Status s = protocol::RandomNonce(&server_nonce); !s.ok()) {
    (void)SendError(h, s);
    return s;
  }
  // Unknown option bits are declined, not refused: a newer client learns
  // from the answer what this server does.
  const uint32_t accepted = hello.options & protocol::kKnownOptions;
  out_.clear();
  protocol::EncodeHelloResponse(server_nonce, hello.has_options, accepted, &out_);
  TS_RETURN_IF_ERROR(SendResponse(h, 0, out_));

  TS_RETURN_IF_ERROR(ReceiveFrame(deadline, kMaxHandshakePayload, &h, &peer_left));
  if (h.opcode != static_cast<uint16_t>(Opcode::kAuth) || h.flags != 0) {
    return auth_failed(
        h, std::string("expected AUTH after HELLO but got ") + protocol::OpcodeName(h.opcode));
  }
  protocol::Nonce proof;
  if (Status s = protocol::DecodeNonce(payload_span(), &proof); !s.ok()) {
    return auth_failed(h, "malformed AUTH payload: " + s.message());
  }
  protocol::Digest expected = protocol::ClientProof(
      ctx_->options.secret, server_nonce, hello.client_nonce, hello.partition_id, hello.attempt);
  if (!protocol::ConstantTimeEqual(proof.data(), expected.data(), expected.size())) {
    return auth_failed(h,
                       "authentication failed: the client's proof does not match, so client "
                       "and server use different run secrets; connect with the secret of "
                       "this run");
  }
  // Only authenticated connections count towards max_connections, so
  // strangers holding sockets cannot lock members out (they are bounded by
  // the acceptor's pending caps instead).
  const uint64_t members = ctx_->counters.authenticated.fetch_add(1) + 1;
  stage_.store(kAuthenticated, std::memory_order_release);
  if (members > ctx_->options.max_connections) {
    ctx_->membership.CountRefused(RefuseReason::kLimit);
    Status full(StatusCode::kLimitExceeded,
                "the server already has " + std::to_string(members - 1) +
                    " authenticated connections (max_connections); close idle clients or "
                    "raise the limit");
    (void)SendError(h, full);
    return full;
  }
  out_.clear();
  protocol::EncodeNonce(
      protocol::ServerProof(ctx_->options.secret, hello.client_nonce, server_nonce), &out_);
  TS_RETURN_IF_ERROR(SendResponse(h, 0, out_));
  // From the next frame on, both sides follow the accepted options.
  if ((accepted & protocol::kOptionNoChecksum) != 0) {
    checksums_ = false;
    ctx_->counters.connections_unchecked.fetch_add(1, std::memory_order_relaxed);
  }
  return Status::OK();
}

Status Connection::Dispatch(const FrameHeader& h) {
  Status result;
  const bool encodable = h.opcode == static_cast<uint16_t>(Opcode::kRegister) ||
                         h.opcode == static_cast<uint16_t>(Opcode::kPush) ||
                         h.opcode == static_cast<uint16_t>(Opcode::kPull);
  // Opcodes 16-18, outside the Opcode enum (protocol/messages.h).
  const bool snapshot_op = h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshot) ||
                           h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshots) ||
                           h.opcode == static_cast<uint16_t>(protocol::Opcode::kRestore);
  if (Status f = protocol::CheckFlags(h); !f.ok()) {
    result = f;
  } else if ((h.flags & (protocol::kFlagResponse | protocol::kFlagError)) != 0) {
    result = Err(StatusCode::kProtocolError, "a request must not set RESPONSE or ERROR flags");
  } else if ((h.flags & protocol::kEncodingFlags) != 0 && !encodable) {
    result = Err(StatusCode::kProtocolError,
                 std::string("the fp16/bf16 encoding flags are valid on REGISTER, PUSH and PULL "
                             "only, not on ") +
                     protocol::OpcodeName(h.opcode));
  } else if (snapshot_op) {
    result = HandleSnapshot(h);  // serialized with RESTORE by the server, not store_mu
  } else {
    // Shared for the whole request, so RESTORE never replaces variables a
    // request holds pointers to (see ServerContext::store_mu).
    std::shared_lock store_lock(ctx_->store_mu);
    switch (static_cast<Opcode>(h.opcode)) {
      case Opcode::kHello:
      case Opcode::kAuth:
        result =
            Err(StatusCode::kProtocolError, "the handshake is already done on this connection");
        break;
      case Opcode::kRegister:
        result = HandleRegister(h);
        break;
      case Opcode::kList:
        result = HandleList(h);
        break;
      case Opcode::kPull:
        result = HandlePull(h);
        break;
      case Opcode::kPush:
        result = HandlePush(h);
        break;
      case Opcode::kStats:
        result = HandleStats(h);
        break;
      case Opcode::kSetOptimizer:
        result = HandleSetOptimizer(h);
        break;
      case Opcode::kJoin:
      case Opcode::kLeave:
      case Opcode::kHeartbeat:
      case Opcode::kConfigure:
        result = HandleMembership(h);
        break;
      case Opcode::kReport:
      case Opcode::kReports:
        result = HandleReport(h);
        break;
      case Opcode::kTableCreate:
        result = HandleTableCreate(h);
        break;
      case Opcode::kPullRows:
        result = HandlePullRows(h);
        break;
      case Opcode::kPushRows:
        result = HandlePushRows(h);
        break;
      case Opcode::kExportRows:
        result = HandleExportRows(h);
        break;
      case Opcode::kListTables:
        result = HandleListTables(h);
        break;
      case Opcode::kShutdown: {
        if (payload_len_ != 0) {
          result = Err(StatusCode::kProtocolError, "SHUTDOWN takes an empty payload");
          break;
        }
        out_.clear();
        result = SendResponse(h, 0, out_);
        if (result.ok()) {
          LogEvent("shutdown requested by " + who_);
          if (ctx_->request_shutdown) ctx_->request_shutdown();
        }
        break;
      }
      default:
        result = Err(StatusCode::kProtocolError, "unknown opcode " + std::to_string(h.opcode) +
                                                     " (this server speaks v1: 1..23)");
    }
  }
  if (!io_status_.ok()) return io_status_;
  if (!result.ok()) return SendError(h, result);
  return Status::OK();
}

Status Connection::HandleRegister(const FrameHeader& h) {
  protocol::TensorSection req;
  const uint32_t enc = h.flags & protocol::kEncodingFlags;
  TS_RETURN_IF_ERROR(
      protocol::DecodeRegister(payload_span(), &req, protocol::WireElementSize(h.flags)));
  const uint8_t* data = payload() + req.data_offset;
  if (enc != 0) {
    if (!DecodeSection(enc, req.data_offset, req.data_len / 2)) {
      return Err(StatusCode::kLimitExceeded, "server cannot allocate memory to decode this frame");
    }
    data = reinterpret_cast<const uint8_t*>(decoded_.data());
  }
  std::vector<storage::RegisterItem> items(req.metas.size());
  for (size_t i = 0; i < items.size(); ++i) {
    items[i] = {req.metas[i].name, req.metas[i].shape, data};
    data += req.numels[i] * sizeof(float);
  }
  protocol::RegisterResponse resp;
  TS_RETURN_IF_ERROR(ctx_->store.Register(items, &resp.created));
  resp.version = ctx_->store.version();
  ctx_->counters.registers.fetch_add(1, std::memory_order_relaxed);
  out_.clear();
  protocol::EncodeRegisterResponse(resp, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleList(const FrameHeader& h) {
  if (payload_len_ != 0) return Err(StatusCode::kProtocolError, "LIST takes an empty payload");
  uint64_t version = ctx_->store.version();
  std::vector<storage::Variable*> vars;
  ctx_->store.All(&vars);
  out_.clear();
  protocol::Writer w(&out_);
  w.U64(version);
  w.U32(static_cast<uint32_t>(vars.size()));
  for (const storage::Variable* v : vars) w.Meta(v->name(), v->shape());  // immutable
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandlePull(const FrameHeader& h) {
  std::vector<std::string_view> names;
  TS_RETURN_IF_ERROR(protocol::DecodePullRequest(payload_span(), &names));
  TS_RETURN_IF_ERROR(ctx_->membership.BeforePull(&session_));  // mode waits, no locks held
  const uint64_t version = ctx_->store.version();              // read before the values
  std::vector<storage::Variable*> vars;
  if (names.empty()) {
    ctx_->store.All(&vars);
  } else {
    TS_RETURN_IF_ERROR(ctx_->store.Lookup(names, &vars));
  }
  out_.clear();
  protocol::Writer w(&out_);
  w.U64(version);
  w.U32(static_cast<uint32_t>(vars.size()));
  for (const storage::Variable* v : vars) w.Meta(v->name(), v->shape());

  // The tensor bytes go from the store straight to the socket (writev), so
  // each variable's shared lock is held until the send is done: the bytes
  // sent are the bytes checksummed, and a pull never sees half a push.
  // Pushes to these variables wait meanwhile (at most io_timeout_s for a
  // stalled client). Locks are taken once per variable, in id order, so
  // concurrent pulls and pushes cannot deadlock. The checksum is combined
  // from each variable's cached crc(), so the data is read only by send.
  std::vector<storage::Variable*> lock_order(vars);
  std::sort(
      lock_order.begin(), lock_order.end(),
      [](const storage::Variable* a, const storage::Variable* b) { return a->id() < b->id(); });
  lock_order.erase(std::unique(lock_order.begin(), lock_order.end()), lock_order.end());
  std::vector<std::shared_lock<std::shared_mutex>> locks;
  locks.reserve(lock_order.size());
  for (storage::Variable* v : lock_order) locks.emplace_back(v->mu());
  if ((h.flags & protocol::kEncodingFlags) != 0) {
    return SendEncodedPull(h, vars, &locks);
  }

  uint64_t payload_len = out_.size();
  uint32_t crc = checksums_ ? protocol::Crc32c(out_.data(), out_.size()) : 0;
  std::vector<struct iovec> iov;
  iov.reserve(vars.size() + 2);
  uint8_t raw[protocol::kHeaderSize];
  iov.push_back({raw, sizeof(raw)});
  iov.push_back({out_.data(), out_.size()});
  for (const storage::Variable* v : vars) {
    size_t bytes = v->numel() * sizeof(float);
    if (checksums_) crc = protocol::Crc32cCombine(crc, v->crc(), bytes);
    payload_len += bytes;
    iov.push_back({const_cast<float*>(v->data()), bytes});
  }
  FrameHeader resp;
  resp.opcode = h.opcode;
  resp.flags = protocol::kFlagResponse;
  resp.request_id = h.request_id;
  resp.payload_len = payload_len;
  resp.checksum = crc;
  protocol::EncodeHeader(resp, raw);
  Status s = stream_.WriteV(iov.data(), iov.size(), IoDeadline());
  locks.clear();
  if (!s.ok()) {
    io_status_ = s;
    return Status::OK();
  }
  ctx_->counters.bytes_out.fetch_add(sizeof(raw) + payload_len, std::memory_order_relaxed);
  ctx_->counters.pulls.fetch_add(1, std::memory_order_relaxed);
  return Status::OK();
}

Status Connection::HandlePush(const FrameHeader& h) {
  protocol::PushHead head;
  protocol::TensorSection req;
  const uint32_t enc = h.flags & protocol::kEncodingFlags;
  TS_RETURN_IF_ERROR(
      protocol::DecodePush(payload_span(), &head, &req, protocol::WireElementSize(h.flags)));
  // Align the data section for the vectorized update loops (see buf_).
  // A 2-byte encoding stays as it arrived: the update decodes it block by
  // block (optimizers::ApplyWithCrc), so no float32 copy is made.
  AlignPayloadAt(req.data_offset);
  std::vector<storage::PushItem> items(req.metas.size());
  if (enc != 0) {
    const auto source =
        (enc & protocol::kFlagBf16) != 0 ? optimizers::Source::kBf16 : optimizers::Source::kFp16;
    const auto* data = reinterpret_cast<const uint16_t*>(payload() + req.data_offset);
    for (size_t i = 0; i < items.size(); ++i) {
      items[i] = {req.metas[i].name, req.metas[i].shape, nullptr, req.numels[i], data, source};
      data += req.numels[i];
    }
  } else {
    const auto* data = reinterpret_cast<const float*>(payload() + req.data_offset);
    for (size_t i = 0; i < items.size(); ++i) {
      items[i] = {req.metas[i].name, req.metas[i].shape, data, req.numels[i]};
      data += req.numels[i];
    }
  }
  PushOptions options;
  options.learning_rate = head.learning_rate;
  options.mean_window = head.mean_window;
  uint64_t version = 0;
  TS_RETURN_IF_ERROR(ctx_->membership.Push(&session_, head.kind, options, items, &version));
  ctx_->counters.pushes.fetch_add(1, std::memory_order_relaxed);
  out_.clear();
  protocol::EncodeVersion(version, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

void Connection::AlignPayloadAt(size_t offset) {
  const size_t misalign = reinterpret_cast<uintptr_t>(payload() + offset) % kAlign;
  if (misalign != 0) {
    const size_t new_shift = (shift_ + kAlign - misalign) % kAlign;
    std::memmove(buf_.get() + new_shift, payload(), payload_len_);
    shift_ = new_shift;
  }
}

bool Connection::DecodeSection(uint32_t flags, size_t offset, uint64_t n) {
  // 2-byte elements must be aligned for the conversion loops.
  AlignPayloadAt(offset);
  try {
    if (decoded_.size() < n) decoded_.resize(n);
  } catch (const std::bad_alloc&) {
    return false;
  }
  const auto* in = reinterpret_cast<const uint16_t*>(payload() + offset);
  for (uint64_t done = 0; done < n; done += kConvertChunk) {
    const size_t c = static_cast<size_t>(std::min<uint64_t>(kConvertChunk, n - done));
    protocol::DecodeElements(flags, in + done, decoded_.data() + done, c);
  }
  return true;
}

Status Connection::SendEncodedPull(const FrameHeader& req, std::span<storage::Variable* const> vars,
                                   std::vector<std::shared_lock<std::shared_mutex>>* locks) {
  const uint32_t enc = req.flags & protocol::kEncodingFlags;
  uint64_t total = 0;
  for (const storage::Variable* v : vars) total += v->numel();
  try {
    if (encoded_.size() < total) encoded_.resize(total);
  } catch (const std::bad_alloc&) {
    return Err(StatusCode::kLimitExceeded, "server cannot allocate memory to encode this pull");
  }
  // The cached per-variable CRCs are of float32 bytes: the checksum is
  // computed over the encoded bytes, chunk by chunk while they are in cache.
  uint32_t crc = checksums_ ? protocol::Crc32c(out_.data(), out_.size()) : 0;
  uint16_t* dst = encoded_.data();
  for (const storage::Variable* v : vars) {
    const float* src = v->data();
    for (uint64_t done = 0; done < v->numel(); done += kConvertChunk) {
      const size_t c = static_cast<size_t>(std::min<uint64_t>(kConvertChunk, v->numel() - done));
      protocol::EncodeElements(enc, src + done, dst, c);
      if (checksums_) crc = protocol::Crc32cExtend(crc, dst, c * 2);
      dst += c;
    }
  }
  locks->clear();
  FrameHeader resp;
  resp.opcode = req.opcode;
  resp.flags = protocol::kFlagResponse | enc;
  resp.request_id = req.request_id;
  resp.payload_len = out_.size() + total * 2;
  resp.checksum = crc;
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(resp, raw);
  struct iovec iov[3] = {{raw, sizeof(raw)},
                         {out_.data(), out_.size()},
                         {encoded_.data(), static_cast<size_t>(total * 2)}};
  Status s = stream_.WriteV(iov, 3, IoDeadline());
  if (!s.ok()) {
    io_status_ = s;
    return Status::OK();
  }
  ctx_->counters.bytes_out.fetch_add(sizeof(raw) + resp.payload_len, std::memory_order_relaxed);
  ctx_->counters.pulls.fetch_add(1, std::memory_order_relaxed);
  return Status::OK();
}

Status Connection::HandleSetOptimizer(const FrameHeader& h) {
  OptimizerConfig config;
  std::vector<std::string_view> names;
  TS_RETURN_IF_ERROR(protocol::DecodeSetOptimizer(payload_span(), &config, &names));
  TS_RETURN_IF_ERROR(ctx_->store.SetOptimizer(config, names));
  out_.clear();
  protocol::EncodeVersion(ctx_->store.version(), &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleMembership(const FrameHeader& h) {
  out_.clear();
  switch (static_cast<Opcode>(h.opcode)) {
    case Opcode::kJoin: {
      if (payload_len_ != 0) return Err(StatusCode::kProtocolError, "JOIN takes an empty payload");
      uint64_t clock = 0;
      TS_RETURN_IF_ERROR(ctx_->membership.Join(&session_, &clock));
      protocol::EncodeJoinResponse(ctx_->store.version(), clock, &out_);
      break;
    }
    case Opcode::kLeave:
      if (payload_len_ != 0) return Err(StatusCode::kProtocolError, "LEAVE takes an empty payload");
      TS_RETURN_IF_ERROR(ctx_->membership.Leave(&session_));
      protocol::EncodeVersion(ctx_->store.version(), &out_);
      break;
    case Opcode::kHeartbeat: {  // Run() already refreshed last-seen
      bool has_report = false;
      protocol::ProgressReport report;
      TS_RETURN_IF_ERROR(protocol::DecodeHeartbeat(payload_span(), &has_report, &report));
      if (has_report) ctx_->membership.Report(session_, report);
      protocol::EncodeVersion(ctx_->store.version(), &out_);
      break;
    }
    default: {
      RunConfig config;
      TS_RETURN_IF_ERROR(protocol::DecodeConfigure(payload_span(), &config));
      TS_RETURN_IF_ERROR(protocol::ValidateRunConfig(config));
      TS_RETURN_IF_ERROR(ctx_->membership.Configure(config));
      protocol::EncodeVersion(ctx_->store.version(), &out_);
      break;
    }
  }
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleReport(const FrameHeader& h) {
  out_.clear();
  if (h.opcode == static_cast<uint16_t>(Opcode::kReport)) {
    uint8_t kind = 0;
    std::string_view text;
    TS_RETURN_IF_ERROR(protocol::DecodeReport(payload_span(), &kind, &text));
    TS_RETURN_IF_ERROR(ctx_->membership.StoreDump(session_, text));
    protocol::EncodeVersion(ctx_->store.version(), &out_);
  } else {
    if (payload_len_ != 0) {
      return Err(StatusCode::kProtocolError, "REPORTS takes an empty payload");
    }
    std::vector<WorkerReport> reports;
    ctx_->membership.Reports(&reports);
    protocol::EncodeReportsResponse(reports, &out_);
  }
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleSnapshot(const FrameHeader& h) {
  const SnapshotService& svc = ctx_->snapshots;
  out_.clear();
  if (h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshots)) {
    if (payload_len_ != 0) {
      return Err(StatusCode::kProtocolError, "SNAPSHOTS takes an empty payload");
    }
    std::vector<SnapshotInfo> files;
    if (!svc.list) return Err(StatusCode::kInternal, "snapshots are not served");
    TS_RETURN_IF_ERROR(svc.list(&files));
    protocol::EncodeSnapshotsResponse(files, &out_);
  } else {
    uint64_t tag = 0, version = 0;
    TS_RETURN_IF_ERROR(protocol::DecodeTagRequest(payload_span(), &tag));
    if (!svc.snapshot || !svc.restore)
      return Err(StatusCode::kInternal, "snapshots are not served");
    if (h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshot)) {
      std::string name;
      TS_RETURN_IF_ERROR(svc.snapshot(tag, &name, &version));
      protocol::EncodeSnapshotResponse(version, name, &out_);
    } else {
      LogEvent("restore of tag " + std::to_string(tag) + " requested by " + who_);
      TS_RETURN_IF_ERROR(svc.restore(tag, &version));
      protocol::EncodeVersion(version, &out_);
    }
  }
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleStats(const FrameHeader& h) {
  if (payload_len_ != 0) return Err(StatusCode::kProtocolError, "STATS takes an empty payload");
  std::vector<StatEntry> stats = ctx_->Snapshot();
  out_.clear();
  protocol::EncodeStatsResponse(stats, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

// ---- sparse tables ------------------------------------------------------------------

namespace {

// Largest EXPORT_ROWS response (a batch), so one call never builds a huge
// frame whatever max_rows asks for.
constexpr uint64_t kMaxExportBytes = uint64_t{64} << 20;

// Whether a new config keeps what a stored table cannot change (the same
// checks as SparseTable::Reconfigure), so TABLE_CREATE can refuse the
// whole frame before it creates or changes any table.
Status CheckCompatible(const TableConfig& want, const TableConfig& have) {
  if (want.dim != have.dim) {
    return Err(StatusCode::kShapeMismatch, "table '" + want.name + "' has dim " +
                                               std::to_string(have.dim) + " on the server, not " +
                                               std::to_string(want.dim));
  }
  const char* field = want.vocab != have.vocab                ? "vocab"
                      : want.seed != have.seed                ? "seed"
                      : want.initializer != have.initializer  ? "initializer"
                      : !(want.init_scale == have.init_scale) ? "init_scale"
                                                              : nullptr;
  if (field != nullptr) {
    return Err(StatusCode::kInvalidArgument,
               "table '" + want.name + "' exists on the server with another " + field +
                   "; a table's vocab, seed and initializer are fixed at creation (use another "
                   "table name, or the same values)");
  }
  return Status::OK();
}

}  // namespace

Status Connection::HandleTableCreate(const FrameHeader& h) {
  std::vector<TableConfig> configs;
  TS_RETURN_IF_ERROR(protocol::DecodeTableCreate(payload_span(), &configs));
  for (const TableConfig& c : configs) {
    TS_RETURN_IF_ERROR(storage::ValidateTableConfig(c));
    storage::SparseTable* t = nullptr;
    if (ctx_->tables.Lookup(c.name, &t).ok()) TS_RETURN_IF_ERROR(CheckCompatible(c, t->config()));
  }
  std::vector<uint8_t> created(configs.size());
  for (size_t i = 0; i < configs.size(); ++i) {
    bool c = false;
    TS_RETURN_IF_ERROR(ctx_->tables.CreateOrCheck(configs[i], &c));
    created[i] = c ? 1 : 0;
  }
  out_.clear();
  protocol::EncodeTableCreateResponse(created, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandlePullRows(const FrameHeader& h) {
  std::vector<protocol::RowsSection> sections;
  TS_RETURN_IF_ERROR(protocol::DecodePullRowsRequest(payload_span(), &sections));
  std::vector<storage::SparseTable*> tables(sections.size());
  uint64_t len = 12;
  for (size_t i = 0; i < sections.size(); ++i) {
    TS_RETURN_IF_ERROR(ctx_->tables.Lookup(sections[i].table, &tables[i]));
    len += 8 + uint64_t{sections[i].n} * tables[i]->config().dim * 4;  // n < 2^29: no overflow
  }
  if (len > ctx_->options.max_frame_bytes) {
    return Err(StatusCode::kLimitExceeded, "this PULL_ROWS would answer " + std::to_string(len) +
                                               " bytes, over the server's max_frame_bytes (" +
                                               std::to_string(ctx_->options.max_frame_bytes) +
                                               "); pull fewer ids per request");
  }
  const uint64_t version = ctx_->store.version();
  try {
    out_.resize(len);
  } catch (const std::bad_alloc&) {
    return Err(StatusCode::kLimitExceeded, "server cannot allocate " + std::to_string(len) +
                                               " bytes for this PULL_ROWS; pull fewer ids");
  }
  protocol::StoreLE64(out_.data(), version);
  protocol::StoreLE32(out_.data() + 8, static_cast<uint32_t>(sections.size()));
  size_t pos = 12;
  for (size_t i = 0; i < sections.size(); ++i) {
    const protocol::RowsSection& s = sections[i];
    const uint32_t dim = tables[i]->config().dim;
    protocol::StoreLE32(out_.data() + pos, dim);
    protocol::StoreLE32(out_.data() + pos + 4, s.n);
    pos += 8;
    ids_.resize(s.n);
    protocol::CopyIds(s, ids_.data());
    // Every field before it is a multiple of 4 bytes: the rows are aligned.
    TS_RETURN_IF_ERROR(tables[i]->Pull(ids_, reinterpret_cast<float*>(out_.data() + pos)));
    pos += size_t{s.n} * dim * 4;
  }
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandlePushRows(const FrameHeader& h) {
  uint8_t kind = 0;
  float lr = 0.0f;
  std::vector<protocol::RowsSection> sections;
  TS_RETURN_IF_ERROR(protocol::DecodePushRows(payload_span(), &kind, &lr, &sections));
  if (!sections.empty() && sections[0].n > 0) {
    // Align the first table's values (the common single-table push), then
    // decode again: the payload may have moved.
    AlignPayloadAt(static_cast<size_t>(sections[0].values - payload()));
    TS_RETURN_IF_ERROR(protocol::DecodePushRows(payload_span(), &kind, &lr, &sections));
  }
  // Every table and dim first, so a bad one refuses the whole frame.
  std::vector<storage::SparseTable*> tables(sections.size());
  for (size_t i = 0; i < sections.size(); ++i) {
    TS_RETURN_IF_ERROR(ctx_->tables.Lookup(sections[i].table, &tables[i]));
    const uint32_t dim = tables[i]->config().dim;
    if (sections[i].dim != dim) {
      return Err(StatusCode::kShapeMismatch,
                 "table '" + std::string(sections[i].table) + "' has dim " + std::to_string(dim) +
                     " on the server, the push carries " + std::to_string(sections[i].dim));
    }
  }
  for (size_t i = 0; i < sections.size(); ++i) {
    const protocol::RowsSection& s = sections[i];
    ids_.resize(s.n);
    protocol::CopyIds(s, ids_.data());
    const float* values = reinterpret_cast<const float*>(s.values);
    if (reinterpret_cast<uintptr_t>(s.values) % alignof(float) != 0) {
      values_.resize(size_t{s.n} * s.dim);
      protocol::CopyValues(s, values_.data());
      values = values_.data();
    }
    Status st = tables[i]->Push(static_cast<UpdateKind>(kind), lr, ids_, values);
    if (!st.ok()) {
      if (i == 0) return st;
      (void)ctx_->store.BumpVersion();
      return Status(st.code(), st.message() + " (the " + std::to_string(i) +
                                   " tables before it in this push were applied)");
    }
  }
  const uint64_t version = ctx_->store.BumpVersion();
  ctx_->counters.row_pushes.fetch_add(1, std::memory_order_relaxed);
  out_.clear();
  protocol::EncodeVersion(version, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleExportRows(const FrameHeader& h) {
  std::string_view name;
  uint64_t cursor = 0;
  uint32_t max_rows = 0;
  TS_RETURN_IF_ERROR(protocol::DecodeExportRowsRequest(payload_span(), &name, &cursor, &max_rows));
  storage::SparseTable* t = nullptr;
  TS_RETURN_IF_ERROR(ctx_->tables.Lookup(name, &t));
  const uint32_t dim = t->config().dim;
  const uint64_t cap = std::max<uint64_t>(
      1, std::min(kMaxExportBytes, ctx_->options.max_frame_bytes) / (8 + uint64_t{dim} * 4));
  std::vector<int64_t> ids;
  std::vector<float> values;
  uint64_t next = protocol::kExportDone;
  t->Export(cursor, static_cast<uint32_t>(std::min<uint64_t>(max_rows, cap)), &ids, &values, &next);
  out_.clear();
  protocol::Writer w(&out_);
  w.U64(next);
  w.U32(dim);
  w.U32(static_cast<uint32_t>(ids.size()));
  w.Bytes(ids.data(), ids.size() * sizeof(int64_t));
  w.Bytes(values.data(), values.size() * sizeof(float));
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

Status Connection::HandleListTables(const FrameHeader& h) {
  if (payload_len_ != 0) {
    return Err(StatusCode::kProtocolError, "LIST_TABLES takes an empty payload");
  }
  std::vector<storage::SparseTable*> tables;
  ctx_->tables.All(&tables);
  std::vector<TableInfo> infos;
  infos.reserve(tables.size());
  for (storage::SparseTable* t : tables) infos.push_back({t->config(), t->Stats().rows});
  out_.clear();
  protocol::EncodeListTablesResponse(infos, &out_);
  (void)SendResponse(h, 0, out_);
  return Status::OK();
}

}  // namespace tensorspark::server
