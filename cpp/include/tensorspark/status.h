// Status: the error type of every I/O and protocol call in tensorspark.
//
// Calls that can fail return a [[nodiscard]] Status instead of throwing, so
// that server threads never unwind through socket code. The Python binding
// converts a failed Status into a Python exception in exactly one place.
//
//   tensorspark::Status s = client->Pull(views, &version);
//   if (!s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace tensorspark {

// Codes are part of wire protocol v1 (error frames carry them): never
// renumber, only append.
enum class StatusCode : uint32_t {
  kOk = 0,
  kInvalidArgument = 1,     // a bad value from the caller (option, kind, size)
  kNotFound = 2,            // unknown variable name
  kShapeMismatch = 3,       // tensor shape differs from the registered one
  kProtocolError = 4,       // malformed frame, bad magic, bad checksum
  kUnsupportedVersion = 5,  // peer speaks another protocol version
  kFrameTooLarge = 6,       // payload over the receiver's size limit
  kAuthFailed = 7,          // wrong secret or request before the handshake
  kConnectionError = 8,     // refused, reset, or closed by the peer
  kTimeout = 9,             // a blocking wait ran past its limit
  kLimitExceeded = 10,      // too many variables or connections
  kShuttingDown = 11,       // the server is stopping
  kInternal = 12,           // a bug: please report
  kAddressInUse = 13,       // the listen port is taken
  kFenced = 14,             // a newer attempt of this partition replaced the caller
};

// Short stable name of a code, e.g. "ShapeMismatch".
const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status OK() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "ShapeMismatch: variable 'W' has shape [784,10] but the push has [10]".
  std::string ToString() const;

  // Returns a copy whose message is prefixed with `context` ("pull: ...").
  Status WithContext(std::string_view context) const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Returns early from the enclosing function when `expr` fails.
#define TS_RETURN_IF_ERROR(expr)               \
  do {                                         \
    ::tensorspark::Status _ts_status = (expr); \
    if (!_ts_status.ok()) return _ts_status;   \
  } while (0)

}  // namespace tensorspark
