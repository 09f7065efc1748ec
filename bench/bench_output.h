// Helpers shared by the C++ benchmarks: the run secret of their in-process
// servers, the pieces of their hand-written JSON results, failing fast, and
// argument parsing.
#pragma once

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <random>
#include <string>
#include <string_view>

#include "tensorspark/status.h"

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

// Prints "<program>: what" and exits 1 at once: threads may still be
// running, so static destructors are skipped.
[[noreturn]] inline void Die(const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program_invocation_short_name, what.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

inline void Check(const Status& s, const std::string& what) {
  if (!s.ok()) Die(what + ": " + s.ToString());
}

// The first failure seen by any worker thread.
class FirstError {
 public:
  void Set(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu_);
    if (msg_.empty()) msg_ = msg;
    failed_.store(true, std::memory_order_relaxed);
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  const std::string& message() const { return msg_; }  // after join

 private:
  std::mutex mu_;
  std::string msg_;
  std::atomic<bool> failed_{false};
};

// `s` as a finite double in [lo, hi], the whole string; false otherwise.
inline bool ParseDouble(const std::string& s, double lo, double hi, double* out) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || errno != 0 || end != s.c_str() + s.size() || !std::isfinite(v) || v < lo ||
      v > hi) {
    return false;
  }
  *out = v;
  return true;
}

}  // namespace tensorspark::bench
