// Row pull/push throughput of one server and one client over TCP loopback,
// against a raw socket moving the same request and response bytes in the
// same run (ABBA order, median of rounds).
//
//   sparse_rows [out.json] [rounds]
//
// Cases: 4,096 unique random ids x dim 16 and 64, rows pre-created, Adagrad.
// JSON: {"cases": [{dim, op, ps_rows_per_sec, raw_rows_per_sec, ratio}]}.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "protocol/frame.h"
#include "tensorspark/client.h"
#include "tensorspark/server.h"
#include "tensorspark/tables.h"

namespace {

using Clock = std::chrono::steady_clock;
constexpr size_t kIds = 4096;
constexpr int kItersPerSample = 40;

void Check(const tensorspark::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

bool ReadAll(int fd, void* p, size_t n) {
  auto* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::recv(fd, b, n, 0);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool WriteAll(int fd, const void* p, size_t n) {
  auto* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd, b, n, MSG_NOSIGNAL);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void NoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// A peer that, for each exchange, reads `req` bytes and answers `resp`
// bytes: the floor of moving one request's bytes over loopback.
class RawPeer {
 public:
  RawPeer() {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::listen(listen_fd_, 1);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
    client_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    std::thread accept([&] { server_fd_ = ::accept(listen_fd_, nullptr, nullptr); });
    ::connect(client_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    accept.join();
    NoDelay(client_fd_);
    NoDelay(server_fd_);
    thread_ = std::thread([this] { Serve(); });
  }
  ~RawPeer() {
    ::shutdown(client_fd_, SHUT_RDWR);
    thread_.join();
    ::close(client_fd_);
    ::close(server_fd_);
    ::close(listen_fd_);
  }
  // Sizes of the next exchanges (set before Exchange, never during one).
  void SetSizes(size_t req, size_t resp) {
    Exchange8(req, resp);

    out_.assign(req, 1);
    in_.assign(resp, 0);
  }
  void Exchange() {
    if (!WriteAll(client_fd_, out_.data(), out_.size()) ||
        !ReadAll(client_fd_, in_.data(), in_.size())) {
      std::fprintf(stderr, "raw exchange failed\n");
      std::exit(1);
    }
  }

 private:
  // Tells the peer thread the sizes in-band (two u64).
  void Exchange8(size_t req, size_t resp) {
    uint64_t sizes[2] = {req, resp};
    WriteAll(client_fd_, sizes, sizeof(sizes));
    uint8_t ack;
    ReadAll(client_fd_, &ack, 1);
  }
  void Serve() {
    std::vector<uint8_t> in, out;
    for (;;) {
      uint64_t sizes[2];
      if (!ReadAll(server_fd_, sizes, sizeof(sizes))) return;
      uint8_t ack = 1;
      WriteAll(server_fd_, &ack, 1);
      in.resize(sizes[0]);
      out.assign(sizes[1], 2);
      // Exchanges follow until the client sends new sizes; both sides know
      // how many, so the peer counts them.
      for (int i = 0; i < kItersPerSample; ++i) {
        if (!ReadAll(server_fd_, in.data(), in.size())) return;
        if (!WriteAll(server_fd_, out.data(), out.size())) return;
      }
    }
  }

  int listen_fd_ = -1, client_fd_ = -1, server_fd_ = -1;

  std::vector<uint8_t> out_, in_;
  std::thread thread_;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string out_path = argc > 1 ? argv[1] : "";
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 5;
  tensorspark::ServerOptions so;
  so.bind_address = "127.0.0.1";
  so.port = 0;
  so.secret = "sparse-rows-bench-secret";
  std::unique_ptr<tensorspark::Server> server;
  Check(tensorspark::Server::Start(so, &server), "server");
  tensorspark::ClientOptions co;
  co.host = "127.0.0.1";
  co.port = server->port();
  co.secret = so.secret;
  std::unique_ptr<tensorspark::Client> client;
  Check(tensorspark::Client::Connect(co, &client), "connect");
  RawPeer raw;

  std::mt19937_64 rng(42);
  std::string json = "{\"ids\": 4096, \"rounds\": " + std::to_string(rounds) + ", \"cases\": [";
  bool first = true;
  for (uint32_t dim : {16u, 64u}) {
    tensorspark::TableConfig t;
    t.name = "bench_d" + std::to_string(dim);
    t.dim = dim;
    t.optimizer.kind = tensorspark::RowOptimizerKind::kAdagrad;
    t.optimizer.learning_rate = 0.01f;
    Check(client->CreateTables({&t, 1}, nullptr), "create");
    std::vector<int64_t> ids(kIds);
    for (auto& id : ids) id = static_cast<int64_t>(rng() >> 1);
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<float> rows(ids.size() * dim), grads(ids.size() * dim, 0.01f);
    tensorspark::RowsUpdate up{t.name, dim, ids, grads};
    Check(client->PushRows(tensorspark::UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr),
          "pre-create");
    tensorspark::RowsRequest req{t.name, ids, rows};
    const size_t n = ids.size();
    const size_t hdr = tensorspark::protocol::kHeaderSize;
    const size_t name_part = 2 + t.name.size();
    const size_t pull_req = hdr + 4 + name_part + 4 + n * 8;
    const size_t pull_resp = hdr + 12 + 8 + n * dim * 4;
    const size_t push_req = hdr + 12 + name_part + 8 + n * 8 + n * dim * 4;
    const size_t push_resp = hdr + 8;
    for (const char* op : {"pull", "push"}) {
      const bool pull = std::string(op) == "pull";
      auto ps_sample = [&] {
        const auto t0 = Clock::now();
        for (int i = 0; i < kItersPerSample; ++i) {
          if (pull) {
            Check(client->PullRows({&req, 1}, nullptr), "pull");
          } else {
            Check(client->PushRows(tensorspark::UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr),
                  "push");
          }
        }
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        return n * kItersPerSample / s;
      };
      auto raw_sample = [&] {
        raw.SetSizes(pull ? pull_req : push_req, pull ? pull_resp : push_resp);
        const auto t0 = Clock::now();
        for (int i = 0; i < kItersPerSample; ++i) raw.Exchange();
        const double s = std::chrono::duration<double>(Clock::now() - t0).count();
        return n * kItersPerSample / s;
      };
      (void)ps_sample();  // warm-up
      (void)raw_sample();
      std::vector<double> ps, rw;
      for (int r = 0; r < rounds; ++r) {  // ABBA
        ps.push_back(ps_sample());
        rw.push_back(raw_sample());
        rw.push_back(raw_sample());
        ps.push_back(ps_sample());
      }
      const double p = Median(ps), q = Median(rw);
      std::printf("dim %3u %s: ps %.3g rows/s, raw %.3g rows/s, ratio %.3f\n", dim, op, p, q,
                  p / q);
      char buf[256];
      std::snprintf(buf, sizeof(buf),
                    "%s{\"dim\": %u, \"op\": \"%s\", \"ps_rows_per_sec\": %.1f, "
                    "\"raw_rows_per_sec\": %.1f, \"ratio\": %.4f}",
                    first ? "" : ", ", dim, op, p, q, p / q);
      json += buf;
      first = false;
    }
  }
  json += "]}\n";
  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f == nullptr) {
      std::perror(out_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  } else {
    std::fputs(json.c_str(), stdout);
  }
  client->Close();
  server->Stop();
  return 0;
}
