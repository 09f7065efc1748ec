#include "storage/table_snapshot.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <random>

#include "test_util.h"

namespace tensorspark::storage {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TableConfig Table(const std::string& name, RowOptimizerKind kind, uint32_t dim = 4) {
  TableConfig c;
  c.name = name;
  c.dim = dim;
  c.seed = 7;
  c.optimizer.kind = kind;
  c.optimizer.learning_rate = 0.05f;
  return c;
}

// A row as compared after a restore: everything that a later push reads.
struct Row {
  std::vector<float> values, slots;
  uint32_t step = 0;
  bool operator==(const Row&) const = default;
};
using Rows = std::map<int64_t, Row>;

Rows Dump(const SparseTable& t) {
  Rows out;
  t.ForEachRow(0, [&](const RowView& r) {
    out[r.id] = {{r.values.begin(), r.values.end()}, {r.slots.begin(), r.slots.end()}, r.step};
  });
  return out;
}

std::map<std::string, Rows> DumpAll(const TableStore& store) {
  std::vector<SparseTable*> all;
  store.All(&all);
  std::map<std::string, Rows> out;
  for (const SparseTable* t : all) out[t->config().name] = Dump(*t);
  return out;
}

SparseTable* Get(const TableStore& store, const std::string& name) {
  SparseTable* t = nullptr;
  EXPECT_TRUE(store.Lookup(name, &t).ok()) << name;
  return t;
}

// Gradient pushes of random values to random unique ids in [0, range).
struct Pushes {
  struct One {
    std::string table;
    std::vector<int64_t> ids;
    std::vector<float> grads;
  };
  std::vector<One> pushes;

  static Pushes Random(const TableStore& store, uint32_t seed, int count, int64_t range) {
    std::mt19937_64 rng(seed);
    std::vector<SparseTable*> all;
    store.All(&all);
    Pushes p;
    for (int i = 0; i < count; ++i) {
      const SparseTable* t = all[rng() % all.size()];
      One one;
      one.table = t->config().name;
      std::vector<int64_t> ids;
      for (int k = 0; k < 16; ++k) ids.push_back(static_cast<int64_t>(rng() % range));
      std::sort(ids.begin(), ids.end());
      ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
      std::uniform_real_distribution<float> g(-1.0f, 1.0f);
      one.ids = ids;
      for (size_t k = 0; k < ids.size() * t->config().dim; ++k) one.grads.push_back(g(rng));
      p.pushes.push_back(std::move(one));
    }
    return p;
  }

