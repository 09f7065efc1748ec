// ps_soak: a long-running mixed load against a running tensorspark-ps, to
// find leaks and crashes (bench/soak.py runs it and watches the server's
// memory, threads and file descriptors).
//
//   ps_soak --port N --secret-file PATH [--host 127.0.0.1] [--threads 32]
//           [--seconds 600] [--out PATH] [--seed N] [--heartbeat-timeout-s 2]
//           [--think-ms 2]
//
// A driver-like client registers a few variables (1K to 256K floats, one
// with a server-side optimizer) and configures an async run. Then every
// thread plays one Spark partition (partition id = thread index) and runs
// task after task, each a new attempt number (so a newer attempt fences the
// older ones, as Spark's retries do). A task connects (fp32, fp16 or bf16;
// some with a heartbeat thread, some of those shipping a dump file), JOINs,
// loops steps of pull + push (delta, parameters or gradient) of a random
// subset of the variables with progress reports, heartbeats, REPORTs of
// stack-dump texts up to 80 KiB (cut to 64 KiB by the client), and now and
// then STATS, REPORTS, LIST, PULL of everything and a request the server
// must refuse (unknown name, wrong shape, mean_window 0, gradient without a
// rate). A task ends in one of these ways:
//   leave    LEAVE, then close (a task that finished);
//   killed   close without LEAVE (a killed executor: "lost: connection closed");
//   zombie   stays open and joined; the next attempt's JOIN fences it, then
//            its PUSH and JOIN must fail with Fenced while its PULL, HEARTBEAT
//            and REPORT are still served;
//   rejoin   a second connection with the same identity JOINs (the member is
//            kept), the first closes without LEAVE, the task goes on;
//   stall    no request for heartbeat_timeout_s + 0.7 s ("lost: silent" unless
//            its heartbeat thread keeps it alive), then a pull and LEAVE.
// Between tasks a thread sometimes opens a connection with the wrong secret
// (AuthFailed expected) or a raw socket that sends garbage, a truncated
// HELLO, or nothing. Meanwhile the main thread polls STATS and REPORTS,
// changes the optimizer's rate and kind, and tries CONFIGURE (refused while
// workers are live, a new run when none is).
//
// Each request is counted by kind as ok, an expected error (the server
// refused what it must refuse) or an unexpected error (anything else,
// including a refusal that did not come). At the end every client is closed
// and the server must drop back to this tool's single connection and no
// live member within 10 s. Writes JSON (--out) and exits 0 when no
// unexpected error occurred, 1 otherwise, 2 on bad arguments.
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_output.h"
#include "net/socket.h"
#include "protocol/auth.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "tensorspark/client.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace {

using tensorspark::bench::Die;
using tensorspark::bench::JsonEscape;
using tensorspark::bench::Num;
using tensorspark::bench::ParseDouble;
using tensorspark::bench::UtcTimestamp;

using Clock = std::chrono::steady_clock;
using tensorspark::Status;
using tensorspark::StatusCode;

// ---- configuration ----------------------------------------------------------

struct Config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;
  std::string secret;
  int threads = 32;
  double seconds = 600;
  std::string out;
  uint64_t seed = 0;
  double heartbeat_timeout_s = 2.0;
  double think_ms = 2.0;  // mean pause between steps (uniform in [0, 2x])
};

// The model: a few variables of different sizes, registered once.
struct VarDef {
  const char* name;
  std::vector<int64_t> shape;
  int64_t numel;
};

const std::vector<VarDef>& Vars() {
  static const std::vector<VarDef> vars = {
      {"soak/v1k", {1024}, 1024},       {"soak/v16k", {128, 128}, 16384},
      {"soak/v64k", {256, 256}, 65536}, {"soak/v256k", {512, 512}, 262144},
      {"soak/opt", {64, 256}, 16384},  // has a server-side optimizer
  };
  return vars;
}
constexpr int kOptVar = 4;
constexpr int64_t kMaxNumel = 262144;

// ---- counters ---------------------------------------------------------------

enum Op : int {
  kConnect,
  kJoin,
  kLeave,
  kClose,
  kPull,
  kPushDelta,
  kPushParams,
  kPushGrad,
  kHeartbeat,
  kReport,
  kReports,
  kStats,
  kList,
  kPullAll,
  kSetOptimizer,
  kConfigure,
  kRegister,
  kZombiePush,
  kZombieJoin,
  kZombiePull,
  kZombieHeartbeat,
  kZombieReport,
  kZombieLeave,
  kBadPullName,
  kBadPushShape,
  kBadPushWindow,
  kBadPushRate,
  kBadRegister,
  kWrongSecret,
  kRawGarbage,
  kRawTruncated,
  kRawEmpty,
  kRawMidPush,
  kRawBadChecksum,
  kRawBadOpcode,
  kRawTooLarge,
  kDrain,
  kNumOps,
};

constexpr std::array<const char*, kNumOps> kOpNames = {
    "connect",
    "join",
    "leave",
    "close",
    "pull",
    "push_delta",
    "push_params",
    "push_grad",
    "heartbeat",
    "report",
    "reports",
    "stats",
    "list",
    "pull_all",
    "set_optimizer",
    "configure",
    "register",
    "zombie_push",
    "zombie_join",
    "zombie_pull",
    "zombie_heartbeat",
    "zombie_report",
    "zombie_leave",
    "bad_pull_name",
    "bad_push_shape",
    "bad_push_window",
    "bad_push_rate",
    "bad_register",
    "wrong_secret",
    "raw_garbage",
    "raw_truncated",
    "raw_empty",
    "raw_mid_push",
    "raw_bad_checksum",
    "raw_bad_opcode",
    "raw_too_large",
    "drain",
};

enum SessionEnd : int { kEndLeave, kEndKilled, kEndZombie, kEndRejoin, kEndStall, kNumEnds };
constexpr std::array<const char*, kNumEnds> kEndNames = {"leave", "killed", "zombie", "rejoin",
                                                         "stall"};

