#include "storage/param_store.h"

#include <gtest/gtest.h>

#include <cstring>
#include <shared_mutex>
#include <thread>

#include "common/thread_pool.h"
#include "protocol/crc32c.h"
#include "protocol/half.h"

namespace tensorspark::storage {
namespace {

std::vector<float> Values(const Variable* v) {
  std::shared_lock lock(v->mu());
  return std::vector<float>(v->data(), v->data() + v->numel());
}

TEST(ParamStoreTest, RegisterFirstWins) {
  ParamStore store(10);
  std::vector<int64_t> shape = {2};
  float a[] = {1, 2}, b[] = {3, 4};
  std::vector<uint8_t> created;
  RegisterItem first[] = {{"W", shape, a}};
  ASSERT_TRUE(store.Register(first, &created).ok());
  EXPECT_EQ(created, (std::vector<uint8_t>{1}));
  RegisterItem second[] = {{"W", shape, b}};
  ASSERT_TRUE(store.Register(second, &created).ok());
  EXPECT_EQ(created, (std::vector<uint8_t>{0}));
  std::vector<Variable*> vars;
  std::string_view names[] = {"W"};
  ASSERT_TRUE(store.Lookup(names, &vars).ok());
  EXPECT_EQ(Values(vars[0]), (std::vector<float>{1, 2}));
  EXPECT_EQ(store.num_parameters(), 2u);
}

TEST(ParamStoreTest, ShapeMismatchRegistersNothing) {
  ParamStore store(10);
  std::vector<int64_t> s2 = {2}, s3 = {3};
  float v[3] = {};
  std::vector<uint8_t> created;
  RegisterItem first[] = {{"W", s2, v}};
  ASSERT_TRUE(store.Register(first, &created).ok());
  RegisterItem bad[] = {{"b", s2, v}, {"W", s3, v}};
  Status s = store.Register(bad, &created);
  EXPECT_EQ(s.code(), StatusCode::kShapeMismatch);
  EXPECT_NE(s.message().find("[2]"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("[3]"), std::string::npos) << s.message();
  EXPECT_EQ(store.num_variables(), 1u);
}

TEST(ParamStoreTest, MaxVariables) {
  ParamStore store(2);
  std::vector<int64_t> shape = {1};
  float v[1] = {};
  std::vector<uint8_t> created;
  RegisterItem three[] = {{"a", shape, v}, {"b", shape, v}, {"c", shape, v}};
  EXPECT_EQ(store.Register(three, &created).code(), StatusCode::kLimitExceeded);
  EXPECT_EQ(store.num_variables(), 0u);
  ASSERT_TRUE(store.Register(std::span(three, 2), &created).ok());
  // Re-registering existing names is fine at the limit.
  ASSERT_TRUE(store.Register(std::span(three, 2), &created).ok());
}

TEST(ParamStoreTest, RejectedPushChangesNothing) {
  ParamStore store(10);
  std::vector<int64_t> shape = {2};
  float init[] = {1, 1};
  std::vector<uint8_t> created;
  RegisterItem items[] = {{"a", shape, init}, {"b", shape, init}};
  ASSERT_TRUE(store.Register(items, &created).ok());
  float d[] = {5, 5};
  std::vector<int64_t> wrong = {1, 2};
  PushItem bad_shape[] = {{"a", shape, d, 2}, {"b", wrong, d, 2}};
  uint64_t version = 0;
  EXPECT_EQ(store.Push(2, {}, bad_shape, &version).code(), StatusCode::kShapeMismatch);
  PushItem unknown[] = {{"a", shape, d, 2}, {"zz", shape, d, 2}};
  EXPECT_EQ(store.Push(2, {}, unknown, &version).code(), StatusCode::kNotFound);
  PushItem good[] = {{"a", shape, d, 2}};
  EXPECT_EQ(store.Push(9, {}, good, &version).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Push(3, {0.0f, 1}, good, &version).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store.Push(1, {0.0f, 0}, good, &version).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store.version(), 0u);
  std::vector<Variable*> all;
  store.All(&all);
  EXPECT_EQ(Values(all[0]), (std::vector<float>{1, 1}));
  ASSERT_TRUE(store.Push(2, {}, good, &version).ok());
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(Values(all[0]), (std::vector<float>{6, 6}));
}

TEST(ParamStoreTest, ConcurrentPushesCountVersions) {
  ParamStore store(10);
  std::vector<int64_t> shape = {1000};
  std::vector<float> zeros(1000, 0.0f), ones(1000, 1.0f);
  std::vector<uint8_t> created;
  RegisterItem items[] = {{"w", shape, zeros.data()}};
  ASSERT_TRUE(store.Register(items, &created).ok());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      PushItem p[] = {{"w", shape, ones.data(), 1000}};
      uint64_t v;
      for (int i = 0; i < 100; ++i) ASSERT_TRUE(store.Push(2, {}, p, &v).ok());
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(store.version(), 400u);
  std::vector<Variable*> all;
  store.All(&all);
  for (float x : Values(all[0])) ASSERT_EQ(x, 400.0f);
}

// A 2-byte push (decoded inside the update) leaves the bits and CRC a
// float32 push of the decoded values leaves, on the pool too; a refused one
// changes nothing.
TEST(ParamStoreTest, EncodedPushEqualsFloatPushOfTheDecodedValues) {
  ThreadPool pool;
  ASSERT_TRUE(pool.Start(2).ok());
  const uint64_t n = (uint64_t{1} << 18) + 3;  // over the parallel threshold
  std::vector<int64_t> shape = {static_cast<int64_t>(n)};
  std::vector<float> init(n), g(n);
  for (uint64_t i = 0; i < n; ++i) {
    init[i] = static_cast<float>(i % 97) * 0.01f;
    g[i] = static_cast<float>(static_cast<int>(i % 31) - 15) * 0.37f;
  }
  for (auto source : {optimizers::Source::kFp16, optimizers::Source::kBf16}) {
    std::vector<uint16_t> g16(n);
    std::vector<float> decoded(n);
    if (source == optimizers::Source::kFp16) {
      protocol::FloatToHalf(g.data(), g16.data(), n);
    } else {
      protocol::FloatToBFloat16(g.data(), g16.data(), n);
    }
    optimizers::DecodeSource(source, g16.data(), decoded.data(), n);
    ParamStore floats(10, &pool), encoded(10, &pool);
    std::vector<uint8_t> created;
    RegisterItem reg[] = {{"w", shape, init.data()}};
    OptimizerConfig adam;
    adam.kind = OptimizerKind::kAdam;
    adam.learning_rate = 0.01f;
    for (ParamStore* s : {&floats, &encoded}) {
      ASSERT_TRUE(s->Register(reg, &created).ok());
      ASSERT_TRUE(s->SetOptimizer(adam, {}).ok());
    }
    PushItem f[] = {{"w", shape, decoded.data(), n}};
    PushItem e[] = {{"w", shape, nullptr, n, g16.data(), source}};
    std::vector<int64_t> wrong = {2};
    PushItem bad[] = {{"w", shape, nullptr, n, g16.data(), source},
                      {"w", wrong, nullptr, 2, g16.data(), source}};
    uint64_t version = 0;
    EXPECT_EQ(encoded.Push(3, {}, bad, &version).code(), StatusCode::kShapeMismatch);
    for (uint8_t kind : {3, 2, 1, 3}) {
      ASSERT_TRUE(floats.Push(kind, {0.0f, 2}, f, &version).ok());
      ASSERT_TRUE(encoded.Push(kind, {0.0f, 2}, e, &version).ok());
    }
    std::vector<Variable*> a, b;
    floats.All(&a);
    encoded.All(&b);
    const std::vector<float> va = Values(a[0]), vb = Values(b[0]);
    ASSERT_EQ(std::memcmp(va.data(), vb.data(), n * sizeof(float)), 0);
    EXPECT_EQ(a[0]->crc(), b[0]->crc());
    EXPECT_EQ(b[0]->crc(), protocol::Crc32c(vb.data(), n * sizeof(float)));
    EXPECT_EQ(encoded.version(), 4u);
    ASSERT_EQ(std::memcmp(a[0]->slot(1).data(), b[0]->slot(1).data(), n * sizeof(float)), 0);
  }
}

}  // namespace
}  // namespace tensorspark::storage
