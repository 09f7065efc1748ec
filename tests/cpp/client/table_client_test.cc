// Sparse tables over real sockets: Client and ShardedClient against
// in-process servers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "tensorspark/sharded_client.h"
#include "tensorspark/tables.h"
#include "test_util.h"

namespace tensorspark::testing {
namespace {

uint64_t Stat(const std::vector<StatEntry>& stats, const std::string& key) {
  for (const auto& [k, v] : stats)
    if (k == key) return v;
  ADD_FAILURE() << "no stat " << key;
  return 0;
}

TableConfig Sgd(const std::string& name, uint32_t dim, float lr = 0.5f) {
  TableConfig c;
  c.name = name;
  c.dim = dim;
  c.seed = 7;
  c.optimizer.kind = RowOptimizerKind::kSgd;
  c.optimizer.learning_rate = lr;
  return c;
}

std::vector<float> Initial(const TableConfig& c, std::span<const int64_t> ids) {
  std::vector<float> out(ids.size() * c.dim);
  RowInitialValues(c.name, c.seed, c.initializer, c.init_scale, c.dim, ids, out.data());
  return out;
}

void ExpectNear(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-6) << "element " << i;
}

class TableClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer();
    client_ = ConnectClient(server_->port());
  }
  std::unique_ptr<Server> server_;
  std::unique_ptr<Client> client_;
};

TEST_F(TableClientTest, CreatePullPushExportList) {
  const TableConfig user = Sgd("user", 4);
  std::vector<bool> created;
  ASSERT_TRUE(client_->CreateTables({&user, 1}, &created).ok());
  EXPECT_EQ(created, std::vector<bool>{true});
  ASSERT_TRUE(client_->CreateTables({&user, 1}, &created).ok());
  EXPECT_EQ(created, std::vector<bool>{false});

  // Never-written rows read as their initial values; duplicates allowed.
  const int64_t ids[] = {3, 7, 3};
  std::vector<float> rows(3 * 4);
  RowsRequest req{"user", ids, rows};
  uint64_t version = 99;
  ASSERT_TRUE(client_->PullRows({&req, 1}, &version).ok());
  EXPECT_EQ(version, 0u);
  ExpectNear(rows, Initial(user, ids));

  const int64_t push_ids[] = {7, 3};
  const std::vector<float> grads = {1, 2, 3, 4, -1, -2, -3, -4};
  RowsUpdate up{"user", 4, push_ids, grads};
  ASSERT_TRUE(client_->PushRows(UpdateKind::kGradient, 0.0f, {&up, 1}, &version).ok());
  EXPECT_EQ(version, 1u);
  std::vector<float> want = Initial(user, push_ids);
  for (size_t i = 0; i < want.size(); ++i) want[i] -= 0.5f * grads[i];
  std::vector<float> after(2 * 4);
  RowsRequest again{"user", push_ids, after};
  ASSERT_TRUE(client_->PullRows({&again, 1}, &version).ok());
  ExpectNear(after, want);

  // A delta adds; learning_rate is ignored for it.
  const std::vector<float> delta(4, 1.0f);
  RowsUpdate d{"user", 4, {push_ids, 1}, delta};
  ASSERT_TRUE(client_->PushRows(UpdateKind::kDelta, 0.0f, {&d, 1}, &version).ok());
  EXPECT_EQ(version, 2u);
  for (size_t j = 0; j < 4; ++j) want[j] += 1.0f;
  ASSERT_TRUE(client_->PullRows({&again, 1}, nullptr).ok());
  ExpectNear(after, want);

  // Export: every stored row once, whatever the batch size.
  std::map<int64_t, std::vector<float>> exported;
  uint64_t cursor = 0;
  int batches = 0;
  while (cursor != UINT64_MAX) {
    std::vector<int64_t> eids;
    std::vector<float> evals;
    uint32_t dim = 0;
    ASSERT_TRUE(client_->ExportRows("user", cursor, 1, &eids, &evals, &dim, &cursor).ok());
    EXPECT_EQ(dim, 4u);
    ASSERT_LE(eids.size(), 1u);
    for (size_t i = 0; i < eids.size(); ++i) {
      EXPECT_TRUE(exported
                      .emplace(eids[i], std::vector<float>(evals.begin() + i * 4,
                                                           evals.begin() + (i + 1) * 4))
                      .second);
    }
    ASSERT_LT(++batches, 10);
  }
  ASSERT_EQ(exported.size(), 2u);
  ExpectNear(exported[7], std::vector<float>(want.begin(), want.begin() + 4));
  ExpectNear(exported[3], std::vector<float>(want.begin() + 4, want.end()));

  std::vector<TableInfo> tables;
  ASSERT_TRUE(client_->ListTables(&tables).ok());
  ASSERT_EQ(tables.size(), 1u);
  EXPECT_EQ(tables[0].config.name, "user");
  EXPECT_EQ(tables[0].config.dim, 4u);
  EXPECT_EQ(tables[0].config.optimizer.learning_rate, 0.5f);
  EXPECT_EQ(tables[0].rows, 2u);

  std::vector<StatEntry> stats;
  ASSERT_TRUE(client_->Stats(&stats).ok());
  EXPECT_EQ(Stat(stats, "tables"), 1u);
  EXPECT_EQ(Stat(stats, "table_rows"), 2u);
  EXPECT_EQ(Stat(stats, "table_rows{table=\"user\"}"), 2u);
  EXPECT_GT(Stat(stats, "table_bytes{table=\"user\"}"), 0u);
  EXPECT_EQ(Stat(stats, "rows_pulled"), 3u + 2u + 2u);
  EXPECT_EQ(Stat(stats, "table_rows_pushed{table=\"user\"}"), 3u);
  EXPECT_EQ(Stat(stats, "version"), 2u);
}

