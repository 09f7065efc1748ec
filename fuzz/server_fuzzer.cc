// libFuzzer target: the server's request handling, driven over loopback
// TCP by fuzzer-made frames (format: fuzz_input.h).
//
// Per input, a fresh tensorspark::Server (so every input starts from the
// same state and a crash reproduces from its input alone; with the control
// byte's kSnapshotDir it gets a snapshot directory, emptied after the
// input): connect, do a
// valid HELLO/AUTH handshake and register a few variables (unless the
// control byte says to skip the handshake), send the input's frames and
// then EOF while reading the replies, wait for the server to close, and
// Stop() it, which joins its threads before the next input.
// Checked besides the sanitizers: the connection ends once the client has
// sent everything, every reply is a well-formed frame answering the
// request at the same position, and the server logged no exception
// ("internal error": handlers must return a Status, never throw).
// TENSORSPARK_FUZZ_LOG=1 shows the server's log lines.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_input.h"
#include "net/socket.h"
#include "protocol/auth.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"
#include "tensorspark/server.h"

namespace tensorspark::fuzz {
namespace {

using protocol::FrameHeader;
using protocol::Opcode;
using Bytes = std::vector<uint8_t>;

const std::string kSecret = "fuzz-secret-0123456789abcdef";
// The client gives up after this long and the input counts as a hang.
constexpr double kInputTimeoutS = 5.0;
// Replies beyond this many bytes are read but not checked.
constexpr size_t kMaxCheckedReply = 64 << 20;

// ---- server log capture ------------------------------------------------------
// The server logs a line per closed connection with fprintf(stderr): that
// would flood the fuzzer's output, and a caught exception would go unseen.
// `stderr` (the FILE* variable, read at each call) is pointed at a pipe
// drained after each input; libFuzzer and the sanitizers keep fd 2.
int g_log_read = -1;
FILE* g_real_stderr = nullptr;
bool g_echo_log = false;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(g_real_stderr != nullptr ? g_real_stderr : stderr, "server_fuzzer: %s\n",
               what.c_str());
  std::abort();
}

void CaptureServerLog() {
  g_echo_log = std::getenv("TENSORSPARK_FUZZ_LOG") != nullptr;
  int fds[2];
  if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) Fail("pipe2 failed");
  (void)fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);  // best effort; a full pipe drops lines
  FILE* log = fdopen(fds[1], "w");
  if (log == nullptr) Fail("fdopen failed");
  setvbuf(log, nullptr, _IONBF, 0);
  g_log_read = fds[0];
  g_real_stderr = stderr;
  stderr = log;
}

size_t CountOf(std::string_view text, std::string_view what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string_view::npos; at = text.find(what, at + 1)) {
    ++n;
  }
  return n;
}

// Fails if the server logged more "internal error" lines (Connection::Run's
// catch blocks) than the input itself spells: a client name in the log can
// carry the words, and libFuzzer learns them from this very check.
void CheckServerLog(const FuzzInput& in) {
  std::string text;
  char buf[4096];
  for (;;) {
    ssize_t n = read(g_log_read, buf, sizeof(buf));
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  clearerr(stderr);  // after a dropped line
  if (g_echo_log) std::fputs(text.c_str(), g_real_stderr);
  constexpr std::string_view kThrew = "internal error";
  const std::string_view input(reinterpret_cast<const char*>(in.stream.data()), in.stream.size());
  if (CountOf(text, kThrew) > CountOf(input, kThrew)) {
    if (!g_echo_log) std::fputs(text.c_str(), g_real_stderr);
    Fail("a request handler threw");
  }
}

// ---- client side -------------------------------------------------------------------

// The snapshot directory of kSnapshotDir inputs, made once per process and
// removed at exit (a plain array: atexit handlers may outlive a string).
char g_snapshot_dir[4096] = "";

const char* SnapshotDir() {
  if (g_snapshot_dir[0] == '\0') {
    const char* base = std::getenv("TMPDIR");
    const std::string tmpl =
        std::string(base != nullptr && *base ? base : "/tmp") + "/ts-fuzz-XXXXXX";
    if (tmpl.size() >= sizeof(g_snapshot_dir)) Fail("TMPDIR is too long");
    std::memcpy(g_snapshot_dir, tmpl.c_str(), tmpl.size() + 1);
    if (::mkdtemp(g_snapshot_dir) == nullptr) Fail("mkdtemp failed");
    std::atexit([] { (void)::rmdir(g_snapshot_dir); });
  }
  return g_snapshot_dir;
}

// Deletes what an input's server wrote, so the next input starts empty.
void EmptySnapshotDir() {
  DIR* d = ::opendir(SnapshotDir());
  if (d == nullptr) Fail("cannot open the snapshot directory");
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") {
      (void)::unlink((std::string(SnapshotDir()) + "/" + name).c_str());
    }
  }
  ::closedir(d);
}