struct Counters {
  std::array<std::atomic<uint64_t>, kNumOps> ok{};
  std::array<std::atomic<uint64_t>, kNumOps> expected{};
  std::array<std::atomic<uint64_t>, kNumOps> unexpected{};
  std::array<std::atomic<uint64_t>, kNumEnds> sessions{};
  std::atomic<uint64_t> floats_pushed{0};
  std::atomic<uint64_t> floats_pulled{0};

  std::mutex mu;
  std::vector<std::string> samples;                // first unexpected errors
  std::map<std::string, uint64_t> expected_codes;  // "op: Code" -> count
};

Counters g_counters;
constexpr size_t kMaxSamples = 30;
// A run this broken (e.g. the server died) stops early.
constexpr uint64_t kMaxUnexpected = 2000;
std::atomic<bool> g_abort{false};

uint64_t Total(const std::array<std::atomic<uint64_t>, kNumOps>& a) {
  uint64_t n = 0;
  for (const auto& x : a) n += x.load(std::memory_order_relaxed);
  return n;
}

void Unexpected(Op op, const std::string& what) {
  const uint64_t n = g_counters.unexpected[op].fetch_add(1, std::memory_order_relaxed) + 1;
  {
    std::lock_guard lock(g_counters.mu);
    if (g_counters.samples.size() < kMaxSamples) {
      g_counters.samples.push_back(std::string(kOpNames[op]) + ": " + what);
      std::fprintf(stderr, "ps_soak: unexpected: %s: %s\n", kOpNames[op], what.c_str());
    }
  }
  if (n >= kMaxUnexpected || Total(g_counters.unexpected) >= kMaxUnexpected) g_abort.store(true);
}

// A request that must succeed. Returns s.ok().
bool Ok(Op op, const Status& s) {
  if (s.ok()) {
    g_counters.ok[op].fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  Unexpected(op, s.ToString());
  return false;
}

// A request the server must refuse with `code`. Returns true when it did.
bool Refused(Op op, const Status& s, StatusCode code) {
  if (!s.ok() && s.code() == code) {
    g_counters.expected[op].fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(g_counters.mu);
    ++g_counters
          .expected_codes[std::string(kOpNames[op]) + ": " + tensorspark::StatusCodeName(code)];
    return true;
  }
  Unexpected(op, s.ok() ? std::string("succeeded, but the server must refuse it with ") +
                              tensorspark::StatusCodeName(code)
                        : s.ToString() + " (expected " + tensorspark::StatusCodeName(code) + ")");
  return false;
}

// ---- helpers ----------------------------------------------------------------

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Clock::time_point g_start;
Clock::time_point g_end;

bool TimeUp() { return g_abort.load(std::memory_order_relaxed) || Clock::now() >= g_end; }

// Sleeps up to `s` seconds, less if the run ends first.
void SleepFor(double s) {
  const auto until = std::min(g_end, Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                        std::chrono::duration<double>(s)));
  while (!g_abort.load() && Clock::now() < until) {
    std::this_thread::sleep_for(
        std::min<Clock::duration>(until - Clock::now(), std::chrono::milliseconds(100)));
  }
}

using Rng = std::mt19937_64;
double Uniform(Rng& rng) { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
int64_t Between(Rng& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// Small random values shared read-only by every thread: pushes send a
// window of it (deltas and gradients near zero keep the model bounded).
std::vector<float> g_noise;
std::span<const float> Noise(Rng& rng, int64_t n) {
  const int64_t off = Between(rng, 0, static_cast<int64_t>(g_noise.size()) - n);
  return {g_noise.data() + off, static_cast<size_t>(n)};
}

// A fake Python stack dump, long enough for any REPORT (80 KiB, so some are
// over the 64 KiB limit and cut by the client).
std::string g_dump_text;
void MakeDumpText() {
  int line = 1;
  while (g_dump_text.size() < 80 * 1024) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "Thread 0x00007f%06x (most recent call first):\n"
                  "  File \"/opt/spark/python/tensorspark/keras.py\", line %d in _train_step\n"
                  "  File \"/usr/lib/python3/site-packages/tensorflow/eager.py\", line %d in "
                  "__call__\n",
                  line * 7919 % 0xffffff, line % 900 + 12, line % 1500 + 40);
    g_dump_text += buf;
    ++line;
  }
}

std::string DumpSlice(Rng& rng) {
  return g_dump_text.substr(
      0, static_cast<size_t>(Between(rng, 100, static_cast<int64_t>(g_dump_text.size()))));
}

tensorspark::ClientOptions BaseOptions(const Config& cfg) {
  tensorspark::ClientOptions o;
  o.host = cfg.host;
  o.port = cfg.port;
  o.secret = cfg.secret;
  o.connect_timeout_s = 30;
  o.io_timeout_s = 60;
  o.member_wait_s = 60;
  return o;
}

// ---- hand-made frames ---------------------------------------------------------

// A protocol connection written by hand, for frames the client never sends.
class RawPeer {
 public:
  Status Connect(const Config& cfg) {
    return tensorspark::net::ConnectWithTimeout(cfg.host, cfg.port,
                                                tensorspark::net::Deadline::In(10), &sock_);
  }

  // Sends a frame; `len` and `crc` override the header's fields, and only
  // the first `send` bytes of the payload go out (all by default).
  Status Send(uint16_t opcode, uint64_t id, std::span<const uint8_t> payload,
              std::optional<uint64_t> len = std::nullopt,
              std::optional<uint32_t> crc = std::nullopt, size_t send = SIZE_MAX) {
    tensorspark::protocol::FrameHeader h;
    h.opcode = opcode;
    h.request_id = id;
    h.payload_len = len.value_or(payload.size());
    h.checksum = crc.value_or(tensorspark::protocol::Crc32c(payload.data(), payload.size()));
    std::vector<uint8_t> bytes(tensorspark::protocol::kHeaderSize);
    tensorspark::protocol::EncodeHeader(h, bytes.data());
    bytes.insert(bytes.end(), payload.begin(),
                 payload.begin() + static_cast<ptrdiff_t>(std::min(send, payload.size())));
    return tensorspark::net::WriteFull(sock_.fd(), bytes.data(), bytes.size(),
                                       tensorspark::net::Deadline::In(30));
  }

