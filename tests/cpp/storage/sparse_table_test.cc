#include "storage/sparse_table.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <thread>

namespace tensorspark::storage {
namespace {

TableConfig Config(std::string name, uint32_t dim, RowOptimizerKind kind) {
  TableConfig c;
  c.name = std::move(name);
  c.dim = dim;
  c.seed = 7;
  c.optimizer.kind = kind;
  c.optimizer.learning_rate = 0.1f;
  return c;
}

std::vector<float> PullAll(SparseTable& t, const std::vector<int64_t>& ids) {
  std::vector<float> out(ids.size() * t.config().dim);
  Status s = t.Pull(ids, out.data());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

std::vector<float> Initial(const TableConfig& c, const std::vector<int64_t>& ids) {
  std::vector<float> out(ids.size() * c.dim);
  RowInitialValues(c.name, c.seed, c.initializer, c.init_scale, c.dim, ids, out.data());
  return out;
}

std::map<int64_t, RowState> Rows(const SparseTable& t, uint32_t since = 0) {
  std::map<int64_t, RowState> rows;
  t.ForEachRow(since, [&](const RowView& v) {
    RowState r;
    r.id = v.id;
    r.values.assign(v.values.begin(), v.values.end());
    r.slots.assign(v.slots.begin(), v.slots.end());
    r.step = v.step;
    r.touches = v.touches;
    r.last_touch_s = v.last_touch_s;
    EXPECT_TRUE(rows.emplace(v.id, std::move(r)).second) << "row " << v.id << " visited twice";
  });
  return rows;
}

// A float64 reference of one row optimizer.
struct RefRow {
  std::vector<double> w, s0, s1;
  uint32_t t = 0;
};

void RefStep(const RowOptimizerConfig& o, RefRow& r, const float* g) {
  const double lr = o.learning_rate;
  const size_t dim = r.w.size();
  if (o.kind == RowOptimizerKind::kAdam) ++r.t;
  for (size_t j = 0; j < dim; ++j) {
    const double gj = g[j];
    switch (o.kind) {
      case RowOptimizerKind::kSgd:
        r.w[j] -= lr * gj;
        break;
      case RowOptimizerKind::kAdagrad:
        r.s0[j] += gj * gj;
        r.w[j] -= lr * gj / std::sqrt(r.s0[j] + o.epsilon);
        break;
      case RowOptimizerKind::kAdam: {
        r.s0[j] += (1 - double{o.beta1}) * (gj - r.s0[j]);
        r.s1[j] += (1 - double{o.beta2}) * (gj * gj - r.s1[j]);
        const double alpha = lr * std::sqrt(1 - std::pow(double{o.beta2}, r.t)) /
                             (1 - std::pow(double{o.beta1}, r.t));
        r.w[j] -= alpha * r.s0[j] / (std::sqrt(r.s1[j]) + o.epsilon);
        break;
      }
      case RowOptimizerKind::kFtrl: {
        const double p = -double{o.lr_power};
        const double n1 = r.s0[j] + gj * gj;
        const double sigma = (std::pow(n1, p) - std::pow(r.s0[j], p)) / lr;
        r.s1[j] += gj - sigma * r.w[j];
        r.s0[j] = n1;
        const double q = std::pow(n1, p) / lr + 2 * (o.l2 + o.beta / (2 * lr));
        const double z = r.s1[j];
        r.w[j] = std::abs(z) > o.l1 ? ((z > 0 ? 1 : -1) * double{o.l1} - z) / q : 0.0;
        break;
      }
    }
  }
}

void ExpectNear(double want, float got, const std::string& what) {
  EXPECT_NEAR(got, want, 1e-5 * std::abs(want) + 1e-6) << what;
}

void CheckOptimizer(RowOptimizerConfig o) {
  TableConfig c = Config("emb", 5, o.kind);
  c.optimizer = o;
  SparseTable t(c);
  const int slots = RowSlots(o.kind);
  std::map<int64_t, RefRow> ref;
  std::mt19937 rng(1);
  std::normal_distribution<float> grad(0.0f, 1.0f);
  // Repeated rows across pushes, new rows mid-way, an untouched row.
  const std::vector<std::vector<int64_t>> pushes = {{1, 2, 3},     {2, 3, -4}, {3},
                                                    {1, 3, 99, 2}, {3, -4},    {3, 2, 1}};
  for (const auto& ids : pushes) {
    std::vector<float> g(ids.size() * c.dim);
    for (float& x : g) x = grad(rng);
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
    for (size_t i = 0; i < ids.size(); ++i) {
      auto [it, fresh] = ref.try_emplace(ids[i]);
      RefRow& r = it->second;
      if (fresh) {
        std::vector<float> init = Initial(c, {ids[i]});
        r.w.assign(init.begin(), init.end());
        const double a0 =
            (o.kind == RowOptimizerKind::kAdagrad || o.kind == RowOptimizerKind::kFtrl)
                ? o.initial_accumulator
                : 0.0;
        r.s0.assign(c.dim, a0);
        r.s1.assign(c.dim, 0.0);
      }
      RefStep(o, r, g.data() + i * c.dim);
    }
  }
  std::map<int64_t, RowState> rows = Rows(t);
  ASSERT_EQ(rows.size(), ref.size());
  for (const auto& [id, r] : ref) {
    const RowState& got = rows.at(id);
    ASSERT_EQ(got.slots.size(), size_t(slots) * c.dim);
    for (uint32_t j = 0; j < c.dim; ++j) {
      const std::string what = "id " + std::to_string(id) + " j " + std::to_string(j);
      ExpectNear(r.w[j], got.values[j], what + " w");
      if (slots >= 1) ExpectNear(r.s0[j], got.slots[j], what + " slot 0");
      if (slots >= 2) ExpectNear(r.s1[j], got.slots[c.dim + j], what + " slot 1");
    }
    if (o.kind == RowOptimizerKind::kAdam) {
      EXPECT_EQ(got.step, r.t);
    }
    std::vector<float> pulled = PullAll(t, {id});
    EXPECT_EQ(pulled, got.values);
  }
}

TEST(SparseTableOptimizerTest, SgdMatchesReference) {
  RowOptimizerConfig o;
  o.kind = RowOptimizerKind::kSgd;
  o.learning_rate = 0.1f;
  CheckOptimizer(o);
}

TEST(SparseTableOptimizerTest, AdagradMatchesReference) {
  RowOptimizerConfig o;
  o.kind = RowOptimizerKind::kAdagrad;
  o.learning_rate = 0.1f;
  o.initial_accumulator = 0.1f;
  CheckOptimizer(o);
}

TEST(SparseTableOptimizerTest, AdamMatchesReference) {
  RowOptimizerConfig o;
  o.kind = RowOptimizerKind::kAdam;
  o.learning_rate = 0.01f;
  CheckOptimizer(o);
}

TEST(SparseTableOptimizerTest, FtrlMatchesReference) {
  RowOptimizerConfig o;
  o.kind = RowOptimizerKind::kFtrl;
  o.learning_rate = 0.1f;
  o.l1 = 0.01f;
  o.l2 = 0.02f;
  o.beta = 0.5f;
  CheckOptimizer(o);
  o.lr_power = -0.7f;
  o.l1 = 0.0f;
  CheckOptimizer(o);
}

TEST(SparseTableOptimizerTest, LearningRateOverride) {
  SparseTable t(Config("t", 2, RowOptimizerKind::kSgd));
  const std::vector<int64_t> ids = {5};
  const std::vector<float> before = PullAll(t, ids);
  const float g[] = {1.0f, -2.0f};
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.5f, ids, g).ok());
  const std::vector<float> after = PullAll(t, ids);
  EXPECT_FLOAT_EQ(after[0], before[0] - 0.5f);
  EXPECT_FLOAT_EQ(after[1], before[1] + 1.0f);
  Status s = t.Push(UpdateKind::kParameters, 0.0f, ids, g);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(t.Push(UpdateKind::kGradient, -1.0f, ids, g).code(), StatusCode::kInvalidArgument);
}

TEST(SparseTableOptimizerTest, LazyAdamLeavesUntouchedRowsAlone) {
  SparseTable t(Config("t", 3, RowOptimizerKind::kAdam));
  const float g2[] = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1, 2}, g2).ok());
  const std::map<int64_t, RowState> first = Rows(t);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1}, g2).ok());
  }
  const std::map<int64_t, RowState> later = Rows(t);
  EXPECT_EQ(later.at(2).values, first.at(2).values);
  EXPECT_EQ(later.at(2).slots, first.at(2).slots);
  EXPECT_EQ(later.at(2).step, 1u);
  EXPECT_EQ(later.at(1).step, 4u);
  EXPECT_NE(later.at(1).values, first.at(1).values);
}

