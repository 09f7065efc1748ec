#include "tensorspark/status.h"

namespace tensorspark {

const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "Ok";
    case StatusCode::kInvalidArgument:
      return "InvalidArgument";
    case StatusCode::kNotFound:
      return "NotFound";
    case StatusCode::kShapeMismatch:
      return "ShapeMismatch";
    case StatusCode::kProtocolError:
      return "ProtocolError";
    case StatusCode::kUnsupportedVersion:
      return "UnsupportedVersion";
    case StatusCode::kFrameTooLarge:
      return "FrameTooLarge";
    case StatusCode::kAuthFailed:
      return "AuthFailed";
    case StatusCode::kConnectionError:
      return "ConnectionError";
    case StatusCode::kTimeout:
      return "Timeout";
    case StatusCode::kLimitExceeded:
      return "LimitExceeded";
    case StatusCode::kShuttingDown:
      return "ShuttingDown";
    case StatusCode::kInternal:
      return "Internal";
    case StatusCode::kAddressInUse:
      return "AddressInUse";
    case StatusCode::kFenced:
      return "Fenced";
  }
  return "Unknown";
}

std::string Status::ToString() const {
  if (ok()) return "Ok";
  std::string out = StatusCodeName(code_);
  if (!message_.empty()) {
    out += ": ";
    out += message_;
  }
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string msg(context);
  msg += ": ";
  msg += message_;
  return Status(code_, std::move(msg));
}

}  // namespace tensorspark
