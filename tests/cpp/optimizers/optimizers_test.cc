// Server-side optimizers: kernels against hand-computed values and a
// double-precision reference, chunked multi-threaded updates against the
// serial ones, the store's optimizer state, and a SET_OPTIMIZER round trip
// through a real server.
#include "optimizers/optimizers.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "common/thread_pool.h"
#include "optimizers/update_rules.h"
#include "protocol/crc32c.h"
#include "protocol/half.h"
#include "storage/param_store.h"
#include "test_util.h"

namespace tensorspark {
namespace {

using optimizers::Buffers;
using optimizers::Rule;
using optimizers::Update;

constexpr OptimizerKind kAllKinds[] = {
    OptimizerKind::kSgd,     OptimizerKind::kMomentum, OptimizerKind::kNesterov,
    OptimizerKind::kAdagrad, OptimizerKind::kAdam,     OptimizerKind::kAdamW,
    OptimizerKind::kRmsProp,
};

OptimizerConfig Config(OptimizerKind kind, float lr = 0.05f) {
  OptimizerConfig c;
  c.kind = kind;
  c.learning_rate = lr;
  if (kind == OptimizerKind::kRmsProp) c.beta2 = 0.9f;  // rho
  if (kind == OptimizerKind::kAdagrad) c.initial_accumulator = 0.1f;
  if (kind == OptimizerKind::kAdamW) c.weight_decay = 0.004f;
  return c;
}

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// The formulas of OptimizerKind's documentation, in double precision, from
// the float32 hyperparameters the server sees.
struct Reference {
  std::vector<double> w, s0, s1;
  uint64_t t = 0;

  Reference(const std::vector<float>& w0, const OptimizerConfig& c)
      : w(w0.begin(), w0.end()),
        s0(w0.size(), c.kind == OptimizerKind::kAdagrad ? double{c.initial_accumulator} : 0.0),
        s1(w0.size(), 0.0) {}

  void Step(const OptimizerConfig& c, double lr, const std::vector<float>& grad) {
    const double b1 = c.beta1, b2 = c.beta2, eps = c.epsilon;
    ++t;
    for (size_t i = 0; i < w.size(); ++i) {
      const double g = grad[i];
      switch (c.kind) {
        case OptimizerKind::kSgd:
          w[i] -= lr * g;
          break;
        case OptimizerKind::kMomentum:
          s0[i] = b1 * s0[i] + g;
          w[i] -= lr * s0[i];
          break;
        case OptimizerKind::kNesterov:
          s0[i] = b1 * s0[i] + g;
          w[i] -= lr * (g + b1 * s0[i]);
          break;
        case OptimizerKind::kAdagrad:
          s0[i] += g * g;
          w[i] -= lr * g / (std::sqrt(s0[i]) + eps);
          break;
        case OptimizerKind::kAdam:
        case OptimizerKind::kAdamW: {
          if (c.kind == OptimizerKind::kAdamW) w[i] -= lr * double{c.weight_decay} * w[i];
          s0[i] = b1 * s0[i] + (1 - b1) * g;
          s1[i] = b2 * s1[i] + (1 - b2) * g * g;
          const double lr_t =
              lr * std::sqrt(1 - std::pow(b2, double(t))) / (1 - std::pow(b1, double(t)));
          w[i] -= lr_t * s0[i] / (std::sqrt(s1[i]) + eps);
          break;
        }
        case OptimizerKind::kRmsProp:
          s0[i] = b2 * s0[i] + (1 - b2) * g * g;
          w[i] -= lr * g / std::sqrt(s0[i] + eps);
          break;
      }
    }
  }
};

// max |got - want| / max |want|: the error metric of the optimizer tests.
double RelError(std::span<const float> got, const std::vector<double>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double{got[i]} - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return scale == 0 ? err : err / scale;
}

// The optimizer state of one tensor as the store keeps it.
struct State {
  std::vector<float> w, s0, s1;
  uint64_t t = 0;

  State(const std::vector<float>& w0, const OptimizerConfig& c)
      : w(w0),
        s0(w0.size(), optimizers::SlotInit(c, 0)),
        s1(w0.size(), optimizers::SlotInit(c, 1)) {}