TEST(SparseTableOptimizerTest, DeltaAddsAndKeepsSlots) {
  TableConfig c = Config("t", 2, RowOptimizerKind::kAdagrad);
  SparseTable t(c);
  const std::vector<int64_t> ids = {10, 11};
  const std::vector<float> init = Initial(c, ids);
  const float d[] = {1, 2, 3, 4};
  ASSERT_TRUE(t.Push(UpdateKind::kDelta, 0.0f, ids, d).ok());
  ASSERT_TRUE(t.Push(UpdateKind::kDelta, 0.0f, ids, d).ok());
  const std::vector<float> got = PullAll(t, ids);
  for (size_t k = 0; k < 4; ++k) EXPECT_FLOAT_EQ(got[k], init[k] + d[k] + d[k]);
  for (const auto& [id, r] : Rows(t)) {
    EXPECT_EQ(r.slots, std::vector<float>(2, c.optimizer.initial_accumulator)) << id;
  }
  EXPECT_EQ(t.Stats().rows_pushed, 4u);
  EXPECT_EQ(t.Stats().rows_created, 2u);
}

TEST(SparseTableInitTest, DeterministicPerNameAndSeed) {
  TableConfig c = Config("user", 8, RowOptimizerKind::kSgd);
  SparseTable a(c), b(c);
  TableConfig other = c;
  other.seed = 8;
  SparseTable d(other);
  TableConfig renamed = c;
  renamed.name = "item";
  SparseTable e(renamed);
  std::vector<int64_t> ids = {0, 1, -1, 123456789012345LL, 42};
  const std::vector<float> va = PullAll(a, ids);
  EXPECT_EQ(va, PullAll(b, ids));
  EXPECT_EQ(va, Initial(c, ids));
  EXPECT_NE(va, PullAll(d, ids));
  EXPECT_NE(va, PullAll(e, ids));
  // Rows differ from each other too.
  EXPECT_FALSE(std::equal(va.begin(), va.begin() + 8, va.begin() + 8));
}

