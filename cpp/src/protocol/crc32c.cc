#include "protocol/crc32c.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif
#if defined(TENSORSPARK_HAVE_ISAL)
#include <isa-l/crc.h>
#endif

namespace tensorspark::protocol {
namespace {

constexpr uint32_t kPoly = 0x82f63b78;  // reflected Castagnoli polynomial

// Slicing-by-8 tables: kTables[k][b] is the CRC register after byte b
// followed by k zero bytes.
struct Tables {
  uint32_t t[8][256];
  constexpr Tables() : t{} {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ ((c & 1) ? kPoly : 0);
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b) {
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
    }
  }
};
constexpr Tables kTables;

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // little-endian host (x86_64)
}

// Raw register update, no pre/post inversion.
uint32_t RawPortable(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = kTables.t;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = (c >> 8) ^ t[0][(c ^ *p++) & 0xff];
    --n;
  }
  while (n >= 8) {
    uint64_t v = Load64(p) ^ c;
    c = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^ t[4][(v >> 24) & 0xff] ^
        t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^ t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xff];
  return c;
}

#if defined(__x86_64__)

// Block sizes of the three interleaved hardware streams.
constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;

// Operator that advances a CRC register over `len` zero bytes, as four
// byte-indexed tables (the operator is linear over GF(2)).
struct ShiftTable {
  uint32_t t[4][256];
  void Init(size_t len) {
    uint32_t basis[32];
    static const uint8_t kZeros[kLong] = {};
    for (int i = 0; i < 32; ++i) basis[i] = RawPortable(uint32_t{1} << i, kZeros, len);
    for (int k = 0; k < 4; ++k) {
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int bit = 0; bit < 8; ++bit) {
          if (b & (1u << bit)) v ^= basis[8 * k + bit];
        }
        t[k][b] = v;
      }
    }
  }
  uint32_t Apply(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

struct HwState {
  ShiftTable long_shift;
  ShiftTable short_shift;
  bool enabled = false;
  HwState() {
    enabled = __builtin_cpu_supports("sse4.2");
    if (enabled) {
      long_shift.Init(kLong);
      short_shift.Init(kShort);
    }
  }
};

const HwState& Hw() {
  static const HwState state;  // thread-safe static init
  return state;
}

__attribute__((target("sse4.2"))) uint32_t RawHardware(uint32_t crc, const uint8_t* p, size_t n,
                                                       const HwState& hw) {
  uint64_t c0 = crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
    --n;
  }
  // Three independent streams hide the instruction's 3-cycle latency; their
  // registers are merged by shifting over the following blocks.
  while (n >= 3 * kLong) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t* end = p + kLong;
    do {
      c0 = _mm_crc32_u64(c0, Load64(p));
      c1 = _mm_crc32_u64(c1, Load64(p + kLong));
      c2 = _mm_crc32_u64(c2, Load64(p + 2 * kLong));
      p += 8;
    } while (p < end);
    c0 = hw.long_shift.Apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    c0 = hw.long_shift.Apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
    p += 2 * kLong;
    n -= 3 * kLong;
  }
  while (n >= 3 * kShort) {
    uint64_t c1 = 0, c2 = 0;
    const uint8_t* end = p + kShort;
    do {
      c0 = _mm_crc32_u64(c0, Load64(p));
      c1 = _mm_crc32_u64(c1, Load64(p + kShort));
      c2 = _mm_crc32_u64(c2, Load64(p + 2 * kShort));
      p += 8;
    } while (p < end);
    c0 = hw.short_shift.Apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    c0 = hw.short_shift.Apply(static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
    p += 2 * kShort;
    n -= 3 * kShort;
  }
  while (n >= 8) {
    c0 = _mm_crc32_u64(c0, Load64(p));
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c0 = _mm_crc32_u8(static_cast<uint32_t>(c0), *p++);
  return static_cast<uint32_t>(c0);
}

#endif  // __x86_64__

// Product of two polynomials modulo the CRC polynomial, in the reflected
// bit order of the CRC register (bit 31 is x^0).
constexpr uint32_t MultModP(uint32_t a, uint32_t b) {
  if (a == 0) return 0;
  uint32_t m = uint32_t{1} << 31;
  uint32_t p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// kX2n[k] = x^(2^k) mod P, for every k a 64-bit byte count can need.
struct X2nTable {
  uint32_t t[3 + 64];
  constexpr X2nTable() : t{} {
    uint32_t p = uint32_t{1} << 30;  // x^1
    t[0] = p;
    for (int k = 1; k < 3 + 64; ++k) t[k] = p = MultModP(p, p);
  }
};
constexpr X2nTable kX2n;

}  // namespace

uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(a ‖ b) = crc_a · x^(8·len_b) + crc_b  (mod P)
  uint32_t p = uint32_t{1} << 31;  // x^0
  unsigned k = 3;                  // 8 = 2^3
  for (uint64_t n = len_b; n != 0; n >>= 1, ++k) {
    if (n & 1) p = MultModP(kX2n.t[k], p);
  }
  return MultModP(p, crc_a) ^ crc_b;
}

uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n) {
  return ~RawPortable(~crc, static_cast<const uint8_t*>(data), n);
}

bool Crc32cHardwareEnabled() {
#if defined(__x86_64__)
  return Hw().enabled;
#else
  return false;
#endif
}

uint32_t Crc32cExtendBuiltin(uint32_t crc, const void* data, size_t n) {
#if defined(__x86_64__)
  const HwState& hw = Hw();
  if (hw.enabled) return ~RawHardware(~crc, static_cast<const uint8_t*>(data), n, hw);
#endif
  return Crc32cExtendPortable(crc, data, n);
}

const char* Crc32cImplementation() {
#if defined(TENSORSPARK_HAVE_ISAL)
  return "isa-l";
#else
  return Crc32cHardwareEnabled() ? "sse4.2" : "portable";
#endif
}

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n) {
#if defined(TENSORSPARK_HAVE_ISAL)
  // crc32_iscsi neither inverts its seed nor its result, and takes an int
  // length: invert here and feed it at most 1 GiB at a time.
  constexpr size_t kMaxStep = size_t{1} << 30;
  auto* p = static_cast<unsigned char*>(const_cast<void*>(data));
  uint32_t c = ~crc;
  while (n > 0) {
    const size_t step = std::min(n, kMaxStep);
    c = crc32_iscsi(p, static_cast<int>(step), c);
    p += step;
    n -= step;
  }
  return ~c;
#else
  return Crc32cExtendBuiltin(crc, data, n);
#endif
}

}  // namespace tensorspark::protocol
