// ps_roundtrip: push+pull throughput of the tensorspark parameter server
// against a raw socket baseline that moves the same bytes, plus 4 KB latency.
//
// Cases: floats x clients x transport (TCP loopback, Unix-domain socket) x
// wire encoding (fp32, fp16). The raw baseline of a case uses the same
// transport and moves the bytes the PS puts on the wire for its data (N*4,
// or N*2 for fp16: "raw_bytes": "encoded"). Every GB/s figure counts the
// logical float32 payload (4 bytes per element, push + pull), so fp16's
// speed-up shows.
//
// For every (floats N, clients C) case, C threads each own a Client and a
// variable of N floats and loop push(kDelta, zeros) + pull. The baseline
// sends N*4 bytes to a plain echo-style server that answers with N*4 bytes.
// A second baseline (raw_2rt_gbps) makes two exchanges per round trip like
// push+pull does (N*4 bytes -> 8-byte ack, 8-byte request -> N*4 bytes), so
// small sizes, where per-exchange latency dominates, compare like for like:
// it is the headline baseline (raw2_gbps, alias raw_2rt_gbps). Each case runs
// `rounds` rounds in ABBA order (PS, raw1, raw2, then reversed); ps_gbps,
// raw_gbps and raw2_gbps are the best run of each side, and ratio is the
// median of the per-round ps/raw2 ratios with ratio_iqr its [q25, q75]
// (ratio_1x: best PS / best raw one-exchange).
//
//   ps_roundtrip [--quick] [--out PATH] [--checksums auto|on|off]
//   ps_roundtrip --single FLOATS   (C++ client, TCP, fp32, 1 client: prints
//                                   {"floats":..,"seconds_per_iter":..}; used
//                                   by bench/python_overhead.py)
//
// Writes JSON (default bench/results/ps_roundtrip.json, relative to the
// working directory) and prints a table.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench_output.h"
#include "tensorspark/client.h"
#include "tensorspark/server.h"
#include "tensorspark/status.h"
#include "tensorspark/tls.h"
#include "tensorspark/types.h"

namespace {

using tensorspark::bench::Check;
using tensorspark::bench::CompilerName;
using tensorspark::bench::Die;
using tensorspark::bench::FirstError;
using tensorspark::bench::JsonEscape;
using tensorspark::bench::Num;
using tensorspark::bench::RandomSecret;
using tensorspark::bench::UtcTimestamp;

using Clock = std::chrono::steady_clock;
using tensorspark::Status;

// ---- configuration ----------------------------------------------------------

struct Config {
  std::vector<int64_t> floats;
  std::vector<int> clients;
  // "tls": TCP with TLS 1.3 (fp32 only), against the plain TCP baselines.
  std::vector<std::string> transports = {"tcp", "unix", "tls"};
  std::vector<std::string> encodings = {"fp32", "fp16"};
  // 36 cases: kept short so the whole run stays near 2-3 minutes on 2 cores.
  int rounds = 10;         // paired ABBA rounds per case
  double target_s = 0.2;   // wall time of one timed run
  double warmup_s = 0.05;  // warm-up time per baseline per case
  double latency_s = 0.3;  // time per latency measurement
  std::string out = "bench/results/ps_roundtrip.json";
  // PS clients' checksum mode (--checksums): "auto" is the client default.
  std::string checksums = "auto";
};

Config FullConfig() {
  Config c;
  c.floats = {4096 / 4, 1'000'000, 10'000'000};
  c.clients = {1, 2, 8};
  return c;
}

Config QuickConfig() {
  Config c;
  c.floats = {4096 / 4, 1'000'000};
  c.clients = {1, 2};
  c.rounds = 4;
  c.target_s = 0.05;
  c.warmup_s = 0.02;
  c.latency_s = 0.1;
  return c;
}

constexpr int kMaxLatencySamples = 200'000;
constexpr int kLatencyWarmup = 200;
constexpr size_t kAckBytes = 8;  // small message of the 2-exchange baseline

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// ---- raw TCP baseline -------------------------------------------------------

std::string ErrnoText(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

bool WriteFull(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// False on error or EOF.
bool ReadFull(int fd, char* p, size_t n) {
  while (n > 0) {
    ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (r == 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void SetNoDelay(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    Die(ErrnoText("setsockopt(TCP_NODELAY)"));
  }
}

// One request/response exchange: read `in` bytes, then write `out` bytes.
struct RawStep {
  size_t in;
  size_t out;
};

// Serves each connection by cycling through `steps`; one blocking thread
// per connection, like the PS.
class RawServer {
 public:
  // Listens on TCP loopback, or on the Unix socket `unix_path` if not empty.
  explicit RawServer(std::vector<RawStep> steps, std::string unix_path = "")
      : steps_(std::move(steps)), unix_path_(std::move(unix_path)) {
    if (!unix_path_.empty()) {
      listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
      if (listen_fd_ < 0) Die(ErrnoText("socket"));
      sockaddr_un ua{};
      ua.sun_family = AF_UNIX;
      std::snprintf(ua.sun_path, sizeof(ua.sun_path), "%s", unix_path_.c_str());
      ::unlink(unix_path_.c_str());
      if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&ua), sizeof(ua)) != 0) {
        Die(ErrnoText("bind"));
      }
      if (::listen(listen_fd_, 64) != 0) Die(ErrnoText("listen"));
      acceptor_ = std::thread([this] { AcceptLoop(); });
      return;
    }
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (listen_fd_ < 0) Die(ErrnoText("socket"));
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      Die(ErrnoText("bind"));
    }
    if (::listen(listen_fd_, 64) != 0) Die(ErrnoText("listen"));
    socklen_t len = sizeof(addr);
    if (::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      Die(ErrnoText("getsockname"));
    }
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { AcceptLoop(); });
  }