TEST(SparseTableInitTest, Distributions) {
  std::vector<int64_t> ids(2000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>(i);
  const uint32_t dim = 16;
  std::vector<float> out(ids.size() * dim);
  RowInitialValues("t", 1, RowInitializer::kUniform, 0.05f, dim, ids, out.data());
  double sum = 0, sq = 0;
  for (float x : out) {
    ASSERT_GE(x, -0.05f);
    ASSERT_LT(x, 0.05f);
    sum += x;
    sq += double{x} * x;
  }
  EXPECT_NEAR(sum / out.size(), 0.0, 1e-3);
  EXPECT_NEAR(std::sqrt(sq / out.size()), 0.05 / std::sqrt(3.0), 1e-3);
  RowInitialValues("t", 1, RowInitializer::kNormal, 2.0f, dim, ids, out.data());
  sum = sq = 0;
  for (float x : out) {
    ASSERT_LE(std::abs(x), 4.0f);
    sum += x;
    sq += double{x} * x;
  }
  // A standard normal truncated at 2 stddev has stddev 0.880.
  EXPECT_NEAR(sum / out.size(), 0.0, 0.03);
  EXPECT_NEAR(std::sqrt(sq / out.size()), 2.0 * 0.880, 0.03);
  RowInitialValues("t", 1, RowInitializer::kZeros, 2.0f, dim, ids, out.data());
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == 0.0f; }));
  // Pinned values: the definition in docs/sparse.md must not drift (a
  // Python reimplementation of it gives the same bits).
  float u[4], n[4];
  const int64_t three[] = {3};
  RowInitialValues("user", 0, RowInitializer::kUniform, 1.0f, 4, three, u);
  RowInitialValues("user", 0, RowInitializer::kNormal, 1.0f, 4, three, n);
  EXPECT_EQ(u[0], -0x1.41013cp-1f);
  EXPECT_EQ(u[3], -0x1.9be24p-3f);
  EXPECT_EQ(n[0], -0x1.7774p-1f);
  EXPECT_EQ(n[2], 0x1.5e7ap-1f);
}

