#include "protocol/crc32c.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace tensorspark::protocol {
namespace {

// Known answers from RFC 3720 (iSCSI) appendix B.4 and the common check value.
TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c("123456789", 9), 0xe3069283u);
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
  uint8_t buf[32];
  std::memset(buf, 0, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, 32), 0x8a9136aau);
  std::memset(buf, 0xff, sizeof(buf));
  EXPECT_EQ(Crc32c(buf, 32), 0x62a8ab43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(buf, 32), 0x46dd794eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(Crc32c(buf, 32), 0x113fdb5cu);
  EXPECT_EQ(Crc32cExtendPortable(0, "123456789", 9), 0xe3069283u);
}

TEST(Crc32cTest, HardwareMatchesPortableAtAllSizesAndOffsets) {
  std::mt19937 rng(42);
  std::vector<uint8_t> data(3 * 8192 * 2 + 4096);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  std::vector<size_t> sizes = {0, 1, 7, 8, 9, 63, 255, 256, 767, 768, 769, 1000, 8191,
                               3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 3 * 8192 + 3 * 256 + 5,
                               data.size() - 16};
  for (size_t off = 0; off < 9; ++off) {
    for (size_t n : sizes) {
      ASSERT_EQ(Crc32c(data.data() + off, n), Crc32cExtendPortable(0, data.data() + off, n))
          << "offset " << off << " size " << n;
    }
  }
}

TEST(Crc32cTest, IncrementalEqualsOneShot) {
  std::vector<uint8_t> data(100000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 31 + 7);
  const uint32_t whole = Crc32c(data.data(), data.size());
  for (size_t split : {0, 1, 13, 4096, 50001, 99999, 100000}) {
    uint32_t c = Crc32cExtend(0, data.data(), split);
    c = Crc32cExtend(c, data.data() + split, data.size() - split);
    EXPECT_EQ(c, whole) << split;
  }
}

TEST(Crc32cTest, ThroughputIsHigh) {
  std::vector<uint8_t> data(32 << 20, 0x5a);
  uint32_t c = Crc32c(data.data(), data.size());  // warm up
  auto t0 = std::chrono::steady_clock::now();
  constexpr int kRounds = 4;
  for (int i = 0; i < kRounds; ++i) c ^= Crc32c(data.data(), data.size());
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double gbps = kRounds * data.size() / s / 1e9;
  std::printf("crc32c: %.1f GB/s (hardware: %d) [%u]\n", gbps, Crc32cHardwareEnabled(), c);
  // Loose bound: catches an accidental fall back to the table code.
  if (Crc32cHardwareEnabled()) EXPECT_GT(gbps, 3.0);
}

}  // namespace
}  // namespace tensorspark::protocol