  // Reads one frame; an error frame becomes its status.
  Status Read(std::vector<uint8_t>* payload) {
    const auto deadline = tensorspark::net::Deadline::In(60);
    uint8_t raw[tensorspark::protocol::kHeaderSize];
    TS_RETURN_IF_ERROR(tensorspark::net::ReadFull(sock_.fd(), raw, sizeof(raw), deadline));
    const tensorspark::protocol::FrameHeader h = tensorspark::protocol::DecodeHeader(raw);
    if (h.magic != tensorspark::protocol::kMagic || h.payload_len > (1u << 20)) {
      return Status(StatusCode::kInternal, "the server sent a malformed frame");
    }
    payload->resize(h.payload_len);
    TS_RETURN_IF_ERROR(
        tensorspark::net::ReadFull(sock_.fd(), payload->data(), payload->size(), deadline));
    if ((h.flags & tensorspark::protocol::kFlagError) != 0) {
      Status remote;
      TS_RETURN_IF_ERROR(tensorspark::protocol::DecodeError(*payload, &remote));
      return remote.ok() ? Status(StatusCode::kInternal, "error frame with status OK") : remote;
    }
    return Status::OK();
  }

  // True when the server closes the connection within 30 s.
  bool Closed() {
    uint8_t b;
    Status s = tensorspark::net::ReadFull(sock_.fd(), &b, 1, tensorspark::net::Deadline::In(30));
    return !s.ok() && s.code() == StatusCode::kConnectionError;
  }

  Status Handshake(const std::string& secret) {
    using namespace tensorspark::protocol;
    HelloRequest hello;
    TS_RETURN_IF_ERROR(RandomNonce(&hello.client_nonce));
    hello.client_name = "ps_soak-raw";  // partition -1: a tool
    std::vector<uint8_t> p, resp;
    EncodeHello(hello, &p);
    TS_RETURN_IF_ERROR(Send(static_cast<uint16_t>(Opcode::kHello), 1, p));
    TS_RETURN_IF_ERROR(Read(&resp));
    Nonce server_nonce;
    TS_RETURN_IF_ERROR(DecodeNonce(resp, &server_nonce));
    const Digest proof =
        ClientProof(secret, server_nonce, hello.client_nonce, hello.partition_id, hello.attempt);
    TS_RETURN_IF_ERROR(Send(static_cast<uint16_t>(Opcode::kAuth), 2, proof));
    return Read(&resp);
  }

 private:
  tensorspark::net::Socket sock_;
};

// ---- the worker threads -----------------------------------------------------

struct Worker {
  const Config& cfg;
  int index;
  std::string dump_path;
  Rng rng;
  int32_t next_attempt = 0;
  uint64_t steps = 0;
  // Per-variable pull buffers.
  std::vector<std::vector<float>> bufs;
  // An old attempt left open and joined (SessionEnd kEndZombie).
  std::unique_ptr<tensorspark::Client> zombie;

  Worker(const Config& c, int i, std::string dump)
      : cfg(c), index(i), dump_path(std::move(dump)), rng(c.seed * 1000003 + i) {
    for (const VarDef& v : Vars()) bufs.emplace_back(static_cast<size_t>(v.numel));
  }

  void Run() {
    while (!TimeUp()) {
      const double r = Uniform(rng);
      if (r < 0.01) {
        WrongSecret();
      } else if (r < 0.02) {
        RawConnection();
      } else if (r < 0.03) {
        RawFrames();
      }
      Session();
    }
    if (zombie) CloseClient(zombie.get());
    zombie.reset();
  }

  void CloseClient(tensorspark::Client* c) {
    c->Close();
    g_counters.ok[kClose].fetch_add(1, std::memory_order_relaxed);
  }

  void WrongSecret() {
    tensorspark::ClientOptions o = BaseOptions(cfg);
    o.secret = "not-the-secret-of-this-run-" + std::to_string(index);
    o.partition_id = index;
    o.attempt = next_attempt;  // never fences anything: it cannot authenticate
    std::unique_ptr<tensorspark::Client> c;
    (void)Refused(kWrongSecret, tensorspark::Client::Connect(o, &c), StatusCode::kAuthFailed);
  }

  // A raw TCP connection that sends garbage, half a HELLO, or nothing.
  void RawConnection() {
    tensorspark::net::Socket s;
    Status st = tensorspark::net::ConnectWithTimeout(cfg.host, cfg.port,
                                                     tensorspark::net::Deadline::In(10), &s);
    const int kind = static_cast<int>(Between(rng, 0, 2));
    const Op op = kind == 0 ? kRawGarbage : kind == 1 ? kRawTruncated : kRawEmpty;
    if (!st.ok()) {
      Unexpected(op, "connect: " + st.ToString());
      return;
    }
    std::vector<uint8_t> bytes;
    if (kind == 0) {
      bytes.resize(static_cast<size_t>(Between(rng, 1, 300)));
      for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
    } else if (kind == 1) {
      tensorspark::protocol::HelloRequest hello;
      hello.partition_id = index;
      hello.client_name = "ps_soak-truncated";
      std::vector<uint8_t> payload;
      tensorspark::protocol::EncodeHello(hello, &payload);
      tensorspark::protocol::FrameHeader h;
      h.opcode = static_cast<uint16_t>(tensorspark::protocol::Opcode::kHello);
      h.request_id = 1;
      h.payload_len = payload.size();
      bytes.resize(tensorspark::protocol::kHeaderSize);
      tensorspark::protocol::EncodeHeader(h, bytes.data());
      // Header plus part of the payload, then hang up.
      const size_t part =
          static_cast<size_t>(Between(rng, 0, static_cast<int64_t>(payload.size()) - 1));
      bytes.insert(bytes.end(), payload.begin(), payload.begin() + static_cast<ptrdiff_t>(part));
    }
    if (!bytes.empty()) {
      st = tensorspark::net::WriteFull(s.fd(), bytes.data(), bytes.size(),
                                       tensorspark::net::Deadline::In(10));
      // The server may already have hung up on garbage; that is its right.
      if (!st.ok() && st.code() != StatusCode::kConnectionError) {
        Unexpected(op, "send: " + st.ToString());
        return;
      }
    }
    g_counters.ok[op].fetch_add(1, std::memory_order_relaxed);
  }

