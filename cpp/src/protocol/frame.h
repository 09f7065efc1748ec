// Frame header of wire protocol v1 (docs/protocol.md): 32 bytes,
// little-endian, followed by `payload_len` payload bytes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensorspark/status.h"

namespace tensorspark::protocol {

inline constexpr uint32_t kMagic = 0x53505354;  // bytes "TSPS"
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kHeaderSize = 32;

enum class Opcode : uint16_t {
  kHello = 1,
  kAuth = 2,
  kRegister = 3,
  kList = 4,
  kPull = 5,
  kPush = 6,
  kStats = 7,
  kShutdown = 8,
  kSetOptimizer = 9,
  kJoin = 10,
  kLeave = 11,
  kHeartbeat = 12,
  kConfigure = 13,
  kReport = 14,
  kReports = 15,
  kSnapshot = 16,
  kSnapshots = 17,
  kRestore = 18,
  // Sparse tables (docs/protocol.md, "Sparse tables").
  kTableCreate = 19,
  kPullRows = 20,
  kPushRows = 21,
  kExportRows = 22,
  kListTables = 23,
};
// Highest opcode this version serves.
inline constexpr uint16_t kMaxOpcode = 23;

inline constexpr uint32_t kFlagResponse = 1u << 0;
inline constexpr uint32_t kFlagError = 1u << 1;
// Tensor data section encoded as fp16 / bf16 (2 bytes per element; metas
// still say float32, the logical type). On a PUSH or REGISTER request the
// request's data is encoded; on a PULL request the flag asks for an encoded
// response, which carries the same flag. Both set is a protocol error.
inline constexpr uint32_t kFlagFp16 = 1u << 2;
inline constexpr uint32_t kFlagBf16 = 1u << 3;
inline constexpr uint32_t kEncodingFlags = kFlagFp16 | kFlagBf16;
inline constexpr uint32_t kKnownFlags = kFlagResponse | kFlagError | kEncodingFlags;

// Bytes per element of a data section under `flags` (4, or 2 when encoded).
inline constexpr size_t WireElementSize(uint32_t flags) {
  return (flags & kEncodingFlags) != 0 ? 2 : 4;
}

// Name of an opcode for messages ("PULL"), "UNKNOWN" otherwise.
const char* OpcodeName(uint16_t opcode);

struct FrameHeader {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t opcode = 0;
  uint32_t flags = 0;
  uint32_t checksum = 0;  // CRC-32C of the payload
  uint64_t request_id = 0;
  uint64_t payload_len = 0;
};

void EncodeHeader(const FrameHeader& h, uint8_t out[kHeaderSize]);
FrameHeader DecodeHeader(const uint8_t in[kHeaderSize]);

// The receive checks that come before the payload is read, in protocol
// order: magic (kProtocolError), version (kUnsupportedVersion), length
// (kFrameTooLarge). Flags are checked separately (CheckFlags) because a
// frame with bad flags is still well framed.
[[nodiscard]] Status ValidateHeader(const FrameHeader& h, uint64_t max_frame_bytes);

// Checks that only known flag bits are set, and not both encodings.
[[nodiscard]] Status CheckFlags(const FrameHeader& h);

// Little-endian helpers shared by the codecs.
inline void StoreLE16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void StoreLE32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void StoreLE64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t LoadLE16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t LoadLE32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t LoadLE64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace tensorspark::protocol