ServerOptions FuzzServerOptions(bool snapshots) {
  ServerOptions o;
  if (snapshots) {
    o.snapshot_dir = SnapshotDir();
    o.snapshot_keep = 2;
  }
  o.bind_address = "127.0.0.1";
  o.port = 0;
  o.secret = kSecret;
  o.max_variables = 16;  // small enough that inputs reach kLimitExceeded
  o.io_timeout_s = 2;
  o.handshake_timeout_s = 2;
  return o;
}

// Variables registered before the input's frames, so PULL and PUSH reach
// the update rules with real names and shapes (the seeds use these names).
Bytes BaseVariables() {
  struct Var {
    const char* name;
    std::vector<int64_t> shape;
  };
  const Var vars[] = {{"w", {4, 3}}, {"b", {3}}, {"s", {}}, {"z", {0, 5}}};
  Bytes p;
  protocol::Writer w(&p);
  w.U32(std::size(vars));
  for (const Var& v : vars) w.Meta(v.name, v.shape);
  for (const Var& v : vars) {
    int64_t n = 1;
    for (int64_t d : v.shape) n *= d;
    for (int64_t i = 0; i < n; ++i) w.F32(0.25f * static_cast<float>(i) - 1.0f);
  }
  return p;
}

struct Reply {
  FrameHeader header;
  Bytes payload;
};

// One reply to a setup request; error frames and bad checksums fail (0 is
// the checksum of an `unchecked` one).
Status ReadSetupReply(int fd, net::Deadline deadline, Opcode op, Reply* out,
                      bool unchecked = false) {
  uint8_t raw[protocol::kHeaderSize];
  TS_RETURN_IF_ERROR(net::ReadFull(fd, raw, sizeof(raw), deadline));
  out->header = protocol::DecodeHeader(raw);
  if (out->header.payload_len > 4096) {
    return Status(StatusCode::kProtocolError, "setup reply too large");
  }
  out->payload.resize(out->header.payload_len);
  TS_RETURN_IF_ERROR(net::ReadFull(fd, out->payload.data(), out->payload.size(), deadline));
  if (out->header.opcode != static_cast<uint16_t>(op) ||
      out->header.flags != protocol::kFlagResponse ||
      (unchecked ? 0 : protocol::Crc32c(out->payload.data(), out->payload.size())) !=
          out->header.checksum) {
    Status remote;
    if (protocol::DecodeError(out->payload, &remote).ok()) return remote;
    return Status(StatusCode::kProtocolError,
                  std::string("bad reply to ") + protocol::OpcodeName(static_cast<uint16_t>(op)));
  }
  return Status::OK();
}

Status SendFrame(int fd, Opcode op, uint64_t request_id, const Bytes& payload,
                 net::Deadline deadline) {
  Bytes bytes;
  AppendFrame(static_cast<uint16_t>(op), 0, request_id, payload, &bytes);
  return net::WriteFull(fd, bytes.data(), bytes.size(), deadline);
}