TEST(SparseTableErrorTest, FixedVocabRangeChangesNothing) {
  TableConfig c = Config("user", 2, RowOptimizerKind::kSgd);
  c.vocab = 1000;
  SparseTable t(c);
  const float g[] = {1, 1, 1, 1};
  std::vector<float> out(4, 9.0f);
  for (int64_t bad : {int64_t{1000}, int64_t{-1}}) {
    const std::vector<int64_t> ids = {5, bad};
    Status s = t.Push(UpdateKind::kGradient, 0.0f, ids, g);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(
        s.message().find("table 'user': id " + std::to_string(bad) + " is out of range [0, 1000)"),
        std::string::npos)
        << s.message();
    s = t.Pull(ids, out.data());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(out, std::vector<float>(4, 9.0f));
  EXPECT_EQ(t.Stats().rows, 0u);
  EXPECT_EQ(t.Stats().rows_pulled, 0u);
  const std::vector<int64_t> ok = {0, 999};
  EXPECT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ok, g).ok());
}

TEST(SparseTableErrorTest, DuplicateIdsRefused) {
  SparseTable t(Config("t", 1, RowOptimizerKind::kSgd));
  const float g[] = {1, 2, 3};
  Status s = t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{4, 77, 77}, g);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("id 77 appears more than once"), std::string::npos) << s.message();
  EXPECT_EQ(t.Stats().rows, 0u);
  // Pulls may repeat ids.
  std::vector<float> out = PullAll(t, {77, 77});
  EXPECT_EQ(out[0], out[1]);
}

TEST(SparseTableErrorTest, FullWithoutEvictionChangesNothing) {
  TableConfig c = Config("user", 1, RowOptimizerKind::kSgd);
  c.capacity = 10;
  SparseTable t(c);
  std::vector<int64_t> ids(10);
  for (int i = 0; i < 10; ++i) ids[i] = i;
  std::vector<float> g(10, 1.0f);
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
  const std::vector<float> before = PullAll(t, ids);
  Status s = t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{3, 10}, g.data());
  EXPECT_EQ(s.code(), StatusCode::kLimitExceeded);
  EXPECT_NE(s.message().find("table 'user' is full: 10 rows (capacity=10, eviction off)"),
            std::string::npos)
      << s.message();
  EXPECT_NE(s.message().find("raise capacity or set eviction='lru'"), std::string::npos);
  EXPECT_EQ(PullAll(t, ids), before);
  EXPECT_EQ(t.Stats().rows, 10u);
  // Existing rows still take pushes.
  EXPECT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{3}, g.data()).ok());
}

TEST(SparseTableEvictionTest, LruKeepsRecentRows) {
  TableConfig c = Config("t", 2, RowOptimizerKind::kSgd);
  c.capacity = 300;
  c.eviction = EvictionPolicy::kLru;
  uint64_t clock = 1000;
  SparseTable t(c, [&] { return clock; });
  std::vector<int64_t> hot(40);
  for (int i = 0; i < 40; ++i) hot[i] = i;
  std::vector<float> g(2 * 64, 0.5f);
  int64_t next_cold = 1000;
  for (int round = 0; round < 100; ++round) {
    ++clock;
    std::vector<int64_t> cold(20);
    for (int64_t& id : cold) id = next_cold++;
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, cold, g.data()).ok());
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, hot, g.data()).ok());
  }
  const TableStats st = t.Stats();
  EXPECT_LE(st.rows, 300u);
  EXPECT_GE(st.evictions, 2000u + 40u - 300u);
  const std::map<int64_t, RowState> rows = Rows(t);
  for (int64_t id : hot) EXPECT_TRUE(rows.count(id)) << "hot id " << id << " was evicted";
  for (int64_t id = 1000; id < 1500; ++id) EXPECT_FALSE(rows.count(id)) << "cold id " << id;
  std::vector<int64_t> removed;
  EXPECT_TRUE(t.RemovedSince(1, &removed) || removed.size() > 0);
}

