// fp16 / bf16 conversion: exactness on representable values, rounding, and
// the relative error bound on random data.
#include "protocol/half.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace tensorspark::protocol {
namespace {

TEST(HalfTest, KnownValues) {
  EXPECT_EQ(FloatToHalfScalar(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalfScalar(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalfScalar(1.0f), 0x3C00);
  EXPECT_EQ(FloatToHalfScalar(-2.0f), 0xC000);
  EXPECT_EQ(FloatToHalfScalar(65504.0f), 0x7BFF);
  EXPECT_EQ(FloatToHalfScalar(65520.0f), 0x7C00);  // rounds to Inf
  EXPECT_EQ(FloatToHalfScalar(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalfScalar(5.9604645e-8f), 0x0001);       // smallest subnormal
  EXPECT_EQ(FloatToHalfScalar(6.1035156e-5f), 0x0400);       // smallest normal
  EXPECT_EQ(FloatToHalfScalar(1.0f + 1.0f / 2048), 0x3C00);  // tie -> even
  EXPECT_EQ(FloatToHalfScalar(1.0f + 3.0f / 2048), 0x3C02);  // tie -> even (up)
  EXPECT_TRUE(std::isnan(HalfToFloatScalar(FloatToHalfScalar(std::nanf("")))));
  EXPECT_EQ(HalfToFloatScalar(0x0001), 5.9604645e-8f);
  EXPECT_EQ(HalfToFloatScalar(0x7BFF), 65504.0f);
}

TEST(HalfTest, EveryHalfRoundTripsAndVectorMatchesScalar) {
  std::vector<uint16_t> all(1 << 16);
  for (uint32_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> f(all.size());
  HalfToFloat(all.data(), f.data(), all.size());
  std::vector<uint16_t> back(all.size());
  FloatToHalf(f.data(), back.data(), f.size());
  for (uint32_t i = 0; i < all.size(); ++i) {
    const float scalar = HalfToFloatScalar(all[i]);
    EXPECT_TRUE(f[i] == scalar || (std::isnan(f[i]) && std::isnan(scalar))) << i;
    if (std::isnan(f[i])) {
      EXPECT_TRUE(std::isnan(HalfToFloatScalar(back[i]))) << i;
    } else {
      EXPECT_EQ(back[i], all[i]) << i;
    }
  }
}

TEST(HalfTest, RelativeErrorOnRandomValues) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 10.0f);
  std::vector<float> x(100003);
  for (float& v : x) v = dist(rng);
  std::vector<uint16_t> h(x.size()), b(x.size());
  std::vector<float> xh(x.size()), xb(x.size());
  FloatToHalf(x.data(), h.data(), x.size());
  HalfToFloat(h.data(), xh.data(), x.size());
  FloatToBFloat16(x.data(), b.data(), x.size());
  BFloat16ToFloat(b.data(), xb.data(), x.size());
  double worst_h = 0, worst_b = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::fabs(x[i]) < 1e-4f) continue;  // fp16 subnormal range
    EXPECT_EQ(FloatToHalfScalar(x[i]), h[i]) << i;
    worst_h = std::max(worst_h, std::fabs((xh[i] - x[i]) / static_cast<double>(x[i])));
    worst_b = std::max(worst_b, std::fabs((xb[i] - x[i]) / static_cast<double>(x[i])));
  }
  EXPECT_LE(worst_h, std::ldexp(1.0, -11));
  EXPECT_LE(worst_b, std::ldexp(1.0, -8));
}

TEST(BFloat16Test, KnownValuesAndNaN) {
  const float in[] = {1.0f,
                      -2.5f,
                      1.0f + 1.0f / 256,
                      1.0f + 3.0f / 256,
                      std::numeric_limits<float>::infinity(),
                      std::nanf("")};
  uint16_t out[6];
  FloatToBFloat16(in, out, 6);
  EXPECT_EQ(out[0], 0x3F80);
  EXPECT_EQ(out[1], 0xC020);
  EXPECT_EQ(out[2], 0x3F80);  // tie -> even (down)
  EXPECT_EQ(out[3], 0x3F82);  // tie -> even (up)
  EXPECT_EQ(out[4], 0x7F80);
  float back[6];
  BFloat16ToFloat(out, back, 6);
  EXPECT_TRUE(std::isnan(back[5]));
}

}  // namespace
}  // namespace tensorspark::protocol