  // An authenticated connection that sends what the client never does: a
  // PUSH cut off halfway by a hang-up (a task killed mid-push), a bad
  // checksum or an oversized frame (answered, then closed), an unknown
  // opcode (answered; the connection keeps serving).
  void RawFrames() {
    RawPeer peer;
    const int kind = static_cast<int>(Between(rng, 0, 3));
    const Op op = kind == 0   ? kRawMidPush
                  : kind == 1 ? kRawBadChecksum
                  : kind == 2 ? kRawBadOpcode
                              : kRawTooLarge;
    Status s = peer.Connect(cfg);
    if (s.ok()) s = peer.Handshake(cfg.secret);
    if (!s.ok()) {
      Unexpected(op, "handshake: " + s.ToString());
      return;
    }
    using tensorspark::protocol::Opcode;
    std::vector<uint8_t> resp;
    const uint16_t stats = static_cast<uint16_t>(Opcode::kStats);
    switch (kind) {
      case 0: {
        // A 1 MiB push announced, part of it sent, then the peer is gone.
        const auto& v = Vars()[3];
        std::vector<uint8_t> head;
        tensorspark::protocol::EncodePushHead(
            {static_cast<uint8_t>(tensorspark::UpdateKind::kDelta), 1, 0.0f}, &head);
        tensorspark::protocol::Writer w(&head);
        w.U32(1);
        w.Meta(v.name, v.shape);
        std::vector<uint8_t> payload(head);
        payload.resize(head.size() + static_cast<size_t>(v.numel) * sizeof(float));
        const size_t part =
            static_cast<size_t>(Between(rng, 0, static_cast<int64_t>(payload.size()) - 1));
        s = peer.Send(static_cast<uint16_t>(Opcode::kPush), 3, payload, std::nullopt, std::nullopt,
                      part);
        if (s.ok() || s.code() == StatusCode::kConnectionError) {
          g_counters.ok[op].fetch_add(1, std::memory_order_relaxed);
        } else {
          Unexpected(op, "send: " + s.ToString());
        }
        return;
      }
      case 1:
        s = peer.Send(stats, 3, {}, std::nullopt, 0x12345678u);
        break;
      case 2:
        s = peer.Send(99, 3, {});
        break;
      default:
        s = peer.Send(stats, 3, {}, uint64_t{1} << 40);
        break;
    }
    if (!s.ok()) {
      Unexpected(op, "send: " + s.ToString());
      return;
    }
    const StatusCode want = kind == 3 ? StatusCode::kFrameTooLarge : StatusCode::kProtocolError;
    if (!Refused(op, peer.Read(&resp), want)) return;
    if (kind == 2) {
      // Still serving: STATS on the same connection works.
      s = peer.Send(stats, 4, {});
      if (s.ok()) s = peer.Read(&resp);
      if (!s.ok()) Unexpected(op, "STATS after the unknown opcode: " + s.ToString());
    } else if (!peer.Closed()) {
      Unexpected(op, "the server kept the connection open after the refused frame");
    }
  }

  void WriteDumpFile() {
    std::ofstream f(dump_path, std::ios::binary | std::ios::trunc);
    f << DumpSlice(rng);
  }

  // Pull + push of a random subset of the variables, plus the extras.
  // Returns false when the client is unusable.
  bool Step(tensorspark::Client* c) {
    const auto& vars = Vars();
    std::vector<int> pick;
    for (int i = 0; i < static_cast<int>(vars.size()); ++i) {
      if (Uniform(rng) < 0.45) pick.push_back(i);
    }
    if (pick.empty()) pick.push_back(static_cast<int>(Between(rng, 0, 3)));
    std::vector<tensorspark::MutableTensorView> mviews;
    uint64_t n = 0;
    for (int i : pick) {
      mviews.push_back({vars[i].name, bufs[i]});
      n += static_cast<uint64_t>(vars[i].numel);
    }
    uint64_t version = 0;
    if (!Ok(kPull, c->Pull(mviews, &version))) return c->connected();
    g_counters.floats_pulled.fetch_add(n, std::memory_order_relaxed);

    const double k = Uniform(rng);
    std::vector<tensorspark::TensorView> views;
    tensorspark::PushOptions po;
    tensorspark::UpdateKind kind;
    Op op;
    if (k < 0.5) {
      kind = tensorspark::UpdateKind::kDelta;
      op = kPushDelta;
      for (int i : pick) views.push_back({vars[i].name, vars[i].shape, Noise(rng, vars[i].numel)});
    } else if (k < 0.75) {
      kind = tensorspark::UpdateKind::kParameters;
      op = kPushParams;
      po.mean_window = 32;  // w moves 1/32 towards what was pulled
      for (int i : pick) views.push_back({vars[i].name, vars[i].shape, bufs[i]});
    } else {
      kind = tensorspark::UpdateKind::kGradient;
      op = kPushGrad;
      // The optimizer variable uses its configured rate; the others need one.
      const bool only_opt = pick.size() == 1 && pick[0] == kOptVar;
      po.learning_rate = only_opt && Uniform(rng) < 0.5 ? 0.0f : 1e-3f;
      for (int i : pick) views.push_back({vars[i].name, vars[i].shape, Noise(rng, vars[i].numel)});
    }
    if (!Ok(op, c->Push(kind, views, po, &version))) return c->connected();
    g_counters.floats_pushed.fetch_add(n, std::memory_order_relaxed);

    ++steps;
    c->ReportProgress(steps, steps * 32, 1.0 / static_cast<double>(1 + steps % 1000));
    const double e = Uniform(rng);
    Status s;
    if (e < 0.30) {
      if (!Ok(kHeartbeat, c->Heartbeat())) return c->connected();
    } else if (e < 0.45) {
      if (!Ok(kReport, c->Report(DumpSlice(rng)))) return c->connected();
    } else if (e < 0.50) {
      std::vector<tensorspark::StatEntry> stats;
      if (!Ok(kStats, c->Stats(&stats))) return c->connected();
    } else if (e < 0.55) {
      std::vector<tensorspark::WorkerReport> reports;
      if (!Ok(kReports, c->Reports(&reports))) return c->connected();
    } else if (e < 0.58) {
      std::vector<tensorspark::VariableInfo> infos;
      if (!Ok(kList, c->ListVariables(&infos, &version))) return c->connected();
    } else if (e < 0.60) {
      std::vector<tensorspark::Tensor> all;
      if (!Ok(kPullAll, c->PullAll(&all, &version))) return c->connected();
    } else if (e < 0.64) {
      BadRequest(c);
    }
    return c->connected();
  }

