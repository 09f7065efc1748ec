#include "storage/snapshot.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <thread>

#include "test_util.h"

namespace tensorspark::storage {
namespace {

using testing::TempDir;

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

OptimizerConfig Config(OptimizerKind kind, float lr) {
  OptimizerConfig c;
  c.kind = kind;
  c.learning_rate = lr;
  c.initial_accumulator = 0.1f;
  c.weight_decay = 0.01f;
  return c;
}

// Registers `name` with values 0.01 * i - 0.3 (ramp) or zeros.
void Register(ParamStore* store, const std::string& name, std::vector<int64_t> shape,
              bool ramp = true) {
  uint64_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<uint64_t>(d);
  std::vector<float> init(numel);
  for (uint64_t i = 0; ramp && i < numel; ++i) init[i] = 0.01f * static_cast<float>(i) - 0.3f;
  std::vector<uint8_t> created;
  RegisterItem items[] = {{name, shape, init.data()}};
  ASSERT_TRUE(store->Register(items, &created).ok());
}

void SetOpt(ParamStore* store, const OptimizerConfig& c, std::string_view name) {
  std::string_view names[] = {name};
  ASSERT_TRUE(store->SetOptimizer(c, names).ok());
}

// One push of random values to every variable of `store`: a gradient push
// to those with an optimizer, a delta push to the others.
void PushGradients(ParamStore* store, uint32_t seed) {
  std::vector<Variable*> vars;
  store->All(&vars);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<std::vector<float>> grads;
  std::vector<PushItem> gradient_items, delta_items;
  grads.reserve(vars.size());
  for (Variable* v : vars) {
    grads.emplace_back(v->numel());
    for (float& g : grads.back()) g = dist(rng);
    PushItem item{v->name(), v->shape(), grads.back().data(), v->numel()};
    bool has_opt;
    {
      std::shared_lock lock(v->mu());
      has_opt = v->optimizer().has_value();
    }
    (has_opt ? gradient_items : delta_items).push_back(item);
  }
  uint64_t version;
  if (!gradient_items.empty()) ASSERT_TRUE(store->Push(3, {}, gradient_items, &version).ok());
  if (!delta_items.empty()) ASSERT_TRUE(store->Push(2, {}, delta_items, &version).ok());
}

bool SameBits(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

void ExpectSameConfig(const std::optional<OptimizerConfig>& a,
                      const std::optional<OptimizerConfig>& b) {
  ASSERT_EQ(a.has_value(), b.has_value());
  if (!a) return;
  EXPECT_EQ(a->kind, b->kind);
  EXPECT_TRUE(SameBits(a->learning_rate, b->learning_rate));
  EXPECT_TRUE(SameBits(a->beta1, b->beta1));
  EXPECT_TRUE(SameBits(a->beta2, b->beta2));
  EXPECT_TRUE(SameBits(a->epsilon, b->epsilon));
  EXPECT_TRUE(SameBits(a->weight_decay, b->weight_decay));
  EXPECT_TRUE(SameBits(a->initial_accumulator, b->initial_accumulator));
}

// Every variable in both stores has the same state, bit for bit.
void ExpectSameState(const ParamStore& a, const ParamStore& b) {
  EXPECT_EQ(a.version(), b.version());
  std::vector<Variable*> va, vb;
  a.All(&va);
  b.All(&vb);
  ASSERT_EQ(va.size(), vb.size());
  for (size_t i = 0; i < va.size(); ++i) {
    VariableState x, y;
    va[i]->CopyState(&x);
    vb[i]->CopyState(&y);
    SCOPED_TRACE(x.name);
    EXPECT_EQ(x.name, y.name);
    EXPECT_EQ(x.shape, y.shape);
    ASSERT_EQ(x.values.size(), y.values.size());
    EXPECT_EQ(std::memcmp(x.values.data(), y.values.data(), x.values.size() * 4), 0);
    EXPECT_EQ(va[i]->crc(), vb[i]->crc());
    ExpectSameConfig(x.optimizer, y.optimizer);
    EXPECT_EQ(x.slots_ready, y.slots_ready);
    EXPECT_EQ(x.step, y.step);
    for (int s = 0; s < optimizers::kMaxSlots; ++s) {
      ASSERT_EQ(x.slots[s].size(), y.slots[s].size()) << "slot " << s;
      EXPECT_EQ(std::memcmp(x.slots[s].data(), y.slots[s].data(), x.slots[s].size() * 4), 0);
    }
  }
  ExpectSameConfig(a.default_optimizer(), b.default_optimizer());
}

// A store with every kind of optimizer state: Adam/AdamW slots and step,
// one-slot optimizers, SGD, no optimizer, and an optimizer whose slots are
// not allocated yet.
void FillStore(ParamStore* store) {
  ASSERT_TRUE(store->SetOptimizer(Config(OptimizerKind::kAdam, 0.01f), {}).ok());  // default
  Register(store, "w", {3, 4});
  Register(store, "adamw", {7});
  Register(store, "momentum", {5});
  Register(store, "nesterov", {2, 2});
  Register(store, "adagrad", {6});
  Register(store, "rmsprop", {3});
  Register(store, "sgd", {4});
  Register(store, "scalar", {});
  Register(store, "empty", {0, 3});
  SetOpt(store, Config(OptimizerKind::kAdamW, 0.02f), "adamw");
  SetOpt(store, Config(OptimizerKind::kMomentum, 0.1f), "momentum");
  SetOpt(store, Config(OptimizerKind::kNesterov, 0.1f), "nesterov");
  SetOpt(store, Config(OptimizerKind::kAdagrad, 0.1f), "adagrad");
  SetOpt(store, Config(OptimizerKind::kRmsProp, 0.01f), "rmsprop");
  SetOpt(store, Config(OptimizerKind::kSgd, 0.1f), "sgd");
  for (uint32_t seed = 1; seed <= 3; ++seed) PushGradients(store, seed);
  // The default optimizer, with no slots until its first gradient push.
  // (Variables without any optimizer: RoundTripWithoutOptimizers.)
  Register(store, "late", {8});
}

TEST(SnapshotTest, FileNames) {
  EXPECT_EQ(SnapshotFileName(42), "snapshot-00000000000000000042.tsnap");
  EXPECT_EQ(SnapshotFileName(UINT64_MAX), "snapshot-18446744073709551615.tsnap");
  uint64_t v = 0;
  EXPECT_TRUE(ParseSnapshotFileName("snapshot-00000000000000000042.tsnap", &v));
  EXPECT_EQ(v, 42u);
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-42.tsnap", &v));
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-99999999999999999999.tsnap", &v));  // > 2^64
  EXPECT_FALSE(ParseSnapshotFileName(".snapshot-00000000000000000042.tmp", &v));
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-0000000000000000004x.tsnap", &v));
}

TEST(SnapshotTest, RoundTripRestoresEveryBitAndTheNextStepMatches) {
  TempDir dir;
  ParamStore a(100);
  FillStore(&a);
  WrittenSnapshot info;
  Status s = WriteSnapshot(a, dir.path(), &info);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(info.path, dir.Sub(SnapshotFileName(a.version())));
  EXPECT_EQ(info.version, a.version());
  EXPECT_EQ(info.generation, a.generation());
  EXPECT_EQ(info.variables, 10u);
  EXPECT_EQ(info.bytes, std::filesystem::file_size(info.path));
  // Nothing else is left in the directory (the temporary file was renamed).
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1);

  SnapshotData data;
  s = ReadSnapshot(info.path, &data);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(data.version, a.version());
  EXPECT_GT(data.created_unix_ms, 1'600'000'000'000u);
  ASSERT_EQ(data.variables.size(), 10u);
  EXPECT_EQ(data.variables[0].name, "w");
  EXPECT_EQ(data.variables[0].step, 3u);
  EXPECT_EQ(data.variables[0].slots[1].size(), 12u);  // Adam's v
  EXPECT_FALSE(data.variables.back().slots_ready);    // "late": no gradient yet

  ParamStore b(100);
  s = RestoreSnapshot(std::move(data), &b);
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectSameState(a, b);
  EXPECT_EQ(b.num_parameters(), a.num_parameters());

  // The next steps are bit-identical, also for a variable registered later
  // (it gets the restored default optimizer).
  for (ParamStore* st : {&a, &b}) {
    PushGradients(st, 7);
    Register(st, "later", {3});
    PushGradients(st, 8);
  }
  ExpectSameState(a, b);
}

TEST(SnapshotTest, RoundTripWithoutOptimizers) {
  TempDir dir;
  ParamStore a(10);
  Register(&a, "plain", {2, 3});
  PushGradients(&a, 1);  // delta pushes
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  EXPECT_FALSE(data.default_optimizer.has_value());
  ASSERT_EQ(data.variables.size(), 1u);
  EXPECT_FALSE(data.variables[0].optimizer.has_value());
  ParamStore b(10);
  ASSERT_TRUE(RestoreSnapshot(std::move(data), &b).ok());
  ExpectSameState(a, b);
  EXPECT_EQ(b.version(), 1u);
}

TEST(SnapshotTest, EmptyStoreRoundTrips) {
  TempDir dir;
  ParamStore a(10);
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  EXPECT_EQ(info.bytes, kSnapshotHeaderSize + kSnapshotTrailerSize);
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  EXPECT_TRUE(data.variables.empty());
}

TEST(SnapshotTest, RestoreNeedsAnEmptyStoreAndRespectsMaxVariables) {
  TempDir dir;
  ParamStore a(10);
  Register(&a, "x", {2});
  Register(&a, "y", {2});
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  SnapshotData copy = data;

  ParamStore busy(10);
  Register(&busy, "z", {1});
  Status s = RestoreSnapshot(std::move(data), &busy);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(busy.num_variables(), 1u);

  ParamStore small(1);
  s = RestoreSnapshot(std::move(copy), &small);
  EXPECT_EQ(s.code(), StatusCode::kLimitExceeded) << s.ToString();
  EXPECT_EQ(small.num_variables(), 0u);
}

TEST(SnapshotTest, PruneKeepsTheNewest) {
  TempDir dir;
  ParamStore a(10);
  Register(&a, "x", {4});
  for (int i = 0; i < 5; ++i) {
    PushGradients(&a, i);
    WrittenSnapshot info;
    ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  }
  // A write cut short by a crash, and a file that is not ours.
  WriteBytes(dir.Sub(".snapshot-00000000000000000002.tmp"), std::vector<uint8_t>(10));
  WriteBytes(dir.Sub("notes.txt"), std::vector<uint8_t>(3));

  std::vector<std::string> removed;
  ASSERT_TRUE(PruneSnapshots(dir.path(), 0, &removed).ok());  // keep all (only the tmp goes)
  EXPECT_EQ(removed, std::vector<std::string>{dir.Sub(".snapshot-00000000000000000002.tmp")});
  ASSERT_TRUE(PruneSnapshots(dir.path(), 3, &removed).ok());
  EXPECT_EQ(removed.size(), 2u);
  std::vector<std::pair<uint64_t, std::string>> files;
  ASSERT_TRUE(ListSnapshots(dir.path(), &files).ok());
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files[0], std::make_pair(uint64_t{5}, dir.Sub(SnapshotFileName(5))));
  EXPECT_EQ(files[1].first, 4u);
  EXPECT_EQ(files[2].first, 3u);
  EXPECT_TRUE(std::filesystem::exists(dir.Sub("notes.txt")));