TEST_F(TableClientTest, DimMismatchIsRefusedAndTheConnectionStaysUsable) {
  const TableConfig user = Sgd("user", 16);
  ASSERT_TRUE(client_->CreateTables({&user, 1}, nullptr).ok());
  const int64_t ids[] = {1, 2};
  const std::vector<float> grads(2 * 32, 1.0f);
  RowsUpdate up{"user", 32, ids, grads};
  Status s = client_->PushRows(UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("table 'user' has dim 16 on the server, the push carries 32"),
            std::string::npos)
      << s.message();

  std::vector<float> small(2 * 8);
  RowsRequest req{"user", ids, small};
  s = client_->PullRows({&req, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("table 'user' has dim 16"), std::string::npos) << s.message();
  ASSERT_TRUE(client_->connected());

  // A config with another dim for an existing table is refused too.
  const TableConfig wide = Sgd("user", 32);
  s = client_->CreateTables({&wide, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch) << s.ToString();

  std::vector<float> rows(2 * 16);
  RowsRequest ok{"user", ids, rows};
  ASSERT_TRUE(client_->PullRows({&ok, 1}, nullptr).ok());
  ExpectNear(rows, Initial(user, ids));  // nothing was pushed
}

TEST_F(TableClientTest, BadTableInAPushRefusesTheWholeFrame) {
  const TableConfig tables[] = {Sgd("a", 2), Sgd("b", 2)};
  ASSERT_TRUE(client_->CreateTables(tables, nullptr).ok());
  const int64_t ids[] = {1};
  const std::vector<float> two(2, 1.0f), three(3, 1.0f);
  const RowsUpdate ups[] = {{"a", 2, ids, two}, {"b", 3, ids, three}};
  EXPECT_EQ(client_->PushRows(UpdateKind::kDelta, 0.0f, ups, nullptr).code(),
            StatusCode::kShapeMismatch);
  const RowsUpdate missing[] = {{"a", 2, ids, two}, {"nope", 2, ids, two}};
  Status s = client_->PushRows(UpdateKind::kDelta, 0.0f, missing, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("'nope'"), std::string::npos) << s.message();
  std::vector<TableInfo> infos;
  ASSERT_TRUE(client_->ListTables(&infos).ok());
  ASSERT_EQ(infos.size(), 2u);
  EXPECT_EQ(infos[0].rows + infos[1].rows, 0u);
  std::vector<StatEntry> stats;
  ASSERT_TRUE(client_->Stats(&stats).ok());
  EXPECT_EQ(Stat(stats, "version"), 0u);
}

TEST_F(TableClientTest, OutOfRangeIdNamesTableAndIdAndChangesNothing) {
  TableConfig fixed = Sgd("country", 2);
  fixed.vocab = 10;
  ASSERT_TRUE(client_->CreateTables({&fixed, 1}, nullptr).ok());
  const int64_t ids[] = {4, 10};
  std::vector<float> rows(4);
  RowsRequest req{"country", ids, rows};
  Status s = client_->PullRows({&req, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("country"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("10"), std::string::npos) << s.message();
  const std::vector<float> g(4, 1.0f);
  RowsUpdate up{"country", 2, ids, g};
  s = client_->PushRows(UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("country"), std::string::npos) << s.message();
  std::vector<TableInfo> infos;
  ASSERT_TRUE(client_->ListTables(&infos).ok());
  EXPECT_EQ(infos[0].rows, 0u);
}

TEST_F(TableClientTest, FullTableWithEvictionOffIsRefused) {
  TableConfig small = Sgd("small", 2);
  small.capacity = 2;
  ASSERT_TRUE(client_->CreateTables({&small, 1}, nullptr).ok());
  const int64_t two[] = {1, 2};
  const std::vector<float> g2(4, 1.0f);
  RowsUpdate a{"small", 2, two, g2};
  ASSERT_TRUE(client_->PushRows(UpdateKind::kDelta, 0.0f, {&a, 1}, nullptr).ok());
  const int64_t more[] = {3};
  const std::vector<float> g1(2, 1.0f);
  RowsUpdate b{"small", 2, more, g1};
  Status s = client_->PushRows(UpdateKind::kDelta, 0.0f, {&b, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kLimitExceeded);
  EXPECT_NE(s.message().find("small"), std::string::npos) << s.message();
  std::vector<TableInfo> infos;
  ASSERT_TRUE(client_->ListTables(&infos).ok());
  EXPECT_EQ(infos[0].rows, 2u);
}

TEST_F(TableClientTest, UnknownTableAndBadConfigs) {
  const int64_t ids[] = {1};
  std::vector<float> rows(4);
  RowsRequest req{"ghost", ids, rows};
  Status s = client_->PullRows({&req, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find("'ghost'"), std::string::npos) << s.message();
  TableConfig bad = Sgd("bad", 0);
  EXPECT_EQ(client_->CreateTables({&bad, 1}, nullptr).code(), StatusCode::kInvalidArgument);
  std::vector<TableInfo> infos;
  ASSERT_TRUE(client_->ListTables(&infos).ok());
  EXPECT_TRUE(infos.empty());
}

// Two sharded servers against one plain server: the same pushes give the
// same rows, each row lives on ServerOfId's server, results in caller order.
TEST(ShardedTables, RowsLandOnTheirServerAndAnswersMatchOneServer) {
  std::vector<std::unique_ptr<Server>> servers;
  std::vector<Endpoint> endpoints;
  for (int i = 0; i < 2; ++i) {
    servers.push_back(StartServer());
    endpoints.push_back({"127.0.0.1", servers.back()->port()});
  }
  auto single_server = StartServer();
  auto single = ConnectClient(single_server->port());
  std::unique_ptr<ShardedClient> sharded;
  ASSERT_TRUE(ShardedClient::Connect(TestClientOptions(0), endpoints, &sharded).ok());

  const TableConfig user = Sgd("user", 3, 0.25f);
  std::vector<bool> created;
  ASSERT_TRUE(sharded->CreateTables({&user, 1}, &created).ok());
  EXPECT_EQ(created, std::vector<bool>{true});
  ASSERT_TRUE(single->CreateTables({&user, 1}, nullptr).ok());

  std::vector<int64_t> ids(40);
  std::iota(ids.begin(), ids.end(), -10);
  std::reverse(ids.begin(), ids.end());
  std::vector<float> grads(ids.size() * 3);
  for (size_t i = 0; i < grads.size(); ++i) grads[i] = static_cast<float>(i % 7) - 3.0f;
  RowsUpdate up{"user", 3, ids, grads};
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(sharded->PushRows(UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr).ok());
    ASSERT_TRUE(single->PushRows(UpdateKind::kGradient, 0.0f, {&up, 1}, nullptr).ok());
  }

  // Each server stores exactly the ids ServerOfId gives it.
  std::set<int64_t> on[2];
  for (size_t s = 0; s < 2; ++s) {
    auto c = ConnectClient(servers[s]->port());
    uint64_t cursor = 0;
    while (cursor != UINT64_MAX) {
      std::vector<int64_t> eids;
      std::vector<float> evals;
      uint32_t dim = 0;
      ASSERT_TRUE(c->ExportRows("user", cursor, 7, &eids, &evals, &dim, &cursor).ok());
      on[s].insert(eids.begin(), eids.end());
    }
  }
  for (int64_t id : ids) EXPECT_TRUE(on[ServerOfId(id, 2)].count(id)) << id;
  EXPECT_EQ(on[0].size() + on[1].size(), ids.size());
  EXPECT_FALSE(on[0].empty());
  EXPECT_FALSE(on[1].empty());

  // Pulls (with repeats and never-written ids) agree with one server.
  std::vector<int64_t> query = {5, -10, 1000, 5, 29, 0, -3, 777777};
  std::vector<float> a(query.size() * 3), b(query.size() * 3);
  RowsRequest ra{"user", query, a}, rb{"user", query, b};
  ASSERT_TRUE(sharded->PullRows({&ra, 1}, nullptr).ok());
  ASSERT_TRUE(single->PullRows({&rb, 1}, nullptr).ok());
  EXPECT_EQ(a, b);

  std::vector<TableInfo> infos;
  ASSERT_TRUE(sharded->ListTables(&infos).ok());
  ASSERT_EQ(infos.size(), 1u);
  EXPECT_EQ(infos[0].rows, ids.size());

  // The sharded export visits every server in turn.
  size_t total = 0;
  uint64_t cursor = 0;
  while (cursor != UINT64_MAX) {
    std::vector<int64_t> eids;
    std::vector<float> evals;
    uint32_t dim = 0;
    ASSERT_TRUE(sharded->ExportRows("user", cursor, 16, &eids, &evals, &dim, &cursor).ok());
    total += eids.size();
  }
  EXPECT_EQ(total, ids.size());

  // A dim mismatch names the table through the sharded client too.
  std::vector<float> wrong(query.size() * 2);
  RowsRequest rw{"user", query, wrong};
  Status s = sharded->PullRows({&rw, 1}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("'user'"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace tensorspark::testing