TEST(SparseTableEvictionTest, LfuKeepsFrequentRows) {
  TableConfig c = Config("t", 1, RowOptimizerKind::kSgd);
  c.capacity = 200;
  c.eviction = EvictionPolicy::kLfu;
  SparseTable t(c);
  std::vector<int64_t> hot(30);
  for (int i = 0; i < 30; ++i) hot[i] = i;
  std::vector<float> g(64, 0.5f);
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, hot, g.data()).ok());
  }
  for (int64_t id = 1000; id < 3000; id += 10) {
    std::vector<int64_t> cold(10);
    for (int k = 0; k < 10; ++k) cold[k] = id + k;
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, cold, g.data()).ok());
  }
  const std::map<int64_t, RowState> rows = Rows(t);
  EXPECT_LE(rows.size(), 200u);
  for (int64_t id : hot) EXPECT_TRUE(rows.count(id)) << "frequent id " << id << " was evicted";
}

// Random delta pushes under eviction: every stored row must still be found
// with the sum of its deltas since it was (re)created (checks the index's
// backward-shift deletion and the row moves).
TEST(SparseTableEvictionTest, IndexStaysConsistent) {
  TableConfig c = Config("t", 1, RowOptimizerKind::kSgd);
  c.initializer = RowInitializer::kZeros;
  c.capacity = 400;
  c.eviction = EvictionPolicy::kLru;
  uint64_t clock = 0;
  SparseTable t(c, [&] { return clock; });
  std::map<int64_t, double> ref;
  std::mt19937 rng(3);
  std::uniform_int_distribution<int64_t> pick(0, 1499);
  std::vector<float> ones(64, 1.0f);
  for (int step = 0; step < 300; ++step) {
    ++clock;
    std::set<int64_t> uniq;
    while (uniq.size() < 20) uniq.insert(pick(rng));
    std::vector<int64_t> ids(uniq.begin(), uniq.end());
    const uint32_t epoch = t.BeginSnapshot() + 1;  // this push's epoch
    ASSERT_TRUE(t.Push(UpdateKind::kDelta, 0.0f, ids, ones.data()).ok());
    std::vector<int64_t> removed;
    ASSERT_TRUE(t.RemovedSince(epoch, &removed));
    for (int64_t id : removed) ref.erase(id);
    for (int64_t id : ids) ref[id] += 1.0;
  }
  const std::map<int64_t, RowState> rows = Rows(t);
  ASSERT_EQ(rows.size(), ref.size());
  EXPECT_EQ(t.Stats().rows, ref.size());
  for (const auto& [id, want] : ref) {
    ASSERT_TRUE(rows.count(id)) << id;
    EXPECT_EQ(rows.at(id).values[0], want) << id;
    EXPECT_EQ(PullAll(t, {id})[0], want) << id;
  }
}

TEST(SparseTableAdmissionTest, StoresAfterNSightings) {
  TableConfig c = Config("t", 2, RowOptimizerKind::kSgd);
  c.admit_after = 3;
  SparseTable t(c);
  const std::vector<int64_t> ids = {42};
  const std::vector<float> init = Initial(c, ids);
  const float g[] = {1.0f, 1.0f};
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ids, g).ok());  // sighting 1: dropped
  EXPECT_EQ(t.Stats().rows, 0u);
  EXPECT_EQ(t.Stats().admissions_refused, 1u);
  EXPECT_EQ(PullAll(t, {42, 42}), (std::vector<float>{init[0], init[1], init[0], init[1]}));
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ids, g).ok());  // sighting 3: stored
  EXPECT_EQ(t.Stats().rows, 1u);
  EXPECT_EQ(t.Stats().admissions_refused, 1u);
  const std::vector<float> got = PullAll(t, ids);
  EXPECT_FLOAT_EQ(got[0], init[0] - 0.1f);
  EXPECT_FLOAT_EQ(got[1], init[1] - 0.1f);
  // Another id is still refused on its first push.
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{43}, g).ok());
  EXPECT_EQ(t.Stats().rows, 1u);
  EXPECT_EQ(t.Stats().admissions_refused, 2u);
}