  // A request the server must refuse; the connection must stay usable.
  void BadRequest(tensorspark::Client* c) {
    const auto& v = Vars()[0];  // soak/v1k, [1024]
    const int64_t wrong[2] = {2, 512};
    uint64_t version = 0;
    switch (Between(rng, 0, 4)) {
      case 0: {
        tensorspark::MutableTensorView mv{"soak/no-such-variable", bufs[0]};
        (void)Refused(kBadPullName, c->Pull({&mv, 1}, &version), StatusCode::kNotFound);
        break;
      }
      case 1: {
        tensorspark::TensorView tv{v.name, wrong, Noise(rng, v.numel)};
        (void)Refused(kBadPushShape,
                      c->Push(tensorspark::UpdateKind::kDelta, {&tv, 1}, {}, &version),
                      StatusCode::kShapeMismatch);
        break;
      }
      case 2: {
        tensorspark::TensorView tv{v.name, v.shape, bufs[0]};
        tensorspark::PushOptions po;
        po.mean_window = 0;
        (void)Refused(kBadPushWindow,
                      c->Push(tensorspark::UpdateKind::kParameters, {&tv, 1}, po, &version),
                      StatusCode::kInvalidArgument);
        break;
      }
      case 3: {
        tensorspark::TensorView tv{v.name, v.shape, Noise(rng, v.numel)};
        // soak/v1k has no optimizer: a gradient needs a rate.
        (void)Refused(kBadPushRate,
                      c->Push(tensorspark::UpdateKind::kGradient, {&tv, 1}, {}, &version),
                      StatusCode::kInvalidArgument);
        break;
      }
      default: {
        tensorspark::VariableSpec spec{v.name, wrong, bufs[0]};
        (void)Refused(kBadRegister, c->Register({&spec, 1}, nullptr, &version),
                      StatusCode::kShapeMismatch);
        break;
      }
    }
  }

  void Think() {
    if (cfg.think_ms > 0) SleepFor(Uniform(rng) * 2 * cfg.think_ms / 1000);
  }

  // The old attempt was replaced by a newer one's JOIN: writes are refused,
  // reads are served.
  void CheckZombie() {
    tensorspark::Client* z = zombie.get();
    const auto& v = Vars()[0];
    uint64_t version = 0;
    tensorspark::TensorView tv{v.name, v.shape, Noise(rng, v.numel)};
    (void)Refused(kZombiePush, z->Push(tensorspark::UpdateKind::kDelta, {&tv, 1}, {}, &version),
                  StatusCode::kFenced);
    (void)Refused(kZombieJoin, z->Join(nullptr), StatusCode::kFenced);
    tensorspark::MutableTensorView mv{v.name, bufs[0]};
    (void)Ok(kZombiePull, z->Pull({&mv, 1}, &version));
    (void)Ok(kZombieHeartbeat, z->Heartbeat());
    (void)Ok(kZombieReport, z->Report(DumpSlice(rng)));
    if (Uniform(rng) < 0.5) (void)Ok(kZombieLeave, z->Leave());
    CloseClient(z);
    zombie.reset();
  }

