// Sparse tables through the server's snapshots: resume_from, RESTORE(tag)
// and the final snapshot of Stop(), with tables created and trained
// through the real client.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "storage/snapshot.h"
#include "storage/table_snapshot.h"
#include "tensorspark/server.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using testing::ConnectClient;
using testing::StartServer;
using testing::TempDir;
using testing::TestServerOptions;

constexpr uint32_t kDim = 8;
constexpr int64_t kIds = 400;

std::vector<TableConfig> Tables() {
  TableConfig adam;
  adam.name = "user";
  adam.dim = kDim;
  adam.seed = 11;
  adam.optimizer.kind = RowOptimizerKind::kAdam;
  adam.optimizer.learning_rate = 0.01f;
  TableConfig ftrl = adam;
  ftrl.name = "item";
  ftrl.vocab = kIds;
  ftrl.optimizer.kind = RowOptimizerKind::kFtrl;
  ftrl.optimizer.l1 = 0.001f;
  return {adam, ftrl};
}

// `count` gradient pushes to both tables, each of 32 unique ids.
void Train(Client* c, uint32_t seed, int count) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> g(-1.0f, 1.0f);
  for (int i = 0; i < count; ++i) {
    std::vector<int64_t> ids(kIds);
    for (int64_t k = 0; k < kIds; ++k) ids[k] = k;
    std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(32);
    std::vector<float> grads(ids.size() * kDim);
    for (float& v : grads) v = g(rng);
    RowsUpdate ups[] = {{"user", kDim, ids, grads}, {"item", kDim, ids, grads}};
    Status s = c->PushRows(UpdateKind::kGradient, 0.0f, ups, nullptr);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
}

// Every row of both tables, ids 0..kIds-1.
std::vector<float> PullAll(Client* c, const std::string& table) {
  std::vector<int64_t> ids(kIds);
  for (int64_t k = 0; k < kIds; ++k) ids[k] = k;
  std::vector<float> out(ids.size() * kDim);
  RowsRequest req{table, ids, out};
  Status s = c->PullRows({&req, 1}, nullptr);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

ServerOptions WithDir(const std::string& dir, const std::string& resume = "") {
  ServerOptions o = TestServerOptions();
  o.snapshot_dir = dir;
  o.resume_from = resume;
  return o;
}

TEST(TableSnapshotServerTest, ResumeFromDirectoryContinuesBitForBit) {
  TempDir dir;
  auto a = StartServer(WithDir(dir.path()));
  ASSERT_NE(a, nullptr);
  auto ca = ConnectClient(a->port());
  ASSERT_TRUE(ca->CreateTables(Tables(), nullptr).ok());
  Train(ca.get(), 1, 20);
  std::string first;
  ASSERT_TRUE(a->Snapshot(&first).ok());
  Train(ca.get(), 2, 10);  // an increment
  std::string second;
  ASSERT_TRUE(a->Snapshot(&second).ok());
  ASSERT_NE(first, second);

  // B resumes from the directory, so from the increment on the full image.
  auto b = StartServer(WithDir(dir.path() + "/b", dir.path()));
  ASSERT_NE(b, nullptr);
  auto cb = ConnectClient(b->port());
  for (const char* t : {"user", "item"}) {
    EXPECT_EQ(PullAll(ca.get(), t), PullAll(cb.get(), t)) << t << " right after resume";
  }
  // The same later pushes give the same rows: slots and steps came back.
  Train(ca.get(), 3, 15);
  Train(cb.get(), 3, 15);
  for (const char* t : {"user", "item"}) {
    EXPECT_EQ(PullAll(ca.get(), t), PullAll(cb.get(), t)) << t << " after more pushes";
  }
  // A table of another dim is refused as before: the config came back too.
  TableConfig wrong = Tables()[0];
  wrong.dim = 4;
  EXPECT_EQ(cb->CreateTables({&wrong, 1}, nullptr).code(), StatusCode::kShapeMismatch);
}

TEST(TableSnapshotServerTest, RestoreTagReplacesTablesAndStopSavesThem) {
  TempDir dir;
  auto a = StartServer(WithDir(dir.path()));
  ASSERT_NE(a, nullptr);
  auto c = ConnectClient(a->port());
  ASSERT_TRUE(c->CreateTables(Tables(), nullptr).ok());
  Train(c.get(), 5, 10);
  std::string name;
  uint64_t version = 0;
  ASSERT_TRUE(c->Snapshot(1, &name, &version).ok());
  const std::vector<float> user_at_1 = PullAll(c.get(), "user");
  Train(c.get(), 6, 10);
  TableConfig extra = Tables()[0];
  extra.name = "later";
  ASSERT_TRUE(c->CreateTables({&extra, 1}, nullptr).ok());
  ASSERT_TRUE(c->Snapshot(2, &name, &version).ok());

  // Back to tag 1 over the used server: rows as then, the later table gone.
  uint64_t restored = 0;
  Status s = c->Restore(1, &restored);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(PullAll(c.get(), "user"), user_at_1);
  std::vector<float> out(kDim);
  int64_t id = 0;
  RowsRequest req{"later", {&id, 1}, out};
  EXPECT_EQ(c->PullRows({&req, 1}, nullptr).code(), StatusCode::kNotFound);

  // Training on, then Stop() writes the final snapshot (a full image
  // after the restore), which a new server resumes from.
  Train(c.get(), 7, 10);
  const std::vector<float> user_final = PullAll(c.get(), "user");
  const std::vector<float> item_final = PullAll(c.get(), "item");
  c.reset();
  a->Stop();
  auto b = StartServer(WithDir(dir.path() + "/b", dir.path()));
  ASSERT_NE(b, nullptr);
  auto cb = ConnectClient(b->port());
  EXPECT_EQ(PullAll(cb.get(), "user"), user_final);
  EXPECT_EQ(PullAll(cb.get(), "item"), item_final);

  // Every chain file left is one that a kept snapshot needs.
  std::vector<storage::SnapshotFile> files;
  ASSERT_TRUE(storage::ListSnapshotFiles(dir.path(), &files).ok());
  for (const storage::SnapshotFile& f : files) {
    storage::SnapshotData data;
    Status r = storage::ReadSnapshot(f.path, &data);
    EXPECT_TRUE(r.ok()) << r.ToString();
  }
}

TEST(TableSnapshotServerTest, ACreatedTableAloneIsSavedAtStop) {
  TempDir dir;
  auto a = StartServer(WithDir(dir.path()));
  ASSERT_NE(a, nullptr);
  auto c = ConnectClient(a->port());
  ASSERT_TRUE(c->CreateTables(Tables(), nullptr).ok());
  c.reset();
  a->Stop();
  auto b = StartServer(WithDir(dir.path() + "/b", dir.path()));
  ASSERT_NE(b, nullptr);
  auto cb = ConnectClient(b->port());
  TableConfig wrong = Tables()[1];
  wrong.dim = 4;
  EXPECT_EQ(cb->CreateTables({&wrong, 1}, nullptr).code(), StatusCode::kShapeMismatch);
}

}  // namespace
}  // namespace tensorspark