  void ApplyTo(const TableStore& store) const {
    for (const One& one : pushes) {
      ASSERT_TRUE(
          Get(store, one.table)->Push(UpdateKind::kGradient, 0.0f, one.ids, one.grads.data()).ok());
    }
  }
};

void MakeTables(TableStore* store) {
  for (auto [name, kind] :
       {std::pair{"adam", RowOptimizerKind::kAdam},
        std::pair{"adagrad", RowOptimizerKind::kAdagrad},
        std::pair{"ftrl", RowOptimizerKind::kFtrl}, std::pair{"sgd", RowOptimizerKind::kSgd}}) {
    TableConfig c = Table(name, kind);
    if (kind == RowOptimizerKind::kFtrl) c.optimizer.l1 = 0.001f;
    ASSERT_TRUE(store->CreateOrCheck(c, nullptr).ok());
  }
}

// Reads the newest valid snapshot of `dir` into fresh stores.
void Load(const std::string& path, ParamStore* params, TableStore* tables,
          std::string* chosen = nullptr) {
  SnapshotData data;
  std::string file;
  std::vector<std::string> skipped;
  Status s = LoadSnapshot(path, &data, &file, &skipped);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(RestoreSnapshot(std::move(data), params).ok());
  s = RestoreTables(std::move(data.tables), tables);
  ASSERT_TRUE(s.ok()) << s.ToString();
  if (chosen != nullptr) *chosen = file;
}

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::string> ChainFiles(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    uint64_t seq;
    if (ParseTableFileName(e.path().filename().string(), &seq)) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(TableSnapshotTest, ResumeContinuesBitForBit) {
  TempDir dir;
  ParamStore params_a(100);
  TableStore a;
  MakeTables(&a);
  Pushes::Random(a, 1, 60, 200).ApplyTo(a);
  TableChainState chain;
  WrittenSnapshot info;
  Status s = WriteSnapshotWithTables(params_a, &a, dir.path(), &chain, &info);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(info.tables, 4u);
  EXPECT_EQ(info.full_images, 4u);
  const Pushes later = Pushes::Random(a, 2, 60, 300);
  later.ApplyTo(a);

  ParamStore params_b(100);
  TableStore b;
  Load(dir.path(), &params_b, &b);
  later.ApplyTo(b);
  const auto rows_a = DumpAll(a), rows_b = DumpAll(b);
  ASSERT_EQ(rows_a.size(), 4u);
  for (const auto& [name, rows] : rows_a) {
    ASSERT_FALSE(rows.empty()) << name;
    EXPECT_TRUE(rows == rows_b.at(name)) << "table " << name << " differs after resume";
  }
  EXPECT_EQ(Get(b, "adam")->config().optimizer.kind, RowOptimizerKind::kAdam);
  EXPECT_EQ(Get(b, "ftrl")->config().optimizer.l1, 0.001f);
}

TEST(TableSnapshotTest, IncrementsChainRestoresExactly) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  MakeTables(&a);
  TableChainState chain;
  std::vector<std::map<std::string, Rows>> states;
  std::vector<WrittenSnapshot> infos;
  for (int i = 0; i < 3; ++i) {
    Pushes::Random(a, 10 + i, 20, 1000).ApplyTo(a);
    WrittenSnapshot info;
    // Tagged: the dense version stays 0, and each needs its own name.
    ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &info, i + 1).ok());
    states.push_back(DumpAll(a));
    infos.push_back(info);
  }
  EXPECT_EQ(infos[0].full_images, 4u);
  EXPECT_EQ(infos[1].full_images, 0u);
  EXPECT_EQ(infos[2].full_images, 0u);
  // Increments hold only the changed rows: 20 pushes of <= 16 ids.
  EXPECT_LE(infos[2].table_rows, 320u);
  EXPECT_LT(infos[2].table_rows, infos[0].table_rows + infos[1].table_rows);
  EXPECT_EQ(ChainFiles(dir.path()).size(), 3u);

  // Every snapshot of the chain restores its own moment.
  for (int i = 0; i < 3; ++i) {
    ParamStore p(100);
    TableStore b;
    Load(infos[i].path, &p, &b);
    EXPECT_TRUE(DumpAll(b) == states[i]) << "snapshot " << i;
  }
}

TEST(TableSnapshotTest, EvictedRowStaysRemoved) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  TableConfig c = Table("lru", RowOptimizerKind::kAdagrad);
  c.capacity = 8;
  c.eviction = EvictionPolicy::kLru;
  ASSERT_TRUE(a.CreateOrCheck(c, nullptr).ok());
  SparseTable* t = Get(a, "lru");
  std::vector<float> g(4, 0.5f);
  for (int64_t id = 0; id < 8; ++id) {
    ASSERT_TRUE(t->Push(UpdateKind::kGradient, 0.0f, std::span(&id, 1), g.data()).ok());
  }
  TableChainState chain;
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &info).ok());
  ASSERT_EQ(Dump(*t).size(), 8u);
  // Full: each new id evicts one of the old ones.
  for (int64_t id = 100; id < 104; ++id) {
    ASSERT_TRUE(t->Push(UpdateKind::kGradient, 0.0f, std::span(&id, 1), g.data()).ok());
  }
  const Rows now = Dump(*t);
  ASSERT_EQ(now.size(), 8u);
  ASSERT_GE(t->Stats().evictions, 4u);
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &info).ok());
  EXPECT_EQ(info.full_images, 0u);

  ParamStore p(100);
  TableStore b;
  Load(dir.path(), &p, &b);
  const Rows restored = Dump(*Get(b, "lru"));
  EXPECT_TRUE(restored == now);
  for (int64_t id = 0; id < 8; ++id) {
    EXPECT_EQ(restored.contains(id), now.contains(id)) << "id " << id;
  }
}

