// Prometheus endpoint of the parameter server: the same counters as the
// protocol's STATS call, as text over HTTP for scrapers.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "net/socket.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::server {

// Renders counters in the Prometheus text format (0.0.4). A key may carry
// labels ("worker_clock{partition=\"3\"}"); each metric gets one TYPE line.
// Keys in kCounterKeys, or ending in "_total", are counters (exposed with a
// "_total" suffix); every other key is a gauge. Names get a "tensorspark_"
// prefix. Keys ending in "_f64" hold a double's IEEE-754 bits and are
// printed as decimal floats (NaN, +Inf, -Inf as Prometheus spells them).
std::string RenderPrometheus(const std::vector<StatEntry>& stats);

// A minimal HTTP/1.0 server: GET /metrics answers the rendered counters,
// anything else 404. One thread serves one scrape at a time, each with a
// 2-second deadline, so a stuck scraper cannot hold it long.
class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;  // called on the HTTP thread

  static Status Start(const std::string& bind_address, uint16_t port, Render render,
                      std::unique_ptr<MetricsHttpServer>* out);
  ~MetricsHttpServer();  // Stop()s

  uint16_t port() const { return port_; }
  // Stops the thread; idempotent.
  void Stop();

 private:
  MetricsHttpServer(net::Socket listener, uint16_t port, Render render);
  void Loop();
  void Serve(net::Socket conn);

  net::Socket listener_;
  uint16_t port_;
  Render render_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace tensorspark::server