  // Callers close their client sockets first, so handlers see EOF.
  ~RawServer() {
    stopping_.store(true);
    ::shutdown(listen_fd_, SHUT_RDWR);  // wakes accept()
    acceptor_.join();
    ::close(listen_fd_);
    for (auto& t : handlers_) t.join();
    if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
  }

  uint16_t port() const { return port_; }
  const std::string& unix_path() const { return unix_path_; }

 private:
  void AcceptLoop() {
    while (true) {
      int fd = ::accept(listen_fd_, nullptr, nullptr);
      if (fd < 0) {
        if (stopping_.load()) return;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        return;
      }
      if (unix_path_.empty()) SetNoDelay(fd);
      handlers_.emplace_back([this, fd] { Serve(fd); });
    }
  }

  void Serve(int fd) {
    size_t max_bytes = 0;
    for (const RawStep& st : steps_) max_bytes = std::max({max_bytes, st.in, st.out});
    std::vector<char> buf(max_bytes);
    for (size_t k = 0;; k = (k + 1) % steps_.size()) {
      const RawStep& st = steps_[k];
      if (!ReadFull(fd, buf.data(), st.in) || !WriteFull(fd, buf.data(), st.out)) break;
    }
    ::close(fd);
  }

  const std::vector<RawStep> steps_;
  const std::string unix_path_;
  int listen_fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  std::vector<std::thread> handlers_;  // touched by the acceptor only until join
};

int RawConnect(const RawServer& server) {
  if (!server.unix_path().empty()) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) Die(ErrnoText("socket"));
    sockaddr_un ua{};
    ua.sun_family = AF_UNIX;
    std::snprintf(ua.sun_path, sizeof(ua.sun_path), "%s", server.unix_path().c_str());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&ua), sizeof(ua)) != 0) {
      Die(ErrnoText("connect"));
    }
    return fd;
  }
  const uint16_t port = server.port();
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) Die(ErrnoText("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Die(ErrnoText("connect"));
  }
  SetNoDelay(fd);
  return fd;
}

// ---- timed runs -------------------------------------------------------------

// One round trip of client `i`; returns false (and records why) on failure.
using RoundTrip = std::function<bool(int i)>;