  // The file just written is kept even when newer ones exist (after a
  // resume from an older snapshot), and counts among the kept.
  const std::string older = dir.Sub(SnapshotFileName(1));
  WriteBytes(older, std::vector<uint8_t>(1));
  ASSERT_TRUE(PruneSnapshots(dir.path(), 2, &removed, older).ok());
  EXPECT_EQ(removed,
            (std::vector<std::string>{dir.Sub(SnapshotFileName(4)), dir.Sub(SnapshotFileName(3))}));
  ASSERT_TRUE(ListSnapshots(dir.path(), &files).ok());
  ASSERT_EQ(files.size(), 2u);  // 5 and 1
  ASSERT_TRUE(PruneSnapshots(dir.path(), 1, &removed, older).ok());
  ASSERT_TRUE(ListSnapshots(dir.path(), &files).ok());
  ASSERT_EQ(files.size(), 1u);
  EXPECT_EQ(files[0].second, older);
}

// A small snapshot with Adam slots, as bytes.
std::vector<uint8_t> SmallSnapshot(const TempDir& dir, std::string* path) {
  ParamStore a(10);
  EXPECT_TRUE(a.SetOptimizer(Config(OptimizerKind::kAdam, 0.01f), {}).ok());
  Register(&a, "w", {2, 3});
  Register(&a, "b", {3});
  PushGradients(&a, 1);
  WrittenSnapshot info;
  EXPECT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  *path = info.path;
  return ReadBytes(info.path);
}

TEST(SnapshotTest, EveryTruncationIsDetected) {
  TempDir dir;
  std::string path;
  const std::vector<uint8_t> bytes = SmallSnapshot(dir, &path);
  const std::string cut = dir.Sub("cut.tsnap");
  for (size_t len = 0; len < bytes.size(); ++len) {
    WriteBytes(cut, std::span(bytes).first(len));
    SnapshotData data;
    Status s = ReadSnapshot(cut, &data);
    ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << len;
    EXPECT_TRUE(s.message().starts_with(cut + ": truncated at byte " + std::to_string(len) + ": "))
        << s.message();
  }
}

TEST(SnapshotTest, EveryFlippedByteIsDetected) {
  TempDir dir;
  std::string path;
  const std::vector<uint8_t> bytes = SmallSnapshot(dir, &path);
  const std::string bad = dir.Sub("bad.tsnap");
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      std::vector<uint8_t> flipped = bytes;
      flipped[i] ^= mask;
      WriteBytes(bad, flipped);
      SnapshotData data;
      Status s = ReadSnapshot(bad, &data);
      ASSERT_EQ(s.code(), StatusCode::kInvalidArgument) << "byte " << i;
      EXPECT_TRUE(s.message().starts_with(bad + ": ")) << s.message();
    }
  }
  // A flipped value of 'b' names it. Its meta starts with the name (u16
  // length 1, "b"), dtype 1 and ndim 1, and is 53 bytes long: name 3, dtype
  // and ndim 2, one dim 8, flags, slot count and reserved 4, optimizer
  // config 28, step 8. Its values follow.
  const uint8_t needle[] = {1, 0, 'b', 1, 1};
  const auto meta_at =
      std::search(bytes.begin(), bytes.end(), std::begin(needle), std::end(needle));
  ASSERT_NE(meta_at, bytes.end());
  std::vector<uint8_t> flipped = bytes;
  flipped[static_cast<size_t>(meta_at - bytes.begin()) + 53 + 5] ^= 0x10;
  WriteBytes(bad, flipped);
  SnapshotData data;
  Status s = ReadSnapshot(bad, &data);
  EXPECT_TRUE(s.message().starts_with(bad + ": tensor 'b' checksum mismatch (record "))
      << s.message();
}

