#include "optimizers/update_rules.h"

#include <gtest/gtest.h>

#include <vector>

namespace tensorspark::optimizers {
namespace {

TEST(UpdateRulesTest, MeanWithWindowTwo) {
  std::vector<float> w = {1.0f, 2.0f, -4.0f};
  std::vector<float> v = {3.0f, 0.0f, 4.0f};
  MeanCombine(w.data(), v.data(), w.size(), 2);
  EXPECT_FLOAT_EQ(w[0], 2.0f);  // (1 + 3) / 2
  EXPECT_FLOAT_EQ(w[1], 1.0f);  // (2 + 0) / 2
  EXPECT_FLOAT_EQ(w[2], 0.0f);  // (-4 + 4) / 2
}

TEST(UpdateRulesTest, MeanWithWindowThree) {
  std::vector<float> w = {3.0f, 0.0f};
  std::vector<float> v = {6.0f, 1.5f};
  MeanCombine(w.data(), v.data(), w.size(), 3);
  EXPECT_FLOAT_EQ(w[0], 4.0f);  // (2*3 + 6) / 3
  EXPECT_FLOAT_EQ(w[1], 0.5f);  // (0 + 1.5) / 3
}

TEST(UpdateRulesTest, MeanWithWindowOneReplaces) {
  std::vector<float> w = {3.0f, 7.0f};
  std::vector<float> v = {-1.0f, 2.5f};
  MeanCombine(w.data(), v.data(), w.size(), 1);
  EXPECT_EQ(w, v);
}

TEST(UpdateRulesTest, Delta) {
  std::vector<float> w = {1.0f, -2.0f, 0.25f};
  std::vector<float> d = {0.5f, 2.0f, -1.0f};
  DeltaApply(w.data(), d.data(), w.size());
  EXPECT_FLOAT_EQ(w[0], 1.5f);
  EXPECT_FLOAT_EQ(w[1], 0.0f);
  EXPECT_FLOAT_EQ(w[2], -0.75f);
}

TEST(UpdateRulesTest, Sgd) {
  std::vector<float> w = {1.0f, -2.0f};
  std::vector<float> g = {0.5f, -4.0f};
  SgdApply(w.data(), g.data(), w.size(), 0.1f);
  EXPECT_FLOAT_EQ(w[0], 0.95f);  // 1 - 0.1*0.5
  EXPECT_FLOAT_EQ(w[1], -1.6f);  // -2 + 0.1*4
}

TEST(UpdateRulesTest, LongVectorsMatchScalarFormulaIncludingTails) {
  for (size_t n : {size_t{1}, size_t{7}, size_t{33}, size_t{1001}}) {
    std::vector<float> w(n), v(n), ref(n);
    for (size_t i = 0; i < n; ++i) {
      w[i] = static_cast<float>(i) * 0.5f;
      v[i] = 1.0f - static_cast<float>(i);
      ref[i] = (4.0f * w[i] + v[i]) / 5.0f;
    }
    MeanCombine(w.data(), v.data(), n, 5);
    for (size_t i = 0; i < n; ++i) ASSERT_FLOAT_EQ(w[i], ref[i]) << i;
  }
}

}  // namespace
}  // namespace tensorspark::optimizers