  uint32_t Step(const OptimizerConfig& c, float lr, const std::vector<float>& g,
                ThreadPool* pool = nullptr, size_t parallel_min = 1) {
    Update u = optimizers::OptimizerUpdate(c, lr, ++t);
    return optimizers::ApplyWithCrc(u, Buffers{w.data(), s0.data(), s1.data(), g.data()}, w.size(),
                                    pool, parallel_min);
  }
};

// ---- kernels by hand -------------------------------------------------------------

TEST(OptimizerKernelsTest, MomentumAndNesterovByHand) {
  std::vector<float> w = {1.0f}, m = {0.0f}, g = {0.5f};
  optimizers::MomentumApply(w.data(), m.data(), g.data(), 1, 0.1f, 0.9f);
  EXPECT_FLOAT_EQ(m[0], 0.5f);
  EXPECT_FLOAT_EQ(w[0], 0.95f);
  optimizers::MomentumApply(w.data(), m.data(), g.data(), 1, 0.1f, 0.9f);
  EXPECT_FLOAT_EQ(m[0], 0.95f);   // 0.9 * 0.5 + 0.5
  EXPECT_FLOAT_EQ(w[0], 0.855f);  // 0.95 - 0.1 * 0.95

  w = {1.0f};
  m = {0.0f};
  optimizers::NesterovApply(w.data(), m.data(), g.data(), 1, 0.1f, 0.9f);
  EXPECT_FLOAT_EQ(m[0], 0.5f);
  EXPECT_FLOAT_EQ(w[0], 0.905f);  // 1 - 0.1 * (0.5 + 0.9 * 0.5)
  optimizers::NesterovApply(w.data(), m.data(), g.data(), 1, 0.1f, 0.9f);
  EXPECT_FLOAT_EQ(m[0], 0.95f);
  EXPECT_FLOAT_EQ(w[0], 0.7695f);  // 0.905 - 0.1 * (0.5 + 0.855)
}

TEST(OptimizerKernelsTest, AdagradAndRmsPropByHand) {
  std::vector<float> w = {1.0f}, a = {0.0f}, g = {3.0f};
  optimizers::AdagradApply(w.data(), a.data(), g.data(), 1, 0.1f, 0.0f);
  EXPECT_FLOAT_EQ(a[0], 9.0f);
  EXPECT_FLOAT_EQ(w[0], 0.9f);  // 1 - 0.1 * 3 / 3
  g = {4.0f};
  optimizers::AdagradApply(w.data(), a.data(), g.data(), 1, 0.1f, 0.0f);
  EXPECT_FLOAT_EQ(a[0], 25.0f);
  EXPECT_FLOAT_EQ(w[0], 0.82f);  // 0.9 - 0.1 * 4 / 5

  w = {1.0f};
  std::vector<float> v = {0.0f};
  g = {2.0f};
  optimizers::RmsPropApply(w.data(), v.data(), g.data(), 1, 0.01f, 0.75f, 0.0f);
  EXPECT_FLOAT_EQ(v[0], 1.0f);   // 0.25 * 4
  EXPECT_FLOAT_EQ(w[0], 0.98f);  // 1 - 0.01 * 2 / 1
  optimizers::RmsPropApply(w.data(), v.data(), g.data(), 1, 0.01f, 0.75f, 0.0f);
  EXPECT_FLOAT_EQ(v[0], 1.75f);  // 0.75 + 1
  EXPECT_NEAR(w[0], 0.98f - 0.02f / std::sqrt(1.75f), 1e-7);
}

TEST(OptimizerKernelsTest, AdamFirstStepIsAboutLrTimesSign) {
  // With bias correction, step 1 moves every weight by lr * g / (|g| + eps').
  OptimizerConfig c = Config(OptimizerKind::kAdam, 0.1f);
  State s({1.0f, 1.0f, 1.0f}, c);
  s.Step(c, c.learning_rate, {2.0f, -0.5f, 1e-3f});
  EXPECT_NEAR(s.w[0], 0.9f, 1e-6);
  EXPECT_NEAR(s.w[1], 1.1f, 1e-6);
  // Here eps' = eps / sqrt(1 - beta2) is not negligible against |g|.
  EXPECT_NEAR(s.w[2], 1 - 0.1 * 1e-3 / (1e-3 + 1e-7 / std::sqrt(1 - 0.999)), 1e-6);
  EXPECT_FLOAT_EQ(s.s0[0], 0.2f);  // (1 - 0.9) * 2
  EXPECT_FLOAT_EQ(s.s1[0], (1.0f - 0.999f) * 4.0f);
}

TEST(OptimizerKernelsTest, AdamWDecaysBeforeTheAdamStep) {
  OptimizerConfig c = Config(OptimizerKind::kAdamW, 0.1f);
  c.weight_decay = 0.5f;
  State s({2.0f}, c);
  s.Step(c, c.learning_rate, {0.0f});  // zero gradient: decay only
  EXPECT_FLOAT_EQ(s.w[0], 1.9f);       // 2 - 0.1 * 0.5 * 2
}

// ---- every optimizer over several steps against the reference ------------------

TEST(OptimizerKernelsTest, SeveralStepsMatchDoubleReference) {
  for (OptimizerKind kind : kAllKinds) {
    SCOPED_TRACE(optimizers::KindName(kind));
    const OptimizerConfig c = Config(kind);
    for (size_t n : {size_t{1001}, size_t{4099}}) {
      const std::vector<float> w0 = Random(n, 1);
      State got(w0, c);
      Reference want(w0, c);
      for (uint32_t step = 0; step < 8; ++step) {
        const std::vector<float> g = Random(n, 100 + step, 0.5f);
        // A learning-rate change midway, as a client's schedule would.
        const float lr = step < 4 ? c.learning_rate : c.learning_rate / 2;
        const uint32_t crc = got.Step(c, lr, g);
        want.Step(c, lr, g);
        ASSERT_EQ(crc, protocol::Crc32c(got.w.data(), n * sizeof(float)));
      }
      EXPECT_LE(RelError(got.w, want.w), 1e-6) << "n=" << n;
      if (optimizers::NumSlots(kind) > 0) EXPECT_LE(RelError(got.s0, want.s0), 1e-6);
      if (optimizers::NumSlots(kind) > 1) EXPECT_LE(RelError(got.s1, want.s1), 1e-6);
    }
  }
}

TEST(OptimizerKernelsTest, ScalarTailsEqualTheVectorBodyBitForBit) {
  // The vectorized loop body and its scalar remainder compute the same
  // IEEE operations (no FMA contraction, no reassociation).
  const size_t n = 1001;
  for (OptimizerKind kind : kAllKinds) {
    SCOPED_TRACE(optimizers::KindName(kind));
    const OptimizerConfig c = Config(kind);
    const std::vector<float> w0 = Random(n, 5);
    State full(w0, c);
    std::vector<State> prefixes;
    for (size_t k : {1, 3, 7, 33})
      prefixes.emplace_back(std::vector<float>(w0.begin(), w0.begin() + k), c);
    for (uint32_t step = 0; step < 4; ++step) {
      const std::vector<float> g = Random(n, 300 + step);
      full.Step(c, c.learning_rate, g);
      for (State& p : prefixes)
        p.Step(c, c.learning_rate, std::vector<float>(g.begin(), g.begin() + p.w.size()));
    }
    for (const State& p : prefixes) {
      ASSERT_EQ(std::memcmp(p.w.data(), full.w.data(), p.w.size() * sizeof(float)), 0)
          << p.w.size();
      ASSERT_EQ(std::memcmp(p.s0.data(), full.s0.data(), p.w.size() * sizeof(float)), 0);
      ASSERT_EQ(std::memcmp(p.s1.data(), full.s1.data(), p.w.size() * sizeof(float)), 0);
    }
  }
}

// ---- chunked, multi-threaded updates ---------------------------------------------------

// Every rule once: the optimizer kinds, the mean combiner and delta.
std::vector<Update> EveryUpdate() {
  std::vector<Update> updates;
  for (OptimizerKind kind : kAllKinds) {
    updates.push_back(optimizers::OptimizerUpdate(Config(kind), 0.01f, 3));
  }
  Update mean;
  mean.rule = Rule::kMean;
  mean.mean_window = 3;
  Update copy = mean;
  copy.mean_window = 1;
  Update delta;
  delta.rule = Rule::kDelta;
  updates.push_back(mean);
  updates.push_back(copy);
  updates.push_back(delta);
  return updates;
}

TEST(OptimizerChunkingTest, ThreadedChunksEqualSerialBitForBit) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(4).ok());
  const size_t n = 300001;  // several 64K chunks and a short last one
  const std::vector<float> w0 = Random(n, 7);
  for (const Update& u : EveryUpdate()) {
    SCOPED_TRACE(static_cast<int>(u.rule));
    std::vector<float> w1 = w0, w2 = w0;
    std::vector<float> a1(n, 0.25f), a2(n, 0.25f), b1(n, 0.5f), b2(n, 0.5f);
    uint32_t crc1 = 0, crc2 = 0;
    for (uint32_t step = 0; step < 3; ++step) {
      const std::vector<float> g = Random(n, 50 + step);
      crc1 = optimizers::ApplyWithCrc(u, {w1.data(), a1.data(), b1.data(), g.data()}, n, nullptr);
      crc2 = optimizers::ApplyWithCrc(u, {w2.data(), a2.data(), b2.data(), g.data()}, n, &pool, 1);
    }
    ASSERT_EQ(std::memcmp(w1.data(), w2.data(), n * sizeof(float)), 0);
    ASSERT_EQ(std::memcmp(a1.data(), a2.data(), n * sizeof(float)), 0);
    ASSERT_EQ(std::memcmp(b1.data(), b2.data(), n * sizeof(float)), 0);
    EXPECT_EQ(crc1, crc2);
    EXPECT_EQ(crc2, protocol::Crc32c(w2.data(), n * sizeof(float)));
  }
}