TEST(SnapshotTest, OtherCorruptFiles) {
  TempDir dir;
  std::string path;
  std::vector<uint8_t> bytes = SmallSnapshot(dir, &path);
  const std::string bad = dir.Sub("bad.tsnap");
  SnapshotData data;

  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  WriteBytes(bad, longer);
  EXPECT_TRUE(Contains(ReadSnapshot(bad, &data).message(), "1 bytes after the trailer"));

  WriteBytes(bad, std::vector<uint8_t>{'h', 'e', 'l', 'l', 'o'});
  EXPECT_TRUE(Contains(ReadSnapshot(bad, &data).message(), "not a tensorspark snapshot"));

  std::vector<uint8_t> future = bytes;
  future[6] = 4;  // format version 4
  WriteBytes(bad, future);
  EXPECT_TRUE(Contains(ReadSnapshot(bad, &data).message(),
                       "format version 4 is not supported (this build reads versions 1 to 3)"));

  Status s = ReadSnapshot(dir.Sub("missing.tsnap"), &data);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "missing.tsnap: cannot open")) << s.message();
}

TEST(SnapshotTest, LoadFallsBackPastCorruptAndTruncatedSnapshots) {
  TempDir dir;
  ParamStore a(10);
  Register(&a, "w", {64});
  std::vector<std::string> paths;
  for (int i = 0; i < 3; ++i) {
    PushGradients(&a, i);
    WrittenSnapshot info;
    ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
    paths.push_back(info.path);
  }
  std::vector<uint8_t> newest = ReadBytes(paths[2]);
  newest[newest.size() / 2] ^= 0x04;  // inside w's values
  WriteBytes(paths[2], newest);
  std::vector<uint8_t> middle = ReadBytes(paths[1]);
  WriteBytes(paths[1], std::span(middle).first(middle.size() - 7));

  SnapshotData data;
  std::string chosen;
  std::vector<std::string> skipped;
  Status s = LoadSnapshot(dir.path(), &data, &chosen, &skipped);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(chosen, paths[0]);
  EXPECT_EQ(data.version, 1u);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_EQ(skipped[0], paths[2] + ": tensor 'w' checksum mismatch (record 0 at byte 76)");
  EXPECT_TRUE(
      skipped[1].starts_with(paths[1] + ": truncated at byte " + std::to_string(middle.size() - 7)))
      << skipped[1];

  // A file is read as is, without falling back.
  s = LoadSnapshot(paths[2], &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "checksum mismatch")) << s.message();
}