TEST(SparseTableTtlTest, ExpiresUntouchedRows) {
  TableConfig c = Config("t", 1, RowOptimizerKind::kAdam);
  c.ttl_s = 10;
  uint64_t clock = 5000;
  SparseTable t(c, [&] { return clock; });
  const float g[] = {1.0f};
  const std::vector<float> init = Initial(c, {1});
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1}, g).ok());
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{2}, g).ok());
  const float trained = PullAll(t, {1})[0];
  EXPECT_NE(trained, init[0]);
  clock += 9;
  EXPECT_EQ(PullAll(t, {1})[0], trained);  // a pull touches: 1 lives on
  clock += 9;
  EXPECT_EQ(PullAll(t, {1})[0], trained);
  EXPECT_EQ(PullAll(t, {2})[0], Initial(c, {2})[0]);  // 2 untouched for 18 s
  clock += 11;
  EXPECT_EQ(PullAll(t, {1})[0], init[0]);
  // Pushing an expired row starts it afresh (step 1 again).
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1}, g).ok());
  EXPECT_EQ(PullAll(t, {1})[0], trained);
  EXPECT_EQ(Rows(t).at(1).step, 1u);
  // Pushes sweep their stripes, so row 2 is reclaimed without being named.
  std::vector<int64_t> ids;
  for (int64_t id = 100; id < 1000; ++id) ids.push_back(id);
  std::vector<float> z(ids.size(), 0.0f);
  for (int k = 0; k < 20 && Rows(t).count(2); ++k) {
    ASSERT_TRUE(t.Push(UpdateKind::kDelta, 0.0f, ids, z.data()).ok());
  }
  EXPECT_EQ(Rows(t).count(2), 0u);
  EXPECT_EQ(t.Stats().expired, 2u);  // row 1 (pushed again) and row 2 (swept)
  EXPECT_EQ(t.Stats().rows, 901u);
}

TEST(SparseTableSnapshotTest, EpochsAndRemovedLog) {
  TableConfig c = Config("t", 1, RowOptimizerKind::kSgd);
  c.capacity = 3;
  c.eviction = EvictionPolicy::kLru;
  uint64_t clock = 100;
  SparseTable t(c, [&] { return clock; });
  const float g[] = {1, 1, 1};
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1, 2, 3}, g).ok());
  const uint32_t e1 = t.BeginSnapshot();
  EXPECT_EQ(Rows(t, 0).size(), 3u);
  EXPECT_EQ(Rows(t, e1).size(), 3u);
  EXPECT_EQ(Rows(t, e1 + 1).size(), 0u);
  ++clock;
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{2}, g).ok());
  ++clock;
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{4}, g).ok());  // evicts
  const std::map<int64_t, RowState> inc = Rows(t, e1 + 1);
  EXPECT_EQ(inc.size(), 2u);
  EXPECT_TRUE(inc.count(2) && inc.count(4));
  std::vector<int64_t> removed;
  EXPECT_TRUE(t.RemovedSince(e1 + 1, &removed));
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_TRUE(removed[0] == 1 || removed[0] == 3);
  EXPECT_TRUE(t.RemovedSince(e1 + 2, &removed));
  EXPECT_TRUE(removed.empty());
  EXPECT_EQ(Rows(t).size(), 3u);
}

TEST(SparseTableSnapshotTest, RemovedLogTrims) {
  TableConfig c = Config("t", 1, RowOptimizerKind::kSgd);
  c.capacity = 10;
  c.eviction = EvictionPolicy::kLru;
  SparseTable t(c);
  std::vector<float> g(100, 1.0f);
  const uint32_t e = t.BeginSnapshot() + 1;
  for (int64_t id = 0; id < 3000; id += 10) {
    std::vector<int64_t> ids(10);
    for (int k = 0; k < 10; ++k) ids[k] = id + k;
    ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
    t.BeginSnapshot();
  }
  std::vector<int64_t> removed;
  EXPECT_FALSE(t.RemovedSince(e, &removed));
  EXPECT_LE(removed.size(), 1100u);
  EXPECT_TRUE(t.RemovedSince(e + 299, &removed));
  EXPECT_EQ(removed.size(), 10u);
}