// A 2-byte push decoded inside the update, serially and on the pool, gives
// the bits of the old path: decode the whole tensor to float32, then apply.
TEST(OptimizerChunkingTest, FusedHalfDecodeEqualsDecodeThenApplyBitForBit) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(2).ok());
  const size_t kRule = optimizers::kDefaultParallelMinElements;
  // Block (8192) and chunk boundaries, and the parallel threshold.
  const size_t sizes[] = {0, 1, 7, 8191, 8193, kRule - 1, kRule, kRule + 1, 300001};
  for (optimizers::Source source : {optimizers::Source::kFp16, optimizers::Source::kBf16}) {
    for (size_t n : sizes) {
      const std::vector<float> g32 = Random(n, 11 + n);
      std::vector<uint16_t> g16(n);
      if (source == optimizers::Source::kFp16) {
        protocol::FloatToHalf(g32.data(), g16.data(), n);
      } else {
        protocol::FloatToBFloat16(g32.data(), g16.data(), n);
      }
      std::vector<float> decoded(n);
      optimizers::DecodeSource(source, g16.data(), decoded.data(), n);
      const std::vector<float> w0 = Random(n, 3);
      for (const Update& u : EveryUpdate()) {
        SCOPED_TRACE("source " + std::to_string(static_cast<int>(source)) + " n " +
                     std::to_string(n) + " rule " + std::to_string(static_cast<int>(u.rule)));
        std::vector<float> w[3] = {w0, w0, w0};
        std::vector<float> a[3], b[3];
        for (int k = 0; k < 3; ++k) {
          a[k].assign(n, 0.25f);
          b[k].assign(n, 0.5f);
        }
        uint32_t crc[3];
        for (int step = 0; step < 2; ++step) {
          crc[0] = optimizers::ApplyWithCrc(
              u, {w[0].data(), a[0].data(), b[0].data(), decoded.data()}, n, nullptr);
          Buffers fused{w[1].data(), a[1].data(), b[1].data(), nullptr, g16.data(), source};
          crc[1] = optimizers::ApplyWithCrc(u, fused, n, nullptr);
          fused = {w[2].data(), a[2].data(), b[2].data(), nullptr, g16.data(), source};
          crc[2] = optimizers::ApplyWithCrc(u, fused, n, &pool);
        }
        for (int k = 1; k < 3; ++k) {
          ASSERT_EQ(std::memcmp(w[0].data(), w[k].data(), n * sizeof(float)), 0) << k;
          ASSERT_EQ(std::memcmp(a[0].data(), a[k].data(), n * sizeof(float)), 0) << k;
          ASSERT_EQ(std::memcmp(b[0].data(), b[k].data(), n * sizeof(float)), 0) << k;
          EXPECT_EQ(crc[0], crc[k]) << k;
        }
        EXPECT_EQ(crc[2], protocol::Crc32c(w[2].data(), n * sizeof(float)));
      }
    }
  }
}