// Runs `iters` round trips on each of `clients` threads at once; returns the
// wall time from the common start to the last finish.
double TimedRun(int clients, int64_t iters, const RoundTrip& rt, FirstError* err) {
  std::latch ready(clients);
  std::latch go(1);
  std::vector<std::thread> threads;
  threads.reserve(clients);
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      ready.count_down();
      go.wait();
      for (int64_t k = 0; k < iters && !err->failed(); ++k) {
        if (!rt(i)) return;
      }
    });
  }
  ready.wait();
  Clock::time_point t0 = Clock::now();
  go.count_down();
  for (auto& t : threads) t.join();
  double s = Seconds(Clock::now() - t0);
  if (err->failed()) Die(err->message());
  return s;
}

// Warms up (doubling the count until warmup_s passes) and returns the
// iteration count per client that should take about target_s.
int64_t CalibrateIters(int clients, const RoundTrip& rt, FirstError* err, const Config& cfg) {
  int64_t iters = 1;
  double s = TimedRun(clients, iters, rt, err);
  while (s < cfg.warmup_s && iters < (int64_t{1} << 30)) {
    iters *= 2;
    s = TimedRun(clients, iters, rt, err);
  }
  double per_iter = s / static_cast<double>(iters);
  return std::max<int64_t>(1, static_cast<int64_t>(cfg.target_s / per_iter));
}

// Linear-interpolated quantile q in [0, 1] of unsorted samples.
double Quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

double Median(std::vector<double> v) { return Quantile(std::move(v), 0.5); }

// Percentile of sorted samples (nearest rank on [0, n-1]).
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  size_t idx = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(idx, sorted.size() - 1)];
}

// Times single calls of `op` (after a warm-up) for about seconds_budget;
// returns sorted latencies in microseconds.
std::vector<double> SampleLatency(const std::function<bool()>& op, double seconds_budget,
                                  FirstError* err) {
  for (int k = 0; k < kLatencyWarmup; ++k) {
    if (!op()) Die(err->message());
  }
  std::vector<double> us;
  us.reserve(1 << 16);
  Clock::time_point end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(seconds_budget));
  while (static_cast<int>(us.size()) < kMaxLatencySamples) {
    Clock::time_point t0 = Clock::now();
    if (!op()) Die(err->message());
    Clock::time_point t1 = Clock::now();
    us.push_back(Seconds(t1 - t0) * 1e6);
    if (t1 >= end) break;
  }
  std::sort(us.begin(), us.end());
  return us;
}

// ---- one case ---------------------------------------------------------------

struct CaseResult {
  int64_t floats = 0;
  int clients = 0;
  std::string transport = "tcp";
  std::string encoding = "fp32";
  double ps_gbps = 0, raw_gbps = 0, raw_2rt_gbps = 0;
  std::vector<double> ps_runs, raw_runs, raw_2rt_runs;
  // Per round, ps / raw two-exchange of the same round (paired).
  std::vector<double> ratio_runs;
  bool has_latency = false;
  double ps_pull_p50_us = 0, ps_pull_p99_us = 0;
  double raw_pingpong_p50_us = 0, raw_pingpong_p99_us = 0;
};

// Where and how the PS clients of a case connect.
struct Transport {
  std::string name = "tcp";       // "tcp", "unix" or "tls"
  std::string encoding = "fp32";  // "fp32" or "fp16"
  tensorspark::ChecksumMode checksums = tensorspark::ChecksumMode::kAuto;
  uint16_t ps_port = 0;
  uint16_t tls_port = 0;  // the TLS server's, pinned by tls_fingerprint
  std::string tls_fingerprint;
  std::string ps_unix_path;
  std::string raw_unix_dir;  // raw baselines listen here for "unix"
};