// HELLO (asking for no checksums when `unchecked`), AUTH (checking the
// server's proof too), REGISTER of BaseVariables.
Status Setup(int fd, bool unchecked, net::Deadline deadline) {
  protocol::HelloRequest hello;
  hello.client_nonce.fill(0x5a);
  hello.partition_id = 1;
  hello.attempt = 0;
  hello.client_name = "fuzz";
  hello.has_options = unchecked;
  hello.options = unchecked ? protocol::kOptionNoChecksum : 0;
  Bytes p;
  protocol::EncodeHello(hello, &p);
  TS_RETURN_IF_ERROR(SendFrame(fd, Opcode::kHello, 1, p, deadline));
  Reply r;
  protocol::Nonce server_nonce, server_proof;
  TS_RETURN_IF_ERROR(ReadSetupReply(fd, deadline, Opcode::kHello, &r));
  uint32_t accepted = 0;
  TS_RETURN_IF_ERROR(protocol::DecodeHelloResponse(r.payload, unchecked, &server_nonce, &accepted));
  if (accepted != hello.options) return Status(StatusCode::kProtocolError, "options declined");
  protocol::Digest proof = protocol::ClientProof(kSecret, server_nonce, hello.client_nonce,
                                                 hello.partition_id, hello.attempt);
  TS_RETURN_IF_ERROR(SendFrame(fd, Opcode::kAuth, 2, Bytes(proof.begin(), proof.end()), deadline));
  TS_RETURN_IF_ERROR(ReadSetupReply(fd, deadline, Opcode::kAuth, &r));
  TS_RETURN_IF_ERROR(protocol::DecodeNonce(r.payload, &server_proof));
  if (server_proof != protocol::ServerProof(kSecret, hello.client_nonce, server_nonce)) {
    return Status(StatusCode::kAuthFailed, "wrong server proof");
  }
  static const Bytes kBase = BaseVariables();
  TS_RETURN_IF_ERROR(SendFrame(fd, Opcode::kRegister, 3, kBase, deadline));
  return ReadSetupReply(fd, deadline, Opcode::kRegister, &r, unchecked);
}

struct Exchange {
  bool clean_eof = false;  // the server closed without a reset
  bool complete = true;    // every reply byte kept (not over kMaxCheckedReply)
  Bytes replies;
};

// Sends `bytes`, then EOF, while reading replies until the server closes.
// Fails only when the deadline passes.
Status SendAndDrain(int fd, const Bytes& bytes, net::Deadline deadline, Exchange* ex) {
  size_t sent = 0;
  bool shut = false;
  uint8_t buf[64 * 1024];
  for (;;) {
    if (sent == bytes.size() && !shut) {
      ::shutdown(fd, SHUT_WR);
      shut = true;
    }
    struct pollfd p = {fd, static_cast<short>(POLLIN | (shut ? 0 : POLLOUT)), 0};
    const int ms = deadline.PollTimeoutMs();
    if (ms == 0) return Status(StatusCode::kTimeout, "the server did not close the connection");
    if (poll(&p, 1, ms) < 0 && errno != EINTR) Fail("poll failed");
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n > 0) {
        if (ex->replies.size() + static_cast<size_t>(n) <= kMaxCheckedReply) {
          ex->replies.insert(ex->replies.end(), buf, buf + n);
        } else {
          ex->complete = false;
        }
      } else if (n == 0) {
        ex->clean_eof = true;
        return Status::OK();
      } else if (errno != EAGAIN && errno != EINTR) {
        return Status::OK();  // reset: the server closed with input unread
      }
    }
    if (!shut && (p.revents & POLLOUT)) {
      ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<size_t>(n);
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        sent = bytes.size();  // the server closed; read on until EOF
      }
    }
  }
}