  // One task attempt of this thread's partition.
  void Session() {
    tensorspark::ClientOptions o = BaseOptions(cfg);
    o.partition_id = index;
    o.attempt = next_attempt++;
    const double enc = Uniform(rng);
    o.encoding = enc < 0.6   ? tensorspark::WireEncoding::kFloat32
                 : enc < 0.8 ? tensorspark::WireEncoding::kFloat16
                             : tensorspark::WireEncoding::kBFloat16;
    const bool beats = Uniform(rng) < 0.3;
    if (beats) o.heartbeat_interval_s = 0.25;
    std::unique_ptr<tensorspark::Client> c;
    if (!Ok(kConnect, tensorspark::Client::Connect(o, &c))) {
      SleepFor(0.2);
      return;
    }
    if (beats && Uniform(rng) < 0.5) {
      WriteDumpFile();
      c->SetDumpFile(dump_path);
    }
    if (!Ok(kJoin, c->Join(nullptr))) {
      CloseClient(c.get());
      SleepFor(0.2);
      return;
    }
    if (zombie) CheckZombie();

    const int64_t n_steps = Between(rng, 4, 40);
    bool usable = true;
    for (int64_t i = 0; i < n_steps && usable && !TimeUp(); ++i) {
      usable = Step(c.get());
      if (beats && i % 10 == 9 && Uniform(rng) < 0.5) WriteDumpFile();
      Think();
    }
    if (!usable) {
      CloseClient(c.get());
      SleepFor(0.2);
      return;
    }
    const double r = Uniform(rng);
    SessionEnd end = r < 0.62   ? kEndLeave
                     : r < 0.77 ? kEndKilled
                     : r < 0.89 ? kEndZombie
                     : r < 0.97 ? kEndRejoin
                                : kEndStall;
    if (end == kEndZombie && (zombie || TimeUp())) end = kEndLeave;
    g_counters.sessions[end].fetch_add(1, std::memory_order_relaxed);
    switch (end) {
      case kEndLeave:
        (void)Ok(kLeave, c->Leave());
        CloseClient(c.get());
        break;
      case kEndKilled:
        CloseClient(c.get());
        break;
      case kEndZombie:
        zombie = std::move(c);
        break;
      case kEndRejoin: {
        std::unique_ptr<tensorspark::Client> c2;
        if (!Ok(kConnect, tensorspark::Client::Connect(o, &c2))) {
          CloseClient(c.get());
          break;
        }
        // The same identity joins again while live: the member is kept and
        // the new connection becomes its joining one, so closing the first
        // one without LEAVE does not drop it.
        if (!Ok(kJoin, c2->Join(nullptr))) {
          CloseClient(c.get());
          CloseClient(c2.get());
          break;
        }
        CloseClient(c.get());
        for (int i = 0; i < 3 && usable && !TimeUp(); ++i) usable = Step(c2.get());
        if (usable) (void)Ok(kLeave, c2->Leave());
        CloseClient(c2.get());
        break;
      }
      case kEndStall: {
        // Silent past the heartbeat timeout: the server drops the member
        // (unless the heartbeat thread keeps it live); reads still work and
        // LEAVE is a no-op.
        SleepFor(cfg.heartbeat_timeout_s + 0.7);
        const auto& v = Vars()[0];
        tensorspark::MutableTensorView mv{v.name, bufs[0]};
        uint64_t version = 0;
        (void)Ok(kPull, c->Pull({&mv, 1}, &version));
        (void)Ok(kLeave, c->Leave());
        CloseClient(c.get());
        break;
      }
      default:
        break;
    }
  }
};

// ---- the driver ---------------------------------------------------------------

std::unique_ptr<tensorspark::Client> ConnectDriver(const Config& cfg) {
  tensorspark::ClientOptions o = BaseOptions(cfg);
  std::unique_ptr<tensorspark::Client> c;
  Status s = tensorspark::Client::Connect(o, &c);
  if (!s.ok())
    Die("driver: connect to " + cfg.host + ":" + std::to_string(cfg.port) + ": " + s.ToString());
  return c;
}

tensorspark::RunConfig SoakRunConfig(const Config& cfg) {
  tensorspark::RunConfig run;
  run.mode = tensorspark::ConsistencyMode::kAsync;
  run.heartbeat_timeout_s = static_cast<float>(cfg.heartbeat_timeout_s);
  run.wait_timeout_s = 60;
  return run;
}

tensorspark::OptimizerConfig OptConfig(bool adam, float lr) {
  tensorspark::OptimizerConfig oc;
  oc.kind = adam ? tensorspark::OptimizerKind::kAdam : tensorspark::OptimizerKind::kMomentum;
  oc.learning_rate = lr;
  return oc;
}

