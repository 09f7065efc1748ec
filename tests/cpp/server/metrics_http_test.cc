// The Prometheus renderer and the HTTP endpoint, over a real socket.
#include "server/metrics_http.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <string>

#include "net/socket.h"
#include "test_util.h"

namespace tensorspark::server {
namespace {

TEST(RenderPrometheus, CountersGaugesAndLabels) {
  std::string text = RenderPrometheus({{"version", 7},
                                       {"pushes", 3},
                                       {"worker_clock{partition=\"0\"}", 5},
                                       {"worker_clock{partition=\"1\"}", 4}});
  EXPECT_EQ(text,
            "# TYPE tensorspark_version gauge\n"
            "tensorspark_version 7\n"
            "# TYPE tensorspark_pushes_total counter\n"
            "tensorspark_pushes_total 3\n"
            "# TYPE tensorspark_worker_clock gauge\n"
            "tensorspark_worker_clock{partition=\"0\"} 5\n"
            "tensorspark_worker_clock{partition=\"1\"} 4\n");
}

TEST(RenderPrometheus, F64KeysArePrintedAsFloats) {
  auto bits = [](double d) { return std::bit_cast<uint64_t>(d); };
  std::string text =
      RenderPrometheus({{"worker_loss_f64{partition=\"0\"}", bits(0.1)},
                        {"worker_loss_f64{partition=\"1\"}", bits(-2.5e-7)},
                        {"worker_loss_f64{partition=\"2\"}", bits(1e300)},
                        {"worker_loss_f64{partition=\"3\"}", bits(3.0)},
                        {"worker_loss_f64{partition=\"4\"}", bits(std::nan(""))},
                        {"worker_loss_f64{partition=\"5\"}", bits(-HUGE_VAL)},
                        {"worker_steps{partition=\"0\"}", bits(0.1)}});  // not _f64: an int
  EXPECT_EQ(text,
            "# TYPE tensorspark_worker_loss_f64 gauge\n"
            "tensorspark_worker_loss_f64{partition=\"0\"} 0.1\n"
            "tensorspark_worker_loss_f64{partition=\"1\"} -2.5e-07\n"
            "tensorspark_worker_loss_f64{partition=\"2\"} 1e+300\n"
            "tensorspark_worker_loss_f64{partition=\"3\"} 3\n"
            "tensorspark_worker_loss_f64{partition=\"4\"} NaN\n"
            "tensorspark_worker_loss_f64{partition=\"5\"} -Inf\n"
            "# TYPE tensorspark_worker_steps gauge\n"
            "tensorspark_worker_steps{partition=\"0\"} " +
                std::to_string(bits(0.1)) + "\n");
}

TEST(MetricsHttpServer, ServesMetricsAnd404) {
  int scrapes = 0;
  std::unique_ptr<MetricsHttpServer> http;
  ASSERT_TRUE(MetricsHttpServer::Start(
                  "127.0.0.1", 0,
                  [&] {
                    return RenderPrometheus({{"pulls", static_cast<uint64_t>(++scrapes)}});
                  },
                  &http)
                  .ok());
  std::string r = testing::RequestReply(http->port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(r.find("HTTP/1.0 200 OK"), std::string::npos) << r;
  EXPECT_NE(r.find("tensorspark_pulls_total 1\n"), std::string::npos) << r;
  r = testing::RequestReply(http->port(), "GET /other HTTP/1.1\r\n\r\n");
  EXPECT_NE(r.find("404"), std::string::npos) << r;
  // A client that connects and says nothing does not block the next scrape
  // for longer than the scrape deadline.
  net::Socket idle;
  ASSERT_TRUE(net::ConnectWithTimeout("127.0.0.1", http->port(), net::Deadline::In(5), &idle).ok());
  r = testing::RequestReply(http->port(), "GET /metrics HTTP/1.0\r\n\r\n");
  EXPECT_NE(r.find("tensorspark_pulls_total 2\n"), std::string::npos) << r;
  http->Stop();
}

}  // namespace
}  // namespace tensorspark::server