std::unique_ptr<tensorspark::Client> ConnectPs(const Transport& t, const std::string& secret,
                                               int32_t partition) {
  tensorspark::ClientOptions opt;
  opt.host = t.name == "unix" ? "unix:" + t.ps_unix_path : "127.0.0.1";
  opt.port = t.name == "tls" ? t.tls_port : t.ps_port;
  if (t.name == "tls") opt.tls_fingerprints = {t.tls_fingerprint};
  opt.checksums = t.checksums;
  opt.encoding = t.encoding == "fp16" ? tensorspark::WireEncoding::kFloat16
                                      : tensorspark::WireEncoding::kFloat32;
  opt.secret = secret;
  opt.partition_id = partition;
  opt.attempt = 0;
  std::unique_ptr<tensorspark::Client> c;
  Check(tensorspark::Client::Connect(opt, &c), "connect");
  return c;
}

CaseResult RunCase(int64_t n, int clients, const Transport& t, const std::string& secret,
                   bool measure_latency, const Config& cfg) {
  CaseResult res;
  res.floats = n;
  res.clients = clients;
  res.transport = t.name;
  res.encoding = t.encoding;
  // Bytes the raw baselines move per direction: the PS's data section.
  const size_t wire_elem = t.encoding == "fp16" ? 2 : sizeof(float);
  const size_t bytes = static_cast<size_t>(n) * wire_elem;
  const int64_t shape_storage[1] = {n};
  const std::span<const int64_t> shape(shape_storage, 1);

  // Shared read-only payload (zeros: w += 0 keeps the values) and one
  // receive buffer per client, reused by the raw baseline.
  std::vector<float> zeros(static_cast<size_t>(n), 0.0f);
  std::vector<std::vector<float>> recv(static_cast<size_t>(clients),
                                       std::vector<float>(static_cast<size_t>(n), 1.0f));

  // PS side: one Client and one variable per thread.
  std::vector<std::unique_ptr<tensorspark::Client>> ps(static_cast<size_t>(clients));
  std::vector<std::string> names(static_cast<size_t>(clients));
  for (int i = 0; i < clients; ++i) {
    ps[i] = ConnectPs(t, secret, i);
    names[i] = "n" + std::to_string(n) + "_v" + std::to_string(i);
    tensorspark::VariableSpec spec{names[i], shape, zeros};
    std::vector<bool> created;
    uint64_t version = 0;
    Check(ps[i]->Register({&spec, 1}, &created, &version), "register " + names[i]);
  }

  // Raw side: one connection per thread and baseline.
  const bool unix_raw = t.name == "unix";
  RawServer raw_server({{bytes, bytes}}, unix_raw ? t.raw_unix_dir + "/raw1.sock" : "");
  RawServer raw_2rt_server({{bytes, kAckBytes}, {kAckBytes, bytes}},
                           unix_raw ? t.raw_unix_dir + "/raw2.sock" : "");
  std::vector<int> raw_fds(static_cast<size_t>(clients));
  std::vector<int> raw_2rt_fds(static_cast<size_t>(clients));
  for (int i = 0; i < clients; ++i) {
    raw_fds[i] = RawConnect(raw_server);
    raw_2rt_fds[i] = RawConnect(raw_2rt_server);
  }

  FirstError err;
  const tensorspark::PushOptions push_opt;
  RoundTrip ps_rt = [&](int i) {
    tensorspark::TensorView tv{names[i], shape, zeros};
    uint64_t version = 0;
    Status s = ps[i]->Push(tensorspark::UpdateKind::kDelta, {&tv, 1}, push_opt, &version);
    if (!s.ok()) {
      err.Set("push " + names[i] + ": " + s.ToString());
      return false;
    }
    tensorspark::MutableTensorView mv{names[i], recv[i]};
    s = ps[i]->Pull({&mv, 1}, &version);
    if (!s.ok()) {
      err.Set("pull " + names[i] + ": " + s.ToString());
      return false;
    }
    return true;
  };
  RoundTrip raw_rt = [&](int i) {
    const char* out = reinterpret_cast<const char*>(zeros.data());
    char* in = reinterpret_cast<char*>(recv[i].data());
    if (!WriteFull(raw_fds[i], out, bytes) || !ReadFull(raw_fds[i], in, bytes)) {
      err.Set(ErrnoText("raw round trip"));
      return false;
    }
    return true;
  };
  RoundTrip raw_2rt_rt = [&](int i) {
    const char* out = reinterpret_cast<const char*>(zeros.data());
    char* in = reinterpret_cast<char*>(recv[i].data());
    char ack[kAckBytes] = {};
    const int fd = raw_2rt_fds[i];
    if (!WriteFull(fd, out, bytes) || !ReadFull(fd, ack, kAckBytes) ||
        !WriteFull(fd, ack, kAckBytes) || !ReadFull(fd, in, bytes)) {
      err.Set(ErrnoText("raw 2-exchange round trip"));
      return false;
    }
    return true;
  };

  const int64_t ps_iters = CalibrateIters(clients, ps_rt, &err, cfg);
  const int64_t raw_iters = CalibrateIters(clients, raw_rt, &err, cfg);
  const int64_t raw_2rt_iters = CalibrateIters(clients, raw_2rt_rt, &err, cfg);
  // Logical float32 bytes (push + pull) per iteration, for PS and raw alike.
  const double bytes_per_iter = 2.0 * static_cast<double>(n) * sizeof(float) * clients;
  auto gbps = [&](int64_t iters, const RoundTrip& rt) {
    return bytes_per_iter * static_cast<double>(iters) / TimedRun(clients, iters, rt, &err) / 1e9;
  };
  // ABBA order (PS, raw1, raw2, then reversed) so slow drift of the machine
  // falls on both sides of each pair alike.
  for (int r = 0; r < cfg.rounds; ++r) {
    double ps_g, raw_g, raw2_g;
    if (r % 2 == 0) {
      ps_g = gbps(ps_iters, ps_rt);
      raw_g = gbps(raw_iters, raw_rt);
      raw2_g = gbps(raw_2rt_iters, raw_2rt_rt);
    } else {
      raw2_g = gbps(raw_2rt_iters, raw_2rt_rt);
      raw_g = gbps(raw_iters, raw_rt);
      ps_g = gbps(ps_iters, ps_rt);
    }
    res.ps_runs.push_back(ps_g);
    res.raw_runs.push_back(raw_g);
    res.raw_2rt_runs.push_back(raw2_g);
    res.ratio_runs.push_back(raw2_g > 0 ? ps_g / raw2_g : 0.0);
  }
  // Best of N per side: noise on this machine only ever slows a run down.
  res.ps_gbps = *std::max_element(res.ps_runs.begin(), res.ps_runs.end());
  res.raw_gbps = *std::max_element(res.raw_runs.begin(), res.raw_runs.end());
  res.raw_2rt_gbps = *std::max_element(res.raw_2rt_runs.begin(), res.raw_2rt_runs.end());

  // Sanity: a pull returned the registered zeros.
  for (int i = 0; i < clients; ++i) {
    tensorspark::MutableTensorView mv{names[i], recv[i]};
    uint64_t version = 0;
    Check(ps[i]->Pull({&mv, 1}, &version), "pull " + names[i]);
    if (std::any_of(recv[i].begin(), recv[i].end(), [](float v) { return v != 0.0f; })) {
      Die("pull of " + names[i] + " returned wrong values");
    }
  }

  if (measure_latency) {
    // PS pull-only (small request, N*4-byte response) and raw N*4 ping-pong,
    // on client 0 alone.
    std::vector<double> lat = SampleLatency(
        [&] {
          tensorspark::MutableTensorView mv{names[0], recv[0]};
          uint64_t version = 0;
          Status s = ps[0]->Pull({&mv, 1}, &version);
          if (!s.ok()) err.Set("pull " + names[0] + ": " + s.ToString());
          return s.ok();
        },
        cfg.latency_s, &err);
    res.ps_pull_p50_us = Percentile(lat, 0.50);
    res.ps_pull_p99_us = Percentile(lat, 0.99);
    lat = SampleLatency([&] { return raw_rt(0); }, cfg.latency_s, &err);
    res.raw_pingpong_p50_us = Percentile(lat, 0.50);
    res.raw_pingpong_p99_us = Percentile(lat, 0.99);
    res.has_latency = true;
  }

  // Close clients first so the raw handlers see EOF before ~RawServer joins.
  for (int fd : raw_fds) ::close(fd);
  for (int fd : raw_2rt_fds) ::close(fd);
  for (auto& c : ps) c->Close();
  return res;
}