// Around the default threshold (the size where the pool takes over) the
// pooled update equals the serial one, values and CRC.
TEST(OptimizerChunkingTest, DefaultThresholdBoundaryEqualsSerial) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(2).ok());
  const size_t t = optimizers::kDefaultParallelMinElements;
  EXPECT_EQ(t, size_t{1} << 18);
  for (size_t n : {t - 1, t, t + 1, 4 * t + 12345}) {
    const std::vector<float> w0 = Random(n, 5), g = Random(n, 6);
    for (const Update& u : EveryUpdate()) {
      SCOPED_TRACE(std::to_string(n) + " rule " + std::to_string(static_cast<int>(u.rule)));
      std::vector<float> w1 = w0, w2 = w0, a1(n, 0.25f), a2(n, 0.25f), b1(n, 0.5f), b2(n, 0.5f);
      const uint32_t c1 =
          optimizers::ApplyWithCrc(u, {w1.data(), a1.data(), b1.data(), g.data()}, n, nullptr);
      const uint32_t c2 =
          optimizers::ApplyWithCrc(u, {w2.data(), a2.data(), b2.data(), g.data()}, n, &pool);
      ASSERT_EQ(std::memcmp(w1.data(), w2.data(), n * sizeof(float)), 0);
      ASSERT_EQ(std::memcmp(a1.data(), a2.data(), n * sizeof(float)), 0);
      ASSERT_EQ(std::memcmp(b1.data(), b2.data(), n * sizeof(float)), 0);
      EXPECT_EQ(c1, c2);
    }
  }
}