TEST(SnapshotTest, LoadWithoutAValidSnapshotFails) {
  TempDir dir;
  SnapshotData data;
  std::string chosen;
  std::vector<std::string> skipped;
  Status s = LoadSnapshot(dir.Sub("nope"), &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "nope' cannot be used: No such file")) << s.message();

  s = LoadSnapshot(dir.path(), &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "holds no snapshot file")) << s.message();

  WriteBytes(dir.Sub(SnapshotFileName(3)), std::vector<uint8_t>(100, 7));
  s = LoadSnapshot(dir.path(), &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "holds no valid snapshot (1 tried)")) << s.message();
  EXPECT_TRUE(Contains(s.message(), SnapshotFileName(3) + ": not a tensorspark snapshot"))
      << s.message();
}

TEST(SnapshotTest, WriteIntoAMissingDirectoryFailsCleanly) {
  TempDir dir;
  ParamStore a(10);
  WrittenSnapshot info;
  Status s = WriteSnapshot(a, dir.Sub("gone"), &info);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "gone/.snapshot-00000000000000000000.tmp: create failed"))
      << s.message();
}

// Pushes run while snapshots are taken: nothing deadlocks, and every
// variable of every snapshot is one consistent state (each push adds 1 to
// every element, so all elements of a variable are equal).
TEST(SnapshotTest, SnapshotsWhilePushesRunAreConsistentPerVariable) {
  TempDir dir;
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(2).ok());
  ParamStore store(10, &pool, /*parallel_min_elements=*/1 << 16);
  const std::vector<int64_t> shape = {300'000};
  for (const char* name : {"a", "b", "c"}) Register(&store, name, shape, /*ramp=*/false);
  std::vector<float> ones(300'000, 1.0f);
  std::atomic<bool> stop{false};
  std::vector<std::thread> pushers;
  for (int t = 0; t < 2; ++t) {
    pushers.emplace_back([&] {
      PushItem items[] = {{"a", shape, ones.data(), ones.size()},
                          {"b", shape, ones.data(), ones.size()},
                          {"c", shape, ones.data(), ones.size()}};
      uint64_t v;
      while (!stop.load()) ASSERT_TRUE(store.Push(2, {}, items, &v).ok());
    });
  }
  for (int i = 0; i < 15; ++i) {
    WrittenSnapshot info;
    ASSERT_TRUE(WriteSnapshot(store, dir.path(), &info).ok());
    const uint64_t after = store.version();
    SnapshotData data;
    ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
    for (const VariableState& v : data.variables) {
      const float first = v.values[0];  // the pushes applied to it
      for (size_t k = 0; k < v.values.size(); ++k) {
        ASSERT_EQ(v.values[k], first) << v.name << "[" << k << "] in snapshot " << i;
      }
      // At least the pushes counted at the start, at most those at the end.
      EXPECT_GE(first, static_cast<float>(data.version) - 0.5f);
      EXPECT_LE(first, static_cast<float>(after) + 0.5f);
    }
    std::vector<std::string> removed;
    ASSERT_TRUE(PruneSnapshots(dir.path(), 2, &removed).ok());
  }
  stop.store(true);
  for (auto& t : pushers) t.join();
  EXPECT_GT(store.version(), 0u);
}

}  // namespace
}  // namespace tensorspark::storage