TEST(TableSnapshotTest, CorruptIncrementFallsBackNamingFileAndRecord) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  MakeTables(&a);
  TableChainState chain;
  WrittenSnapshot first, second;
  Pushes::Random(a, 3, 20, 100).ApplyTo(a);
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &first).ok());
  const auto at_first = DumpAll(a);
  Pushes::Random(a, 4, 20, 100).ApplyTo(a);
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &second, /*tag=*/5).ok());
  ASSERT_NE(first.path, second.path);
  ASSERT_EQ(second.full_images, 0u);

  // Flip a byte inside the increment's first row batch.
  std::vector<uint8_t> bytes = ReadBytes(second.table_file);
  ASSERT_GT(bytes.size(), 200u);
  bytes[120] ^= 0x40;
  WriteBytes(second.table_file, bytes);

  SnapshotData data;
  Status s = ReadSnapshot(second.path, &data);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), second.path)) << s.message();
  EXPECT_TRUE(Contains(s.message(), second.table_file)) << s.message();
  EXPECT_TRUE(Contains(s.message(), "checksum mismatch (record")) << s.message();

  ParamStore p(100);
  TableStore b;
  std::string chosen;
  std::vector<std::string> skipped;
  ASSERT_TRUE(LoadSnapshot(dir.path(), &data, &chosen, &skipped).ok());
  EXPECT_EQ(chosen, first.path);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_TRUE(Contains(skipped[0], second.table_file)) << skipped[0];
  ASSERT_TRUE(RestoreTables(std::move(data.tables), &b).ok());
  EXPECT_TRUE(DumpAll(b) == at_first);

  // The tag's snapshot is not valid any more; its cheap check still passes
  // (same size), RESTORE's full read catches it.
  s = LoadTaggedSnapshot(dir.path(), 5, &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);

  // A missing chain file fails the cheap check as well.
  fs::remove(second.table_file);
  SnapshotHeader h;
  s = ReadSnapshotHeader(second.path, &h);
  EXPECT_FALSE(s.ok());
  EXPECT_TRUE(Contains(s.message(), second.table_file)) << s.message();
}

TEST(TableSnapshotTest, EveryFlippedByteAndCutOfAChainFileIsDetected) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  ASSERT_TRUE(a.CreateOrCheck(Table("t", RowOptimizerKind::kAdagrad, 2), nullptr).ok());
  std::vector<int64_t> ids = {1, 5, 9};
  std::vector<float> g = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  ASSERT_TRUE(Get(a, "t")->Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
  TableChainState chain;
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &info).ok());
  const std::vector<uint8_t> good = ReadBytes(info.table_file);
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  for (size_t i = 0; i < good.size(); ++i) {
    std::vector<uint8_t> bad = good;
    bad[i] ^= 0x01;
    WriteBytes(info.table_file, bad);
    Status s = ReadSnapshot(info.path, &data);
    ASSERT_FALSE(s.ok()) << "flipped byte " << i;
    ASSERT_TRUE(Contains(s.message(), info.table_file)) << s.message();
  }
  for (size_t n = 0; n < good.size(); ++n) {
    WriteBytes(info.table_file, std::vector<uint8_t>(good.begin(), good.begin() + n));
    ASSERT_FALSE(ReadSnapshot(info.path, &data).ok()) << "cut at " << n;
  }
  WriteBytes(info.table_file, good);
  EXPECT_TRUE(ReadSnapshot(info.path, &data).ok());
}

TEST(TableSnapshotTest, PruneKeepsEveryFileAChainNeeds) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  MakeTables(&a);
  TableChainState chain;
  std::vector<WrittenSnapshot> infos;
  std::map<std::string, Rows> last;
  for (int i = 0; i < 12; ++i) {
    // Few repeated ids: no table reaches the "increments exceed rows" rule.
    Pushes::Random(a, 20 + i, 5, 1'000'000).ApplyTo(a);
    WrittenSnapshot info;
    ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &info, i + 1).ok());
    std::vector<std::string> removed;
    ASSERT_TRUE(PruneSnapshots(dir.path(), 2, &removed, info.path).ok());
    infos.push_back(info);
    last = DumpAll(a);
    // The two kept snapshots (both tagged) read back completely.
    std::vector<SnapshotFile> files;
    ASSERT_TRUE(ListSnapshotFiles(dir.path(), &files).ok());
    ASSERT_EQ(files.size(), std::min(i + 1, 2));
    for (const SnapshotFile& f : files) {
      SnapshotData data;
      Status s = ReadSnapshot(f.path, &data);
      EXPECT_TRUE(s.ok()) << "after snapshot " << i << ": " << s.ToString();
    }
    // A chain is at most kTableFullEvery files, plus the older kept one's.
    EXPECT_LE(ChainFiles(dir.path()).size(), kTableFullEvery + 1) << i;
  }
  // Snapshot 9 (index 8) starts a new full image: the first chain is gone.
  EXPECT_EQ(infos[kTableFullEvery].full_images, 4u);
  EXPECT_FALSE(fs::exists(infos[0].table_file));
  ParamStore p(100);
  TableStore b;
  Load(dir.path(), &p, &b);
  EXPECT_TRUE(DumpAll(b) == last);

  // RemoveSnapshotsNewerThan drops the newer snapshot and its increment,
  // and keeps the chain of the one kept.
  std::vector<std::string> removed;
  ASSERT_TRUE(RemoveSnapshotsNewerThan(dir.path(), infos[10].version, 11, &removed).ok());
  EXPECT_FALSE(fs::exists(infos[11].path));
  EXPECT_FALSE(fs::exists(infos[11].table_file));
  SnapshotData data;
  EXPECT_TRUE(ReadSnapshot(infos[10].path, &data).ok());
}