TEST(ThreadPoolTest, ConcurrentParallelForsRunEveryIndexOnce) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(3).ok());
  EXPECT_EQ(pool.parallelism(), 3u);
  constexpr size_t kN = 1000;
  std::vector<std::thread> callers;
  std::vector<std::vector<std::atomic<int>>> hits(4);
  for (auto& h : hits) h = std::vector<std::atomic<int>>(kN);
  for (size_t c = 0; c < hits.size(); ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 20; ++round) {
        pool.ParallelFor(kN, [&](size_t i) { hits[c][i].fetch_add(1); });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (auto& h : hits) {
    for (size_t i = 0; i < kN; ++i) ASSERT_EQ(h[i].load(), 20) << i;
  }
  pool.ParallelFor(0, [](size_t) { FAIL(); });
  ThreadPool serial;  // never started: the caller does everything
  size_t sum = 0;
  serial.ParallelFor(10, [&](size_t i) { sum += i; });
  EXPECT_EQ(sum, 45u);
}

// ---- configuration --------------------------------------------------------------------

TEST(OptimizerConfigTest, ValidationNamesTheBadField) {
  for (OptimizerKind kind : kAllKinds) EXPECT_TRUE(optimizers::ValidateConfig(Config(kind)).ok());
  struct Case {
    const char* field;
    void (*mutate)(OptimizerConfig*);
  };
  const Case cases[] = {
      {"kind", [](OptimizerConfig* c) { c->kind = static_cast<OptimizerKind>(0); }},
      {"kind", [](OptimizerConfig* c) { c->kind = static_cast<OptimizerKind>(8); }},
      {"learning_rate", [](OptimizerConfig* c) { c->learning_rate = 0; }},
      {"learning_rate", [](OptimizerConfig* c) { c->learning_rate = -1; }},
      {"learning_rate", [](OptimizerConfig* c) { c->learning_rate = INFINITY; }},
      {"learning_rate", [](OptimizerConfig* c) { c->learning_rate = NAN; }},
      {"beta1", [](OptimizerConfig* c) { c->beta1 = 1; }},
      {"beta1", [](OptimizerConfig* c) { c->beta1 = -0.1f; }},
      {"beta1", [](OptimizerConfig* c) { c->beta1 = NAN; }},
      {"beta2", [](OptimizerConfig* c) { c->beta2 = 1.5f; }},
      {"epsilon", [](OptimizerConfig* c) { c->epsilon = -1e-7f; }},
      {"epsilon", [](OptimizerConfig* c) { c->epsilon = INFINITY; }},
      {"weight_decay", [](OptimizerConfig* c) { c->weight_decay = -1; }},
      {"initial_accumulator", [](OptimizerConfig* c) { c->initial_accumulator = NAN; }},
  };
  for (const Case& k : cases) {
    OptimizerConfig c = Config(OptimizerKind::kAdam);
    k.mutate(&c);
    Status s = optimizers::ValidateConfig(c);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << k.field;
    EXPECT_NE(s.message().find(k.field), std::string::npos) << s.message();
  }
}