// ---- AES-GCM alone ----------------------------------------------------------

// GB/s of one core sealing 1 MiB buffers with OpenSSL's AES-GCM (`bits`
// 128 or 256), what TLS 1.3 spends per byte on top of the socket copy.
double AesGcmGbps(int bits, double seconds) {
  std::vector<uint8_t> in(1 << 20, 0x5a), out(in.size() + 16);
  uint8_t key[32] = {1}, iv[12] = {2}, tag[16];
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  const EVP_CIPHER* cipher = bits == 128 ? EVP_aes_128_gcm() : EVP_aes_256_gcm();
  size_t bytes = 0;
  const Clock::time_point start = Clock::now();
  while (Seconds(Clock::now() - start) < seconds) {
    int len = 0;
    if (EVP_EncryptInit_ex(ctx, cipher, nullptr, key, iv) != 1 ||
        EVP_EncryptUpdate(ctx, out.data(), &len, in.data(), static_cast<int>(in.size())) != 1 ||
        EVP_EncryptFinal_ex(ctx, out.data() + len, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, sizeof(tag), tag) != 1) {
      Die("AES-GCM failed");
    }
    ++iv[0];
    bytes += in.size();
  }
  EVP_CIPHER_CTX_free(ctx);
  return static_cast<double>(bytes) / Seconds(Clock::now() - start) / 1e9;
}