TEST(TableSnapshotTest, FilesWithoutTablesStillLoad) {
  TempDir dir;
  ParamStore params(100);
  std::vector<uint8_t> created;
  std::vector<float> init(6, 0.25f);
  const std::vector<int64_t> shape = {2, 3};
  RegisterItem items[] = {{"w", shape, init.data()}};
  ASSERT_TRUE(params.Register(items, &created).ok());
  TableStore none;
  TableChainState chain;
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshotWithTables(params, &none, dir.path(), &chain, &info).ok());
  EXPECT_TRUE(info.table_file.empty());
  SnapshotHeader h;
  ASSERT_TRUE(ReadSnapshotHeader(info.path, &h).ok());
  EXPECT_EQ(h.format, kSnapshotFormatVersion);  // format 2, as before tables
  EXPECT_TRUE(ChainFiles(dir.path()).empty());

  // A format-2 snapshot restored over a server with tables leaves none.
  TableStore b;
  MakeTables(&b);
  ParamStore p(100);
  Load(info.path, &p, &b);
  EXPECT_EQ(b.size(), 0u);
  std::vector<Variable*> vars;
  p.All(&vars);
  EXPECT_EQ(vars.size(), 1u);

  // With a table the file is format 3 and holds the dense variables too.
  TableStore one;
  ASSERT_TRUE(one.CreateOrCheck(Table("t", RowOptimizerKind::kSgd), nullptr).ok());
  ASSERT_TRUE(WriteSnapshotWithTables(params, &one, dir.path(), &chain, &info).ok());
  ASSERT_TRUE(ReadSnapshotHeader(info.path, &h).ok());
  EXPECT_EQ(h.format, kSnapshotFormatTables);
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  EXPECT_TRUE(data.has_tables);
  ASSERT_EQ(data.variables.size(), 1u);
  EXPECT_EQ(data.variables[0].values, init);
  ASSERT_EQ(data.tables.size(), 1u);
  EXPECT_TRUE(data.tables[0].rows.empty());
}

TEST(TableSnapshotTest, IncrementOfAMillionRowTableIsSmall) {
  TempDir dir;
  ParamStore params(100);
  TableStore a;
  ASSERT_TRUE(a.CreateOrCheck(Table("big", RowOptimizerKind::kSgd, 4), nullptr).ok());
  SparseTable* t = Get(a, "big");
  constexpr int64_t kRows = 1'000'000, kBatch = 100'000;
  std::vector<int64_t> ids(kBatch);
  std::vector<float> deltas(kBatch * 4, 0.125f);
  for (int64_t start = 0; start < kRows; start += kBatch) {
    for (int64_t i = 0; i < kBatch; ++i) ids[i] = start + i;
    ASSERT_TRUE(t->Push(UpdateKind::kDelta, 0.0f, ids, deltas.data()).ok());
  }
  ASSERT_EQ(t->Stats().rows, static_cast<uint64_t>(kRows));
  TableChainState chain;
  WrittenSnapshot full, inc;
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &full).ok());
  EXPECT_EQ(full.table_rows, static_cast<uint64_t>(kRows));
  std::vector<int64_t> touched;
  for (int64_t i = 0; i < 1000; ++i) touched.push_back(i * 997);
  ASSERT_TRUE(t->Push(UpdateKind::kDelta, 0.0f, touched, deltas.data()).ok());
  ASSERT_TRUE(WriteSnapshotWithTables(params, &a, dir.path(), &chain, &inc).ok());
  EXPECT_EQ(inc.full_images, 0u);
  EXPECT_EQ(inc.table_rows, 1000u);
  EXPECT_GT(full.table_file_bytes, 40u * kRows);
  EXPECT_LT(inc.table_file_bytes * 500, full.table_file_bytes)
      << "increment " << inc.table_file_bytes << " bytes, full image " << full.table_file_bytes;
  std::printf(
      "[ figures ] 1M-row dim-4 table: full image %llu bytes, increment of 1000 rows "
      "%llu bytes\n",
      static_cast<unsigned long long>(full.table_file_bytes),
      static_cast<unsigned long long>(inc.table_file_bytes));
}

}  // namespace
}  // namespace tensorspark::storage