TEST(OptimizerConfigTest, OnlyKindAndBetasResetSlots) {
  OptimizerConfig a = Config(OptimizerKind::kAdam);
  OptimizerConfig b = a;
  b.learning_rate = 1e-5f;
  b.epsilon = 1e-3f;
  b.weight_decay = 0.1f;
  EXPECT_TRUE(optimizers::KeepsSlots(a, b));
  b.beta2 = 0.99f;
  EXPECT_FALSE(optimizers::KeepsSlots(a, b));
  b = a;
  b.kind = OptimizerKind::kAdamW;
  EXPECT_FALSE(optimizers::KeepsSlots(a, b));
}

// ---- the store -------------------------------------------------------------------------

namespace st = storage;

std::vector<float> Values(const st::Variable* v) {
  std::shared_lock lock(v->mu());
  return std::vector<float>(v->data(), v->data() + v->numel());
}

st::Variable* Find(st::ParamStore& store, std::string_view name) {
  std::vector<st::Variable*> vars;
  std::string_view names[] = {name};
  EXPECT_TRUE(store.Lookup(names, &vars).ok());
  return vars.empty() ? nullptr : vars[0];
}

Status PushGradient(st::ParamStore& store, std::string_view name, const std::vector<int64_t>& shape,
                    const std::vector<float>& g, float lr = 0.0f) {
  PushOptions opt;
  opt.learning_rate = lr;
  st::PushItem item{name, shape, g.data(), g.size()};
  uint64_t version;
  return store.Push(static_cast<uint8_t>(UpdateKind::kGradient), opt, {&item, 1}, &version);
}

TEST(ParamStoreOptimizerTest, LrChangeKeepsSlotsKindChangeResetsThem) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(2).ok());
  // A low threshold sends "big" through the pool's chunks.
  st::ParamStore store(10, &pool, 1000);
  const size_t n_big = 200000;
  const std::vector<int64_t> small_shape = {5}, big_shape = {int64_t(n_big)};
  const std::vector<float> small0 = Random(5, 1), big0 = Random(n_big, 2);
  std::vector<uint8_t> created;
  st::RegisterItem reg[] = {{"small", small_shape, small0.data()}, {"big", big_shape, big0.data()}};
  ASSERT_TRUE(store.Register(reg, &created).ok());

  OptimizerConfig adam = Config(OptimizerKind::kAdam, 0.01f);
  std::string_view both[] = {"small", "big"};
  ASSERT_TRUE(store.SetOptimizer(adam, both).ok());
  Reference ref_small(small0, adam), ref_big(big0, adam);
  auto step = [&](const OptimizerConfig& c, uint32_t seed, float push_lr = 0.0f) {
    const std::vector<float> gs = Random(5, seed), gb = Random(n_big, seed + 1);
    ASSERT_TRUE(PushGradient(store, "small", small_shape, gs, push_lr).ok());
    ASSERT_TRUE(PushGradient(store, "big", big_shape, gb, push_lr).ok());
    const double lr = push_lr > 0 ? push_lr : c.learning_rate;
    ref_small.Step(c, lr, gs);
    ref_big.Step(c, lr, gb);
  };
  for (uint32_t i = 0; i < 3; ++i) step(adam, 10 * i);
  st::Variable* big = Find(store, "big");
  st::Variable* small = Find(store, "small");
  {
    std::shared_lock lock(big->mu());
    EXPECT_EQ(big->step(), 3u);
    EXPECT_EQ(big->crc(), protocol::Crc32c(big->data(), n_big * sizeof(float)));
  }
  // A push's learning rate overrides the configured one for that push only.
  step(adam, 40, 0.002f);
  // Learning rate change: slots and t carry on.
  adam.learning_rate = 0.003f;
  ASSERT_TRUE(store.SetOptimizer(adam, both).ok());
  EXPECT_EQ(big->step(), 4u);
  for (uint32_t i = 5; i < 8; ++i) step(adam, 10 * i);
  EXPECT_LE(RelError(Values(small), ref_small.w), 1e-6);
  EXPECT_LE(RelError(Values(big), ref_big.w), 1e-6);

  // Kind change: slots reset, momentum starts from zero.
  const OptimizerConfig mom = Config(OptimizerKind::kMomentum, 0.01f);
  ASSERT_TRUE(store.SetOptimizer(mom, both).ok());
  EXPECT_EQ(big->step(), 0u);
  ref_small = Reference(Values(small), mom);
  ref_big = Reference(Values(big), mom);
  for (uint32_t i = 8; i < 11; ++i) step(mom, 10 * i);
  EXPECT_LE(RelError(Values(small), ref_small.w), 1e-6);
  EXPECT_LE(RelError(Values(big), ref_big.w), 1e-6);
  EXPECT_LE(RelError(big->slot(0), ref_big.s0), 1e-6);
  EXPECT_TRUE(big->slot(1).empty());  // Adam's v was freed
  {
    std::shared_lock lock(big->mu());
    EXPECT_EQ(big->crc(), protocol::Crc32c(big->data(), n_big * sizeof(float)));
  }
}