TEST(SparseTableSnapshotTest, RestoreRoundTrip) {
  TableConfig c = Config("t", 4, RowOptimizerKind::kAdam);
  uint64_t clock = 2000;
  SparseTable a(c, [&] { return clock; });
  std::mt19937 rng(5);
  std::normal_distribution<float> grad;
  for (int step = 0; step < 5; ++step) {
    std::vector<int64_t> ids;
    for (int64_t id = step; id < 50; id += 1 + step) ids.push_back(id);
    std::vector<float> g(ids.size() * 4);
    for (float& x : g) x = grad(rng);
    ASSERT_TRUE(a.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
    ++clock;
  }
  std::map<int64_t, RowState> saved = Rows(a);
  std::vector<RowState> rows;
  for (auto& [id, r] : saved) rows.push_back(r);
  uint64_t clock_b = 2100;
  SparseTable b(c, [&] { return clock_b; });
  ASSERT_TRUE(b.Restore(std::move(rows), {}, a.epoch_unix_s()).ok());
  std::map<int64_t, RowState> restored = Rows(b);
  ASSERT_EQ(restored.size(), saved.size());
  for (const auto& [id, r] : saved) {
    const RowState& s = restored.at(id);
    EXPECT_EQ(s.values, r.values) << id;
    EXPECT_EQ(s.slots, r.slots) << id;
    EXPECT_EQ(s.step, r.step) << id;
    EXPECT_EQ(s.touches, r.touches) << id;
    EXPECT_EQ(uint64_t{s.last_touch_s} + b.epoch_unix_s(), uint64_t{r.last_touch_s} + 2000) << id;
  }
  std::vector<int64_t> ids = {0, 1, 2, 49, 77};
  std::vector<float> g(ids.size() * 4);
  for (float& x : g) x = grad(rng);
  ASSERT_TRUE(a.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
  ASSERT_TRUE(b.Push(UpdateKind::kGradient, 0.0f, ids, g.data()).ok());
  EXPECT_EQ(PullAll(a, ids), PullAll(b, ids));
  // Removal, bad rows.
  const int64_t gone[] = {0, 1};
  ASSERT_TRUE(b.Restore({}, gone, b.epoch_unix_s()).ok());
  EXPECT_EQ(Rows(b).count(0), 0u);
  std::vector<RowState> bad(1);
  bad[0].id = 3;
  bad[0].values.assign(3, 0.0f);
  const size_t before = Rows(b).size();
  EXPECT_EQ(b.Restore(std::move(bad), {}, 0).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Rows(b).size(), before);
  b.Clear();
  EXPECT_EQ(b.Stats().rows, 0u);
  EXPECT_EQ(PullAll(b, {49}), Initial(c, {49}));
}

TEST(SparseTableConfigTest, ReconfigureAndValidation) {
  TableConfig c = Config("t", 4, RowOptimizerKind::kSgd);
  SparseTable t(c);
  const float g[] = {1, 1, 1, 1};
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1}, g).ok());
  const std::vector<float> before = PullAll(t, {1});
  TableConfig wrong = c;
  wrong.dim = 8;
  Status s = t.Reconfigure(wrong);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_EQ(s.message(), "table 't' has dim 4 on the server, not 8");
  wrong = c;
  wrong.seed = 1;
  EXPECT_EQ(t.Reconfigure(wrong).code(), StatusCode::kInvalidArgument);
  TableConfig adagrad = c;
  adagrad.optimizer.kind = RowOptimizerKind::kAdagrad;
  adagrad.optimizer.initial_accumulator = 0.5f;
  ASSERT_TRUE(t.Reconfigure(adagrad).ok());
  EXPECT_EQ(PullAll(t, {1}), before);
  EXPECT_EQ(Rows(t).at(1).slots, std::vector<float>(4, 0.5f));
  ASSERT_TRUE(t.Push(UpdateKind::kGradient, 0.0f, std::vector<int64_t>{1, 2}, g).ok());
  EXPECT_EQ(t.Stats().rows, 2u);

  TableConfig bad = c;
  bad.optimizer.learning_rate = 0;
  s = ValidateTableConfig(bad);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("table 't': learning_rate 0"), std::string::npos) << s.message();
  bad = c;
  bad.dim = 0;
  EXPECT_FALSE(ValidateTableConfig(bad).ok());
  bad = c;
  bad.optimizer.kind = RowOptimizerKind::kFtrl;
  bad.optimizer.initial_accumulator = 0;
  EXPECT_FALSE(ValidateTableConfig(bad).ok());
  bad = c;
  bad.name = "";
  EXPECT_FALSE(ValidateTableConfig(bad).ok());
}

