// The Prometheus renderer and the HTTP endpoint, over a real socket.
#include "server/metrics_http.h"

#include <gtest/gtest.h>

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