TEST(ParamStoreOptimizerTest, ErrorsChangeNothing) {
  st::ParamStore store(10);
  const std::vector<int64_t> shape = {3};
  const std::vector<float> w0 = {1, 2, 3};
  std::vector<uint8_t> created;
  st::RegisterItem reg[] = {{"a", shape, w0.data()}, {"b", shape, w0.data()}};
  ASSERT_TRUE(store.Register(reg, &created).ok());
  const std::vector<float> g = {1, 1, 1};

  // No optimizer yet: a gradient push needs a learning rate.
  EXPECT_EQ(PushGradient(store, "a", shape, g).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PushGradient(store, "a", shape, g, -1.0f).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PushGradient(store, "a", shape, g, NAN).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store.version(), 0u);

  OptimizerConfig adagrad = Config(OptimizerKind::kAdagrad);
  std::string_view a_only[] = {"a"};
  ASSERT_TRUE(store.SetOptimizer(adagrad, a_only).ok());
  // "b" has none: the whole push is refused, "a" included.
  PushOptions opt;
  st::PushItem items[] = {{"a", shape, g.data(), 3}, {"b", shape, g.data(), 3}};
  uint64_t version;
  EXPECT_EQ(store.Push(3, opt, items, &version).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Values(Find(store, "a")), w0);

  // Bad configs and unknown names change nothing.
  ASSERT_TRUE(PushGradient(store, "a", shape, g).ok());
  const std::vector<float> after_one = Values(Find(store, "a"));
  OptimizerConfig bad = Config(OptimizerKind::kAdam);
  bad.beta1 = 1.0f;
  EXPECT_EQ(store.SetOptimizer(bad, a_only).code(), StatusCode::kInvalidArgument);
  std::string_view with_unknown[] = {"a", "nope"};
  EXPECT_EQ(store.SetOptimizer(Config(OptimizerKind::kAdam), with_unknown).code(),
            StatusCode::kNotFound);
  EXPECT_EQ(Find(store, "a")->optimizer()->kind, OptimizerKind::kAdagrad);
  // The accumulator survived: the second step continues Adagrad.
  Reference ref(w0, adagrad);
  ref.Step(adagrad, adagrad.learning_rate, g);
  ref.Step(adagrad, adagrad.learning_rate, g);
  ASSERT_TRUE(PushGradient(store, "a", shape, g).ok());
  EXPECT_NE(Values(Find(store, "a")), after_one);
  EXPECT_LE(RelError(Values(Find(store, "a")), ref.w), 1e-6);
}

TEST(ParamStoreOptimizerTest, NoNamesMeansEveryVariableIncludingLaterOnes) {
  st::ParamStore store(10);
  const std::vector<int64_t> shape = {2};
  const std::vector<float> w0 = {1, -1}, g = {0.5f, 0.5f};
  std::vector<uint8_t> created;
  st::RegisterItem first[] = {{"early", shape, w0.data()}};
  ASSERT_TRUE(store.Register(first, &created).ok());
  const OptimizerConfig rms = Config(OptimizerKind::kRmsProp, 0.01f);
  ASSERT_TRUE(store.SetOptimizer(rms, {}).ok());
  st::RegisterItem second[] = {{"late", shape, w0.data()}};
  ASSERT_TRUE(store.Register(second, &created).ok());
  for (const char* name : {"early", "late"}) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(PushGradient(store, name, shape, g).ok());
    Reference ref(w0, rms);
    ref.Step(rms, rms.learning_rate, g);
    EXPECT_LE(RelError(Values(Find(store, name)), ref.w), 1e-6);
  }
  // A named call after it still changes only the named variable.
  std::string_view late[] = {"late"};
  ASSERT_TRUE(store.SetOptimizer(Config(OptimizerKind::kSgd), late).ok());
  EXPECT_EQ(Find(store, "early")->optimizer()->kind, OptimizerKind::kRmsProp);
  EXPECT_EQ(Find(store, "late")->optimizer()->kind, OptimizerKind::kSgd);
}

