#include "server/metrics_http.h"

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <set>
#include <string_view>

namespace tensorspark::server {
namespace {

constexpr std::array<std::string_view, 18> kCounterKeys = {"pushes",
                                                           "pulls",
                                                           "registers",
                                                           "bytes_in",
                                                           "bytes_out",
                                                           "errors",
                                                           "auth_failures",
                                                           "connections_total",
                                                           "snapshot_errors",
                                                           "snapshots_written",
                                                           "row_pushes",
                                                           "rows_pulled",
                                                           "rows_pushed",
                                                           "table_evictions",
                                                           "table_expired",
                                                           "table_admissions_refused",
                                                           "table_rows_pulled",
                                                           "table_rows_pushed"};
constexpr size_t kMaxRequest = 8192;
constexpr double kScrapeDeadlineS = 2.0;

bool IsCounter(std::string_view base) {
  return base.ends_with("_total") ||
         std::find(kCounterKeys.begin(), kCounterKeys.end(), base) != kCounterKeys.end();
}

std::string Sanitize(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    if (!ok) c = '_';
  }
  return out;
}

// A STATS value as Prometheus text: keys ending in `_f64` carry the bits of
// a double, printed as the shortest decimal that reads back the same.
std::string FormatValue(std::string_view base, uint64_t value) {
  if (!base.ends_with("_f64")) return std::to_string(value);
  const double d = std::bit_cast<double>(value);
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "+Inf" : "-Inf";
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof(buf), d);
  return std::string(buf, r.ptr);
}

Status Respond(int fd, std::string_view status, std::string_view type, std::string_view body) {
  std::string msg = "HTTP/1.0 " + std::string(status) + "\r\nContent-Type: " + std::string(type) +
                    "\r\nContent-Length: " + std::to_string(body.size()) +
                    "\r\nConnection: close\r\n\r\n" + std::string(body);
  return net::WriteFull(fd, msg.data(), msg.size(), net::Deadline::In(kScrapeDeadlineS));
}

}  // namespace

std::string RenderPrometheus(const std::vector<StatEntry>& stats) {
  std::string out;
  std::set<std::string> typed;
  for (const auto& [key, value] : stats) {
    const size_t brace = key.find('{');
    std::string_view base = std::string_view(key).substr(0, brace);
    std::string_view labels =
        brace == std::string::npos ? std::string_view() : std::string_view(key).substr(brace);
    const bool counter = IsCounter(base);
    std::string name = "tensorspark_" + Sanitize(base);
    if (counter && !base.ends_with("_total")) name += "_total";
    if (typed.insert(name).second) {
      out += "# TYPE " + name + (counter ? " counter\n" : " gauge\n");
    }
    out += name + std::string(labels) + " " + FormatValue(base, value) + "\n";
  }
  return out;
}

MetricsHttpServer::MetricsHttpServer(net::Socket listener, uint16_t port, Render render)
    : listener_(std::move(listener)), port_(port), render_(std::move(render)) {}

Status MetricsHttpServer::Start(const std::string& bind_address, uint16_t port, Render render,
                                std::unique_ptr<MetricsHttpServer>* out) {
  net::Socket listener;
  uint16_t bound = 0;
  TS_RETURN_IF_ERROR(net::Listen(bind_address, port, &listener, &bound).WithContext("metrics"));
  out->reset(new MetricsHttpServer(std::move(listener), bound, std::move(render)));
  (*out)->thread_ = std::thread([self = out->get()] { self->Loop(); });
  return Status::OK();
}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  if (stopping_.exchange(true)) return;
  listener_.Shutdown();  // wakes Accept
  if (thread_.joinable()) thread_.join();
  listener_.Close();
}

void MetricsHttpServer::Loop() {
  while (!stopping_.load()) {
    net::Socket conn;
    std::string peer;
    // A bounded wait, so Stop() is noticed even if shutdown() did not wake us.
    Status s = net::Accept(listener_, net::Deadline::In(0.5), &conn, &peer);
    if (s.ok()) Serve(std::move(conn));
  }
}

void MetricsHttpServer::Serve(net::Socket conn) {
  const net::Deadline deadline = net::Deadline::In(kScrapeDeadlineS);
  std::string request;
  char buf[1024];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < kMaxRequest) {
    size_t got = 0;
    if (!net::ReadSome(conn.fd(), buf, sizeof(buf), deadline, &got).ok()) return;
    request.append(buf, got);
  }
  const std::string_view line = std::string_view(request).substr(0, request.find("\r\n"));
  if (line.starts_with("GET /metrics ") || line == "GET /metrics") {
    (void)Respond(conn.fd(), "200 OK", "text/plain; version=0.0.4", render_());
  } else {
    (void)Respond(conn.fd(), "404 Not Found", "text/plain", "try GET /metrics\n");
  }
}

}  // namespace tensorspark::server