// The replies must be whole frames with valid checksums and payloads, each
// answering the request at the same position (same opcode and request_id).
void CheckReplies(const FuzzInput& in, const Exchange& ex) {
  const Bytes& r = ex.replies;
  size_t pos = 0, index = 0;
  while (pos < r.size()) {
    if (r.size() - pos < protocol::kHeaderSize) Fail("reply ends inside a frame header");
    const FrameHeader h = protocol::DecodeHeader(r.data() + pos);
    pos += protocol::kHeaderSize;
    if (h.payload_len > r.size() - pos) Fail("reply ends inside a frame payload");
    std::span<const uint8_t> payload(r.data() + pos, h.payload_len);
    pos += h.payload_len;
    if (h.magic != protocol::kMagic || h.version != protocol::kVersion) Fail("reply header");
    if (!(h.flags & protocol::kFlagResponse) || !protocol::CheckFlags(h).ok()) {
      Fail("reply flags " + std::to_string(h.flags));
    }
    const bool unchecked = (in.control & kNoChecksum) != 0 && !(in.control & kSkipHandshake);
    const uint32_t want = unchecked ? 0 : protocol::Crc32c(payload.data(), payload.size());
    if (h.checksum != want) Fail("reply checksum");
    if (index >= in.frames.size()) Fail("more replies than requests");
    const FrameHeader req = protocol::DecodeHeader(in.stream.data() + in.frames[index].header);
    ++index;
    if (h.opcode != req.opcode || h.request_id != req.request_id) {
      Fail("reply " + std::to_string(index) + " does not answer request " + std::to_string(index));
    }
    Status s;
    const bool snapshot_op = h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshot) ||
                             h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshots) ||
                             h.opcode == static_cast<uint16_t>(protocol::Opcode::kRestore);
    if (h.flags & protocol::kFlagError) {
      Status remote;
      s = protocol::DecodeError(payload, &remote);
      if (s.ok() && protocol::LoadLE32(payload.data()) == 0) {
        s = Status(StatusCode::kProtocolError, "error frame with code 0");
      }
    } else if (snapshot_op) {  // opcodes 16-18, outside the Opcode enum
      uint64_t version;
      std::string name;
      std::vector<SnapshotInfo> files;
      if (h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshot)) {
        s = protocol::DecodeSnapshotResponse(payload, &version, &name);
      } else if (h.opcode == static_cast<uint16_t>(protocol::Opcode::kSnapshots)) {
        s = protocol::DecodeSnapshotsResponse(payload, &files);
      } else {
        s = protocol::DecodeVersion(payload, &version);
      }
    } else {
      uint64_t version;
      protocol::Nonce nonce;
      protocol::RegisterResponse reg;
      std::vector<VariableInfo> vars;
      std::vector<Tensor> tensors;
      std::vector<StatEntry> stats;
      switch (static_cast<Opcode>(h.opcode)) {
        case Opcode::kHello: {
          // The reply carries an accepted-options word only when the request
          // carried options.
          protocol::HelloRequest hello;
          const FrameSpan& f = in.frames[index - 1];
          const bool options =
              protocol::DecodeHello({in.stream.data() + f.payload, f.size}, &hello).ok() &&
              hello.has_options;
          uint32_t accepted;
          s = protocol::DecodeHelloResponse(payload, options, &nonce, &accepted);
          break;
        }
        case Opcode::kAuth:
          s = protocol::DecodeNonce(payload, &nonce);
          break;
        case Opcode::kRegister:
          s = protocol::DecodeRegisterResponse(payload, &reg);
          break;
        case Opcode::kList:
          s = protocol::DecodeListResponse(payload, &version, &vars);
          break;
        case Opcode::kPull:
          // An encoded PULL is answered in the requested encoding.
          if ((h.flags & protocol::kEncodingFlags) != (req.flags & protocol::kEncodingFlags)) {
            s = Status(StatusCode::kProtocolError, "PULL reply encoding differs from request");
          } else {
            s = protocol::DecodePullResponse(payload, &version, &tensors, h.flags);
          }
          break;
        case Opcode::kPush:
        case Opcode::kLeave:
        case Opcode::kHeartbeat:
        case Opcode::kConfigure:
        case Opcode::kReport:
          s = protocol::DecodeVersion(payload, &version);
          break;
        case Opcode::kReports: {
          std::vector<WorkerReport> reports;
          s = protocol::DecodeReportsResponse(payload, &reports);
          break;
        }
        case Opcode::kJoin: {
          uint64_t clock;
          s = protocol::DecodeJoinResponse(payload, &version, &clock);
          break;
        }
        case Opcode::kStats:
          s = protocol::DecodeStatsResponse(payload, &stats);
          break;
        case Opcode::kShutdown:
          if (!payload.empty()) s = Status(StatusCode::kProtocolError, "non-empty payload");
          break;
        case Opcode::kTableCreate: {
          std::vector<uint8_t> created;
          s = protocol::DecodeTableCreateResponse(payload, &created);
          break;
        }
        case Opcode::kPullRows: {
          std::vector<protocol::RowsBlock> rows;
          s = protocol::DecodePullRowsResponse(payload, &version, &rows);
          break;
        }
        case Opcode::kPushRows:
          s = protocol::DecodeVersion(payload, &version);
          break;
        case Opcode::kExportRows: {
          uint64_t next;
          protocol::RowsBlock rows;
          s = protocol::DecodeExportRowsResponse(payload, &next, &rows);
          break;
        }
        case Opcode::kListTables: {
          std::vector<TableInfo> tables;
          s = protocol::DecodeListTablesResponse(payload, &tables);
          break;
        }
        default:
          // An opcode added after this harness: only its framing is checked.
          if (std::strcmp(protocol::OpcodeName(h.opcode), "UNKNOWN") == 0) {
            s = Status(StatusCode::kProtocolError, "success reply to an unknown opcode");
          }
      }
    }
    if (!s.ok()) {
      Fail(std::string("malformed ") + protocol::OpcodeName(h.opcode) + " reply: " + s.ToString());
    }
  }
}

}  // namespace
}  // namespace tensorspark::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tensorspark;
  static const bool kCaptured = (fuzz::CaptureServerLog(), true);
  (void)kCaptured;
  const fuzz::FuzzInput in = fuzz::ParseFuzzInput(data, size);

  std::unique_ptr<Server> server;
  const bool snapshots = (in.control & fuzz::kSnapshotDir) != 0;
  if (Status s = Server::Start(fuzz::FuzzServerOptions(snapshots), &server); !s.ok()) {
    fuzz::Fail("cannot start the server: " + s.ToString());
  }
  const net::Deadline deadline = net::Deadline::In(fuzz::kInputTimeoutS);
  net::Socket sock;
  if (Status s = net::ConnectWithTimeout("127.0.0.1", server->port(), deadline, &sock); !s.ok()) {
    fuzz::Fail("cannot connect: " + s.ToString());
  }
  if (!(in.control & fuzz::kSkipHandshake)) {
    const bool unchecked = (in.control & fuzz::kNoChecksum) != 0;
    if (Status s = fuzz::Setup(sock.fd(), unchecked, deadline); !s.ok()) {
      fuzz::Fail("handshake or setup failed: " + s.ToString());
    }
  }
  fuzz::Exchange ex;
  if (Status s = fuzz::SendAndDrain(sock.fd(), in.stream, deadline, &ex); !s.ok()) {
    fuzz::Fail("hang: " + s.ToString());
  }
  sock.Close();
  server->Stop();  // joins the connection thread: its work is all done
  server.reset();
  if (snapshots) fuzz::EmptySnapshotDir();
  fuzz::CheckServerLog(in);
  if (ex.clean_eof && ex.complete) fuzz::CheckReplies(in, ex);
  return 0;
}