// Registers the model (a later run finds it there), sets the optimizer and
// starts a fresh async run; retries CONFIGURE while members of an earlier
// run are still live (up to 30 s).
void Setup(tensorspark::Client* d, const Config& cfg) {
  std::vector<std::vector<float>> init;
  std::vector<tensorspark::VariableSpec> specs;
  for (const VarDef& v : Vars()) {
    init.emplace_back(static_cast<size_t>(v.numel));
    for (size_t j = 0; j < init.back().size(); ++j) {
      init.back()[j] = 0.01f * static_cast<float>(j % 17) - 0.08f;
    }
  }
  for (size_t i = 0; i < Vars().size(); ++i) {
    specs.push_back({Vars()[i].name, Vars()[i].shape, init[i]});
  }
  std::vector<bool> created;
  uint64_t version = 0;
  Status s = d->Register(specs, &created, &version);
  if (!s.ok()) Die("driver: register: " + s.ToString());
  g_counters.ok[kRegister].fetch_add(1, std::memory_order_relaxed);
  std::string_view opt_name[] = {Vars()[kOptVar].name};
  s = d->SetOptimizer(OptConfig(true, 1e-3f), opt_name, nullptr);
  if (!s.ok()) Die("driver: set optimizer: " + s.ToString());
  g_counters.ok[kSetOptimizer].fetch_add(1, std::memory_order_relaxed);
  const auto give_up = Clock::now() + std::chrono::seconds(30);
  for (;;) {
    s = d->Configure(SoakRunConfig(cfg));
    if (s.ok()) break;
    if (s.code() != StatusCode::kInvalidArgument || Clock::now() > give_up) {
      Die("driver: configure: " + s.ToString());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  g_counters.ok[kConfigure].fetch_add(1, std::memory_order_relaxed);
}

// Polls and pokes the server while the workers run.
void DriverLoop(tensorspark::Client* d, const Config& cfg) {
  int tick = 0;
  bool adam = true;
  auto last_print = Clock::now();
  while (!TimeUp()) {
    SleepFor(1.0);
    if (TimeUp()) break;
    ++tick;
    std::vector<tensorspark::StatEntry> stats;
    (void)Ok(kStats, d->Stats(&stats));
    std::vector<tensorspark::WorkerReport> reports;
    (void)Ok(kReports, d->Reports(&reports));
    std::string_view opt_name[] = {Vars()[kOptVar].name};
    if (tick % 5 == 0) {
      // A new rate keeps the slots; a new kind (every 15 s) resets them.
      if (tick % 15 == 0) adam = !adam;
      (void)Ok(kSetOptimizer,
               d->SetOptimizer(OptConfig(adam, tick % 10 == 0 ? 1e-3f : 5e-4f), opt_name, nullptr));
    }
    if (tick % 7 == 0) {
      // Refused while workers are live; when none is, it starts a new run.
      Status s = d->Configure(SoakRunConfig(cfg));
      if (s.ok()) {
        (void)Ok(kConfigure, s);
      } else {
        (void)Refused(kConfigure, s, StatusCode::kInvalidArgument);
      }
    }
    if (!d->connected()) {
      Unexpected(kStats, "driver connection broken; reconnecting");
      return;
    }
    if (Clock::now() - last_print >= std::chrono::seconds(10)) {
      last_print = Clock::now();
      const double t = Seconds(last_print - g_start);
      const uint64_t ops = Total(g_counters.ok) + Total(g_counters.expected);
      std::fprintf(stderr, "ps_soak: %5.0f s  %llu ops (%.0f/s), %llu unexpected errors\n", t,
                   static_cast<unsigned long long>(ops), ops / std::max(t, 1e-9),
                   static_cast<unsigned long long>(Total(g_counters.unexpected)));
    }
  }
}

// After every client closed: the server must come back to this single
// connection and no live member.
std::vector<tensorspark::StatEntry> Drain(tensorspark::Client* d, bool* drained, double* drain_s) {
  const auto t0 = Clock::now();
  const auto give_up = t0 + std::chrono::seconds(10);
  std::vector<tensorspark::StatEntry> stats;
  *drained = false;
  uint64_t conns = 0, members = 0;
  for (;;) {
    Status s = d->Stats(&stats);
    if (!s.ok()) {
      Unexpected(kDrain, "stats: " + s.ToString());
      return stats;
    }
    conns = members = UINT64_MAX;
    for (const auto& [k, v] : stats) {
      if (k == "connections") conns = v;
      if (k == "members") members = v;
    }
    if (conns == 1 && members == 0) {
      *drained = true;
      break;
    }
    if (Clock::now() > give_up) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  *drain_s = Seconds(Clock::now() - t0);
  if (*drained) {
    g_counters.ok[kDrain].fetch_add(1, std::memory_order_relaxed);
  } else {
    Unexpected(kDrain, "10 s after every client closed the server still counts " +
                           std::to_string(conns) + " connections (expected 1) and " +
                           std::to_string(members) + " live members (expected 0)");
  }
  return stats;
}

// ---- output -------------------------------------------------------------------

std::string CountMap(const std::array<std::atomic<uint64_t>, kNumOps>& a, bool skip_zero) {
  std::string j = "{";
  bool first = true;
  for (int i = 0; i < kNumOps; ++i) {
    const uint64_t n = a[i].load();
    if (skip_zero && n == 0) continue;
    j += std::string(first ? "" : ", ") + "\"" + kOpNames[i] + "\": " + std::to_string(n);
    first = false;
  }
  return j + "}";
}

void WriteJson(const Config& cfg, double elapsed, bool drained, double drain_s,
               const std::vector<tensorspark::StatEntry>& stats, const std::string& path) {
  const Counters& c = g_counters;
  std::string j = "{\n";
  j += "  \"threads\": " + std::to_string(cfg.threads) + ",\n";
  j += "  \"seconds\": " + Num(cfg.seconds) + ",\n";
  j += "  \"elapsed_s\": " + Num(elapsed) + ",\n";
  j += "  \"seed\": " + std::to_string(cfg.seed) + ",\n";
  j += "  \"heartbeat_timeout_s\": " + Num(cfg.heartbeat_timeout_s) + ",\n";
  j += "  \"think_ms\": " + Num(cfg.think_ms) + ",\n";
  j += "  \"variables\": {";
  for (size_t i = 0; i < Vars().size(); ++i) {
    j += std::string(i ? ", " : "") + "\"" + Vars()[i].name +
         "\": " + std::to_string(Vars()[i].numel);
  }
  j += "},\n";
  // Every answered request: succeeded, or refused as it had to be.
  std::array<std::atomic<uint64_t>, kNumOps> all{};
  for (int i = 0; i < kNumOps; ++i) all[i] = c.ok[i].load() + c.expected[i].load();
  const uint64_t ops = Total(all);
  j += "  \"ops\": " + CountMap(all, false) + ",\n";
  j += "  \"ops_total\": " + std::to_string(ops) + ",\n";
  j += "  \"ops_per_s\": " + Num(ops / std::max(elapsed, 1e-9)) + ",\n";
  j += "  \"rates\": {";
  for (int i = 0; i < kNumOps; ++i) {
    j += std::string(i ? ", " : "") + "\"" + kOpNames[i] +
         "\": " + Num(all[i].load() / std::max(elapsed, 1e-9));
  }
  j += "},\n";
  j += "  \"floats_pushed\": " + std::to_string(c.floats_pushed.load()) + ",\n";
  j += "  \"floats_pulled\": " + std::to_string(c.floats_pulled.load()) + ",\n";
  j += "  \"sessions\": {";
  for (int i = 0; i < kNumEnds; ++i) {
    j += std::string(i ? ", " : "") + "\"" + kEndNames[i] +
         "\": " + std::to_string(c.sessions[i].load());
  }
  j += "},\n";
  j += "  \"expected_errors\": " + CountMap(c.expected, true) + ",\n";
  j += "  \"expected_error_codes\": {";
  {
    bool first = true;
    for (const auto& [k, v] : c.expected_codes) {
      j += std::string(first ? "" : ", ") + "\"" + JsonEscape(k) + "\": " + std::to_string(v);
      first = false;
    }
  }
  j += "},\n";
  j += "  \"unexpected_errors\": " + CountMap(c.unexpected, true) + ",\n";
  j += "  \"unexpected_total\": " + std::to_string(Total(c.unexpected)) + ",\n";
  j += "  \"error_samples\": [";
  for (size_t i = 0; i < c.samples.size(); ++i) {
    j += std::string(i ? ", " : "") + "\"" + JsonEscape(c.samples[i]) + "\"";
  }
  j += "],\n";
  j += "  \"drained\": " + std::string(drained ? "true" : "false") + ",\n";
  j += "  \"drain_s\": " + Num(drain_s) + ",\n";
  // Per-member keys (worker_*{...}) are left out: none is live by now.
  j += "  \"server_stats\": {";
  {
    bool first = true;
    for (const auto& [k, v] : stats) {
      if (k.starts_with("worker_")) continue;
      j += std::string(first ? "" : ", ") + "\"" + JsonEscape(k) + "\": " + std::to_string(v);
      first = false;
    }
  }
  j += "},\n";
  j += "  \"timestamp\": \"" + UtcTimestamp() + "\",\n";
  j += "  \"passed\": " + std::string(Total(c.unexpected) == 0 ? "true" : "false") + "\n}\n";

  std::filesystem::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) Die("cannot open " + path + ": " + std::strerror(errno));
  bool ok = std::fwrite(j.data(), 1, j.size(), f) == j.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) Die("write " + path + " failed");
}

constexpr char kUsage[] =
    "usage: ps_soak --port N --secret-file PATH [--host ADDR] [--threads 32] [--seconds 600]\n"
    "               [--out PATH] [--seed N] [--heartbeat-timeout-s 2] [--think-ms 2]\n";

int BadArgs(const std::string& msg) {
  std::fprintf(stderr, "ps_soak: %s\n%s", msg.c_str(), kUsage);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  std::string secret_file;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string v;
    if (auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (a != "--help" && a != "-h") {
      if (i + 1 >= argc) return BadArgs(a + " needs a value");
      v = argv[++i];
    }
    double d = 0;
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--host") {
      cfg.host = v;
    } else if (a == "--port") {
      if (!ParseDouble(v, 1, 65535, &d) || d != std::floor(d)) return BadArgs("bad --port");
      cfg.port = static_cast<uint16_t>(d);
    } else if (a == "--secret-file") {
      secret_file = v;
    } else if (a == "--threads") {
      if (!ParseDouble(v, 1, 512, &d) || d != std::floor(d)) return BadArgs("bad --threads");
      cfg.threads = static_cast<int>(d);
    } else if (a == "--seconds") {
      if (!ParseDouble(v, 1, 7 * 86400, &cfg.seconds)) return BadArgs("bad --seconds");
    } else if (a == "--out") {
      cfg.out = v;
    } else if (a == "--seed") {
      if (!ParseDouble(v, 0, 1e15, &d) || d != std::floor(d)) return BadArgs("bad --seed");
      cfg.seed = static_cast<uint64_t>(d);
    } else if (a == "--heartbeat-timeout-s") {
      if (!ParseDouble(v, 0.5, 3600, &cfg.heartbeat_timeout_s)) {
        return BadArgs("bad --heartbeat-timeout-s");
      }
    } else if (a == "--think-ms") {
      if (!ParseDouble(v, 0, 10000, &cfg.think_ms)) return BadArgs("bad --think-ms");
    } else {
      return BadArgs("unknown argument '" + a + "'");
    }
  }
  if (cfg.port == 0) return BadArgs("--port is required");
  if (secret_file.empty()) return BadArgs("--secret-file is required");
  {
    std::ifstream in(secret_file, std::ios::binary);
    if (!in) return BadArgs("cannot read the secret file '" + secret_file + "'");
    cfg.secret.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    // As tensorspark-ps reads it: one trailing newline is not part of it.
    if (!cfg.secret.empty() && cfg.secret.back() == '\n') cfg.secret.pop_back();
    if (!cfg.secret.empty() && cfg.secret.back() == '\r') cfg.secret.pop_back();
  }

  g_noise.resize(2 * kMaxNumel);
  Rng noise_rng(cfg.seed);
  std::uniform_real_distribution<float> small(-1e-3f, 1e-3f);
  for (float& x : g_noise) x = small(noise_rng);
  MakeDumpText();

  char dir_tmpl[] = "/tmp/ps-soak-XXXXXX";
  if (::mkdtemp(dir_tmpl) == nullptr) Die(std::string("mkdtemp: ") + std::strerror(errno));
  const std::string dump_dir = dir_tmpl;

  std::unique_ptr<tensorspark::Client> driver = ConnectDriver(cfg);
  Setup(driver.get(), cfg);
  std::fprintf(stderr, "ps_soak: %d threads for %.0f s against %s:%u\n", cfg.threads, cfg.seconds,
               cfg.host.c_str(), static_cast<unsigned>(cfg.port));

  g_start = Clock::now();
  g_end = g_start +
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(cfg.seconds));
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  for (int i = 0; i < cfg.threads; ++i) {
    workers.push_back(
        std::make_unique<Worker>(cfg, i, dump_dir + "/dump-" + std::to_string(i) + ".txt"));
  }
  for (auto& w : workers) threads.emplace_back([&w] { w->Run(); });
  DriverLoop(driver.get(), cfg);
  for (auto& t : threads) t.join();
  const double elapsed = Seconds(Clock::now() - g_start);
  if (!driver->connected()) driver = ConnectDriver(cfg);

  bool drained = false;
  double drain_s = 0;
  std::vector<tensorspark::StatEntry> stats = Drain(driver.get(), &drained, &drain_s);
  driver->Close();
  std::error_code ec;
  std::filesystem::remove_all(dump_dir, ec);

  const uint64_t unexpected = Total(g_counters.unexpected);
  const uint64_t ops = Total(g_counters.ok) + Total(g_counters.expected);
  std::fprintf(stderr,
               "ps_soak: %.1f s, %llu ops (%.0f/s), %llu expected refusals, %llu unexpected "
               "errors; server drained in %.1f s: %s\n",
               elapsed, static_cast<unsigned long long>(ops), ops / std::max(elapsed, 1e-9),
               static_cast<unsigned long long>(Total(g_counters.expected)),
               static_cast<unsigned long long>(unexpected), drain_s, drained ? "yes" : "NO");
  if (!cfg.out.empty()) WriteJson(cfg, elapsed, drained, drain_s, stats, cfg.out);
  if (g_abort.load()) std::fprintf(stderr, "ps_soak: stopped early: too many unexpected errors\n");
  return unexpected == 0 ? 0 : 1;
}
