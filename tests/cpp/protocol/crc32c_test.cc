#include "protocol/crc32c.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
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
  std::vector<size_t> sizes = {0,
                               1,
                               7,
                               8,
                               9,
                               63,
                               255,
                               256,
                               767,
                               768,
                               769,
                               1000,
                               8191,
                               3 * 8192 - 1,
                               3 * 8192,
                               3 * 8192 + 1,
                               3 * 8192 + 3 * 256 + 5,
                               data.size() - 16};
  for (size_t off = 0; off < 9; ++off) {
    for (size_t n : sizes) {
      ASSERT_EQ(Crc32c(data.data() + off, n), Crc32cExtendPortable(0, data.data() + off, n))
          << "offset " << off << " size " << n;
    }
  }
}

// Crc32cExtend (ISA-L when built with it) against the table code and the
// built-in SSE4.2 code: random lengths, alignments and seeds, so ISA-L's
// seed and inversion conventions are checked, not only seed 0.
TEST(Crc32cTest, DefaultMatchesPortableOnRandomInputs) {
  std::mt19937_64 rng(7);
  std::vector<uint8_t> data((1 << 20) + 64);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  for (int round = 0; round < 400; ++round) {
    const size_t off = rng() % 64;
    const size_t max_len = round % 4 == 0 ? data.size() - 64 : 4096;
    const size_t n = rng() % (max_len + 1);
    const auto seed = static_cast<uint32_t>(rng());
    const uint8_t* p = data.data() + off;
    const uint32_t want = Crc32cExtendPortable(seed, p, n);
    ASSERT_EQ(Crc32cExtend(seed, p, n), want) << "offset " << off << " size " << n;
    ASSERT_EQ(Crc32cExtendBuiltin(seed, p, n), want) << "offset " << off << " size " << n;
    // Combine of two default-computed parts equals the portable whole.
    const size_t split = n == 0 ? 0 : rng() % (n + 1);
    const uint32_t a = Crc32c(p, split), b = Crc32c(p + split, n - split);
    ASSERT_EQ(Crc32cCombine(a, b, n - split), Crc32cExtendPortable(0, p, n)) << split;
  }
  EXPECT_EQ(Crc32cExtend(0x12345678, nullptr, 0), 0x12345678u);
}

TEST(Crc32cTest, ImplementationIsNamed) {
  const std::string name = Crc32cImplementation();
#if defined(TENSORSPARK_HAVE_ISAL)
  EXPECT_EQ(name, "isa-l");
#else
  EXPECT_TRUE(name == "sse4.2" || name == "portable") << name;
#endif
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
  std::printf("crc32c: %.1f GB/s (%s) [%u]\n", gbps, Crc32cImplementation(), c);
  // Loose bound that catches an accidental fall back to the table code;
  // only meaningful in optimized, uninstrumented builds.
#if defined(NDEBUG) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  if (Crc32cHardwareEnabled()) EXPECT_GT(gbps, 3.0);
#endif
}

}  // namespace
}  // namespace tensorspark::protocol

namespace tensorspark::protocol {
namespace {

TEST(Crc32cTest, CombineEqualsCrcOfConcatenation) {
  std::vector<uint8_t> data(70000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 13 + 1);
  for (size_t split : {0, 1, 8, 100, 4096, 65536, 70000}) {
    uint32_t a = Crc32c(data.data(), split);
    uint32_t b = Crc32c(data.data() + split, data.size() - split);
    EXPECT_EQ(Crc32cCombine(a, b, data.size() - split), Crc32c(data.data(), data.size())) << split;
  }
}

}  // namespace
}  // namespace tensorspark::protocol

namespace tensorspark::protocol {
namespace {

// Exercises the x^(2^k) table far past 32-bit lengths: combining is
// associative only if x^(8·l1)·x^(8·l2) == x^(8·(l1+l2)) for big exponents.
TEST(Crc32cTest, CombineIsAssociativeForHugeLengths) {
  const uint32_t a = 0x12345678, b = 0x9abcdef0, c = 0x0badf00d;
  const uint64_t l1 = uint64_t{3} << 33, l2 = (uint64_t{5} << 31) + 7;
  EXPECT_EQ(Crc32cCombine(Crc32cCombine(a, b, l1), c, l2),
            Crc32cCombine(a, Crc32cCombine(b, c, l2), l1 + l2));
}

}  // namespace
}  // namespace tensorspark::protocol