TEST(SparseTableStoreTest, CreateLookupOrder) {
  TableStore store(2);
  bool created = false;
  ASSERT_TRUE(store.CreateOrCheck(Config("b", 2, RowOptimizerKind::kSgd), &created).ok());
  EXPECT_TRUE(created);
  ASSERT_TRUE(store.CreateOrCheck(Config("a", 2, RowOptimizerKind::kSgd), &created).ok());
  ASSERT_TRUE(store.CreateOrCheck(Config("b", 2, RowOptimizerKind::kAdam), &created).ok());
  EXPECT_FALSE(created);
  EXPECT_EQ(store.CreateOrCheck(Config("b", 3, RowOptimizerKind::kSgd), nullptr).code(),
            StatusCode::kShapeMismatch);
  EXPECT_EQ(store.CreateOrCheck(Config("c", 2, RowOptimizerKind::kSgd), nullptr).code(),
            StatusCode::kLimitExceeded);
  std::vector<SparseTable*> all;
  store.All(&all);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0]->config().name, "b");
  EXPECT_EQ(all[0]->config().optimizer.kind, RowOptimizerKind::kAdam);
  SparseTable* t = nullptr;
  Status s = store.Lookup("x", &t);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "no table 'x' on this server (create it first)");
  ASSERT_TRUE(store.Lookup("a", &t).ok());
  EXPECT_EQ(t, all[1]);
  std::vector<std::unique_ptr<SparseTable>> fresh;
  fresh.push_back(std::make_unique<SparseTable>(Config("z", 1, RowOptimizerKind::kSgd)));
  store.ReplaceAll(std::move(fresh));
  EXPECT_EQ(store.size(), 1u);
  EXPECT_TRUE(store.Lookup("z", &t).ok());
}

TEST(SparseTableConcurrencyTest, OverlappingPushesAndPulls) {
  TableConfig c = Config("t", 8, RowOptimizerKind::kAdagrad);
  c.initializer = RowInitializer::kZeros;
  SparseTable t(c);
  std::atomic<bool> failed{false};
  auto worker = [&](int seed) {
    std::mt19937 rng(seed);
    std::vector<float> grad(64 * 8, 0.01f), out(64 * 8);
    for (int step = 0; step < 200; ++step) {
      std::set<int64_t> uniq;
      while (uniq.size() < 64) uniq.insert(static_cast<int64_t>(rng() % 2000));
      std::vector<int64_t> ids(uniq.begin(), uniq.end());
      if (!t.Push(UpdateKind::kGradient, 0.0f, ids, grad.data()).ok()) failed = true;
      if (!t.Pull(ids, out.data()).ok()) failed = true;
      for (float x : out) {
        if (!(x < 0.0f)) failed = true;  // every pulled row was pushed
      }
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) threads.emplace_back(worker, i);
  for (auto& th : threads) th.join();
  EXPECT_FALSE(failed);
  const TableStats st = t.Stats();
  EXPECT_EQ(st.rows, Rows(t).size());
  EXPECT_EQ(st.rows, st.rows_created);
  EXPECT_EQ(st.rows_pushed, 4u * 200 * 64);
}

}  // namespace
}  // namespace tensorspark::storage