// ---- output -----------------------------------------------------------------

std::string NumList(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + Num(v[i]);
  return s + "]";
}

void WriteJson(const std::vector<CaseResult>& results, const std::string& checksums, double aes128,
               double aes256, const std::string& path) {
  std::string j = "{\n  \"cases\": [\n";
  for (size_t k = 0; k < results.size(); ++k) {
    const CaseResult& r = results[k];
    j += "    {\"floats\": " + std::to_string(r.floats) +
         ", \"clients\": " + std::to_string(r.clients) + ", \"transport\": \"" + r.transport +
         "\", \"encoding\": \"" + r.encoding + "\", \"raw_bytes\": \"encoded\"" +
         ", \"ps_gbps\": " + Num(r.ps_gbps) + ", \"raw_gbps\": " + Num(r.raw_gbps) +
         ", \"raw2_gbps\": " + Num(r.raw_2rt_gbps) + ", \"ratio\": " + Num(Median(r.ratio_runs)) +
         ", \"ratio_iqr\": [" + Num(Quantile(r.ratio_runs, 0.25)) + ", " +
         Num(Quantile(r.ratio_runs, 0.75)) + "]" +
         ", \"ratio_1x\": " + Num(r.raw_gbps > 0 ? r.ps_gbps / r.raw_gbps : 0.0) +
         ", \"raw_2rt_gbps\": " + Num(r.raw_2rt_gbps) +
         ", \"ratio_2rt\": " + Num(r.raw_2rt_gbps > 0 ? r.ps_gbps / r.raw_2rt_gbps : 0.0) +
         ", \"ratio_runs\": " + NumList(r.ratio_runs) +
         ", \"ps_gbps_runs\": " + NumList(r.ps_runs) +
         ", \"raw_gbps_runs\": " + NumList(r.raw_runs) +
         ", \"raw_2rt_gbps_runs\": " + NumList(r.raw_2rt_runs);
    if (r.has_latency) {
      j += ", \"ps_pull_p50_us\": " + Num(r.ps_pull_p50_us) +
           ", \"ps_pull_p99_us\": " + Num(r.ps_pull_p99_us) +
           ", \"raw_pingpong_p50_us\": " + Num(r.raw_pingpong_p50_us) +
           ", \"raw_pingpong_p99_us\": " + Num(r.raw_pingpong_p99_us);
    }
    j += std::string("}") + (k + 1 < results.size() ? "," : "") + "\n";
  }
  j += "  ],\n  \"units\": \"GB/s of logical float32 payload (4 bytes/element, push + pull); "
       "raw baselines move the PS's wire bytes (N*4, or N*2 for fp16) over the same "
       "transport\",\n";
  j += "  \"aes_gcm_one_core_gbps\": {\"aes_128_gcm\": " + Num(aes128) +
       ", \"aes_256_gcm\": " + Num(aes256) + "},\n";
  j += "  \"tls\": \"TLS 1.3, OpenSSL's default suites (TLS_AES_256_GCM_SHA384 first); raw "
       "baselines of tls rows are plain TCP\",\n";
  j += "  \"checksums\": \"" + checksums + "\",\n";
  j += "  \"machine\": {\"cores\": " + std::to_string(std::thread::hardware_concurrency()) +
       ", \"compiler\": \"" + JsonEscape(CompilerName()) + "\"},\n";
  j += "  \"timestamp\": \"" + UtcTimestamp() + "\"\n}\n";

  std::filesystem::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) Die(ErrnoText(("open " + path).c_str()));
  bool ok = std::fwrite(j.data(), 1, j.size(), f) == j.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) Die("write " + path + " failed");
}

