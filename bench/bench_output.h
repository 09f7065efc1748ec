// Helpers shared by the C++ benchmarks: the run secret of their in-process
// servers and the pieces of their hand-written JSON results.
#pragma once

#include <cmath>
#include <cstdio>
#include <ctime>
#include <random>
#include <string>
#include <string_view>

namespace tensorspark::bench {

// 32 random bytes: the secret of a benchmark's own servers.
inline std::string RandomSecret() {
  std::random_device rd;
  std::string s(32, '\0');
  for (char& ch : s) ch = static_cast<char>(rd() & 0xff);
  return s;
}

inline std::string CompilerName() {
#if defined(__clang__)
  return std::string("clang++ ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("g++ ") + __VERSION__;
#else
  return "unknown";
#endif
}

inline std::string UtcTimestamp() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// `s` as the inside of a JSON string.
inline std::string JsonEscape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

// A JSON number with 6 significant digits; null for inf and NaN, which
// JSON cannot hold.
inline std::string Num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

}  // namespace tensorspark::bench