// ---- through a server -----------------------------------------------------------------------

TEST(SetOptimizerServerTest, RoundTripWithLrChangeKindChangeAndErrors) {
  ServerOptions so = testing::TestServerOptions();
  so.update_threads = 2;
  auto server = testing::StartServer(so);
  ASSERT_TRUE(server);
  auto c = testing::ConnectClient(server->port());
  ASSERT_TRUE(c);
  const size_t n = (size_t{1} << 20) + 3;  // takes the chunked path
  const std::vector<int64_t> shape = {int64_t(n)};
  const std::vector<float> w0 = Random(n, 3);
  VariableSpec spec{"w", shape, w0};
  uint64_t version = 0;
  ASSERT_TRUE(c->Register({&spec, 1}, nullptr, &version).ok());

  OptimizerConfig adam = Config(OptimizerKind::kAdamW, 0.01f);
  ASSERT_TRUE(c->SetOptimizer(adam, {}, &version).ok());
  EXPECT_EQ(version, 0u);  // setting an optimizer is not a push
  Reference ref(w0, adam);
  std::vector<float> got(n);
  MutableTensorView view{"w", got};
  auto push = [&](const OptimizerConfig& cfg, uint32_t seed) {
    const std::vector<float> g = Random(n, seed, 0.1f);
    TensorView t{"w", shape, g};
    ASSERT_TRUE(c->Push(UpdateKind::kGradient, {&t, 1}, {}, &version).ok());
    ref.Step(cfg, cfg.learning_rate, g);
  };
  for (uint32_t i = 0; i < 3; ++i) push(adam, i);
  adam.learning_rate = 0.001f;  // schedule: slots kept
  std::string_view names[] = {"w"};
  ASSERT_TRUE(c->SetOptimizer(adam, names, &version).ok());
  EXPECT_EQ(version, 3u);
  for (uint32_t i = 3; i < 5; ++i) push(adam, i);
  ASSERT_TRUE(c->Pull({&view, 1}, &version).ok());  // the client checks the CRC
  EXPECT_LE(RelError(got, ref.w), 1e-6);

  // Errors answer with a status, keep the connection and change nothing.
  OptimizerConfig bad = adam;
  bad.learning_rate = -1;
  Status s = c->SetOptimizer(bad, {}, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  std::string_view unknown[] = {"w", "missing"};
  s = c->SetOptimizer(Config(OptimizerKind::kSgd), unknown, nullptr);
  EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();
  EXPECT_NE(s.message().find("missing"), std::string::npos);
  // A raw frame with an unknown kind gets InvalidArgument from the server.
  testing::RawConn raw;
  ASSERT_TRUE(raw.Connect(server->port()).ok());
  ASSERT_TRUE(raw.Handshake().ok());
  std::vector<uint8_t> payload;
  OptimizerConfig unknown_kind = adam;
  unknown_kind.kind = static_cast<OptimizerKind>(42);
  protocol::EncodeSetOptimizer(unknown_kind, {}, &payload);
  ASSERT_TRUE(raw.Send(protocol::Opcode::kSetOptimizer, 9, payload).ok());
  Status remote = raw.ReadError(9);
  EXPECT_EQ(remote.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(remote.message().find("kind 42"), std::string::npos) << remote.ToString();
  ASSERT_TRUE(c->connected());
  push(adam, 5);  // still AdamW with its slots
  ASSERT_TRUE(c->Pull({&view, 1}, &version).ok());
  EXPECT_LE(RelError(got, ref.w), 1e-6);

  // A kind change resets the slots.
  const OptimizerConfig nesterov = Config(OptimizerKind::kNesterov, 0.01f);
  ASSERT_TRUE(c->SetOptimizer(nesterov, names, nullptr).ok());
  ref = Reference(got, nesterov);
  for (uint32_t i = 6; i < 9; ++i) push(nesterov, i);
  ASSERT_TRUE(c->Pull({&view, 1}, &version).ok());
  EXPECT_EQ(version, 9u);
  EXPECT_LE(RelError(got, ref.w), 1e-6);
}

}  // namespace
}  // namespace tensorspark