void PrintRow(const CaseResult& r) {
  std::printf("%10lld %7d %5s %5s %9.3f %9.3f %9.3f %6.2f [%.2f, %.2f]",
              static_cast<long long>(r.floats), r.clients, r.transport.c_str(), r.encoding.c_str(),
              r.ps_gbps, r.raw_2rt_gbps, r.raw_gbps, Median(r.ratio_runs),
              Quantile(r.ratio_runs, 0.25), Quantile(r.ratio_runs, 0.75));
  if (r.has_latency) {
    std::printf("   pull p50/p99 %.1f/%.1f us, raw ping-pong p50/p99 %.1f/%.1f us",
                r.ps_pull_p50_us, r.ps_pull_p99_us, r.raw_pingpong_p50_us, r.raw_pingpong_p99_us);
  }
  std::printf("\n");
  std::fflush(stdout);
}

// --single: seconds per push+pull of one C++ client, TCP, fp32 (median of
// a few timed runs after a warm-up), printed as one JSON object.
int RunSingle(int64_t n) {
  tensorspark::ServerOptions sopt;
  sopt.bind_address = "127.0.0.1";
  sopt.secret = RandomSecret();
  std::unique_ptr<tensorspark::Server> server;
  Check(tensorspark::Server::Start(sopt, &server), "server start");
  Transport t;
  t.ps_port = server->port();
  auto c = ConnectPs(t, sopt.secret, 0);
  const int64_t shape_storage[1] = {n};
  const std::span<const int64_t> shape(shape_storage, 1);
  std::vector<float> zeros(static_cast<size_t>(n), 0.0f), out(static_cast<size_t>(n));
  tensorspark::VariableSpec spec{"single", shape, zeros};
  Check(c->Register({&spec, 1}, nullptr, nullptr), "register");
  auto once = [&] {
    tensorspark::TensorView tv{"single", shape, zeros};
    Check(c->Push(tensorspark::UpdateKind::kDelta, {&tv, 1}, {}, nullptr), "push");
    tensorspark::MutableTensorView mv{"single", out};
    Check(c->Pull({&mv, 1}, nullptr), "pull");
  };
  for (int k = 0; k < 3; ++k) once();
  std::vector<double> per_iter;
  for (int r = 0; r < 7; ++r) {
    Clock::time_point t0 = Clock::now();
    for (int k = 0; k < 3; ++k) once();
    per_iter.push_back(Seconds(Clock::now() - t0) / 3);
  }
  c->Close();
  server->Stop();
  std::printf("{\"floats\": %lld, \"seconds_per_iter\": %s}\n", static_cast<long long>(n),
              Num(Median(per_iter)).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg = FullConfig();
  std::string out_path;
  std::string checksums = "auto";
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      cfg = QuickConfig();
      quick = true;
    } else if (a == "--single" && i + 1 < argc) {
      return RunSingle(std::atoll(argv[++i]));
    } else if (a == "--out" && i + 1 < argc) {
      out_path = argv[++i];
    } else if (a.rfind("--out=", 0) == 0) {
      out_path = a.substr(6);
    } else if (a == "--checksums" && i + 1 < argc) {
      checksums = argv[++i];
      if (checksums != "auto" && checksums != "on" && checksums != "off") {
        Die("--checksums must be auto, on or off, got '" + checksums + "'");
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--out PATH] [--checksums auto|on|off] | --single FLOATS\n",
                   argv[0]);
      return 2;
    }
  }
  if (!out_path.empty()) cfg.out = out_path;
  cfg.checksums = checksums;

  // Unix sockets of the PS and the raw baselines live in a private dir.
  char dir_tmpl[] = "/tmp/ts-bench-XXXXXX";
  if (::mkdtemp(dir_tmpl) == nullptr) Die(ErrnoText("mkdtemp"));
  const std::string sock_dir = dir_tmpl;

  tensorspark::ServerOptions sopt;
  sopt.bind_address = "127.0.0.1";
  sopt.port = 0;
  sopt.secret = RandomSecret();
  sopt.unix_path = sock_dir + "/ps.sock";
  std::unique_ptr<tensorspark::Server> server;
  Check(tensorspark::Server::Start(sopt, &server), "server start");
  tensorspark::TlsIdentity identity;
  Check(tensorspark::MakeTlsIdentity(&identity), "TLS identity");
  tensorspark::ServerOptions topt = sopt;
  topt.unix_path.clear();
  topt.tls_cert_pem = identity.cert_pem;
  topt.tls_key_pem = identity.key_pem;
  std::unique_ptr<tensorspark::Server> tls_server;
  Check(tensorspark::Server::Start(topt, &tls_server), "TLS server start");

  std::printf("tensorspark ps_roundtrip: PS push(kDelta)+pull vs raw sockets, %u cores%s\n",
              std::thread::hardware_concurrency(), quick ? " (quick)" : "");
  std::printf("%10s %7s %5s %5s %9s %9s %9s %6s %s\n", "floats", "clients", "tport", "enc",
              "ps_GB/s", "raw2_GB/s", "raw1_GB/s", "ratio", "IQR (paired ps/raw2)");
  const tensorspark::ChecksumMode checksum_mode =
      cfg.checksums == "on"    ? tensorspark::ChecksumMode::kOn
      : cfg.checksums == "off" ? tensorspark::ChecksumMode::kOff
                               : tensorspark::ChecksumMode::kAuto;
  Clock::time_point start = Clock::now();
  std::vector<CaseResult> results;
  for (int64_t n : cfg.floats) {
    for (int c : cfg.clients) {
      for (const std::string& tp : cfg.transports) {
        for (const std::string& enc : cfg.encodings) {
          if (tp == "tls" && enc != "fp32") continue;
          Transport t;
          t.tls_port = tls_server->port();
          t.tls_fingerprint = identity.fingerprint;
          t.name = tp;
          t.encoding = enc;
          t.checksums = checksum_mode;
          t.ps_port = server->port();
          t.ps_unix_path = sopt.unix_path;
          t.raw_unix_dir = sock_dir;
          bool latency = n == 4096 / 4 && c == 1;
          results.push_back(RunCase(n, c, t, sopt.secret, latency, cfg));
          PrintRow(results.back());
        }
      }
    }
  }
  server->Stop();
  tls_server->Stop();
  ::rmdir(sock_dir.c_str());
  const double aes128 = AesGcmGbps(128, cfg.latency_s), aes256 = AesGcmGbps(256, cfg.latency_s);
  std::printf("AES-GCM on one core: %.2f GB/s (128-bit key), %.2f GB/s (256-bit key)\n", aes128,
              aes256);
  WriteJson(results, cfg.checksums, aes128, aes256, cfg.out);
  std::printf("total %.1f s; wrote %s\n", Seconds(Clock::now() - start), cfg.out.c_str());
  return 0;
}
