#include "protocol/frame.h"

#include <cstdio>
#include <string>

namespace tensorspark::protocol {

const char* OpcodeName(uint16_t opcode) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kHello:
      return "HELLO";
    case Opcode::kAuth:
      return "AUTH";
    case Opcode::kRegister:
      return "REGISTER";
    case Opcode::kList:
      return "LIST";
    case Opcode::kPull:
      return "PULL";
    case Opcode::kPush:
      return "PUSH";
    case Opcode::kStats:
      return "STATS";
    case Opcode::kShutdown:
      return "SHUTDOWN";
    case Opcode::kSetOptimizer:
      return "SET_OPTIMIZER";
    case Opcode::kJoin:
      return "JOIN";
    case Opcode::kLeave:
      return "LEAVE";
    case Opcode::kHeartbeat:
      return "HEARTBEAT";
    case Opcode::kConfigure:
      return "CONFIGURE";
    case Opcode::kReport:
      return "REPORT";
    case Opcode::kReports:
      return "REPORTS";
    case Opcode::kSnapshot:
      return "SNAPSHOT";
    case Opcode::kSnapshots:
      return "SNAPSHOTS";
    case Opcode::kRestore:
      return "RESTORE";
    case Opcode::kTableCreate:
      return "TABLE_CREATE";
    case Opcode::kPullRows:
      return "PULL_ROWS";
    case Opcode::kPushRows:
      return "PUSH_ROWS";
    case Opcode::kExportRows:
      return "EXPORT_ROWS";
    case Opcode::kListTables:
      return "LIST_TABLES";
  }
  return "UNKNOWN";
}

void EncodeHeader(const FrameHeader& h, uint8_t out[kHeaderSize]) {
  StoreLE32(out + 0, h.magic);
  StoreLE16(out + 4, h.version);
  StoreLE16(out + 6, h.opcode);
  StoreLE32(out + 8, h.flags);
  StoreLE32(out + 12, h.checksum);
  StoreLE64(out + 16, h.request_id);
  StoreLE64(out + 24, h.payload_len);
}

FrameHeader DecodeHeader(const uint8_t in[kHeaderSize]) {
  FrameHeader h;
  h.magic = LoadLE32(in + 0);
  h.version = LoadLE16(in + 4);
  h.opcode = LoadLE16(in + 6);
  h.flags = LoadLE32(in + 8);
  h.checksum = LoadLE32(in + 12);
  h.request_id = LoadLE64(in + 16);
  h.payload_len = LoadLE64(in + 24);
  return h;
}

Status ValidateHeader(const FrameHeader& h, uint64_t max_frame_bytes) {
  if (h.magic != kMagic) {
    char buf[96];
    std::snprintf(buf, sizeof(buf),
                  "bad frame magic 0x%08x (expected 0x%08x): not a tensorspark peer", h.magic,
                  kMagic);
    return Status(StatusCode::kProtocolError, buf);
  }
  if (h.version != kVersion) {
    return Status(StatusCode::kUnsupportedVersion,
                  "peer speaks protocol version " + std::to_string(h.version) +
                      "; this side supports version " + std::to_string(kVersion) +
                      " only: use matching tensorspark versions on both sides");
  }
  if (h.payload_len > max_frame_bytes) {
    return Status(StatusCode::kFrameTooLarge,
                  "frame payload of " + std::to_string(h.payload_len) +
                      " bytes exceeds the limit of " + std::to_string(max_frame_bytes) +
                      " bytes: send fewer or smaller tensors per call, or raise max_frame_bytes");
  }
  return Status::OK();
}

Status CheckFlags(const FrameHeader& h) {
  if ((h.flags & ~kKnownFlags) != 0) {
    return Status(StatusCode::kProtocolError,
                  "frame has unknown flag bits set (flags=" + std::to_string(h.flags) + ")");
  }
  if ((h.flags & kEncodingFlags) == kEncodingFlags) {
    return Status(StatusCode::kProtocolError,
                  "frame sets both the fp16 and the bf16 encoding flags; choose one");
  }
  return Status::OK();
}

}  // namespace tensorspark::protocol
