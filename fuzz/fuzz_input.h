// Input format shared by the fuzz targets and the seed generator.
//
// Byte 0 is a control byte, the rest is a stream of frames (32-byte header +
// payload) back to back. Random bytes almost never carry a valid CRC-32C,
// magic or version, so most inputs get them patched in to reach the payload
// decoders; the others reach the receive checks unpatched:
//   bit 0 clear: each frame's payload_len is clamped to the bytes left and
//                its checksum recomputed;
//   bit 1 clear: magic and version are set to the v1 values;
//   bit 2 set:   (server target) the frames go to a connection that has not
//                done the handshake;
//   bit 3 set:   (server target) the server has a snapshot directory, so
//                SNAPSHOT, SNAPSHOTS and RESTORE write, list and restore
//                files (emptied after each input);
//   bit 4 set:   (server target) the handshake's HELLO asks for
//                kOptionNoChecksum, so the frames' checksums go unchecked and
//                every reply after the handshake must carry checksum 0.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "protocol/crc32c.h"
#include "protocol/frame.h"

namespace tensorspark::fuzz {

inline constexpr uint8_t kKeepChecksum = 1u << 0;
inline constexpr uint8_t kKeepMagic = 1u << 1;
inline constexpr uint8_t kSkipHandshake = 1u << 2;
inline constexpr uint8_t kSnapshotDir = 1u << 3;
inline constexpr uint8_t kNoChecksum = 1u << 4;

struct FrameSpan {
  size_t header;   // offset of the header in FuzzInput::stream
  size_t payload;  // offset of the payload
  size_t size;     // payload bytes present (may be fewer than payload_len)
};

struct FuzzInput {
  uint8_t control = 0;
  std::vector<uint8_t> stream;  // the bytes after the control byte, patched
  std::vector<FrameSpan> frames;
};

// Splits (and patches, per the control byte) a fuzzer input into frames.
// A trailing piece shorter than a header stays in `stream` unparsed.
inline FuzzInput ParseFuzzInput(const uint8_t* data, size_t size) {
  FuzzInput in;
  if (size == 0) return in;
  in.control = data[0];
  in.stream.assign(data + 1, data + size);
  std::vector<uint8_t>& s = in.stream;
  size_t pos = 0;
  while (s.size() - pos >= protocol::kHeaderSize) {
    uint8_t* h = s.data() + pos;
    const size_t payload = pos + protocol::kHeaderSize;
    const size_t avail = s.size() - payload;
    if (!(in.control & kKeepMagic)) {
      protocol::StoreLE32(h + 0, protocol::kMagic);
      protocol::StoreLE16(h + 4, protocol::kVersion);
    }
    uint64_t len = protocol::LoadLE64(h + 24);
    if (!(in.control & kKeepChecksum)) {
      len = std::min<uint64_t>(len, avail);
      protocol::StoreLE64(h + 24, len);
      protocol::StoreLE32(h + 12, protocol::Crc32c(s.data() + payload, len));
    }
    const size_t n = static_cast<size_t>(std::min<uint64_t>(len, avail));
    in.frames.push_back({pos, payload, n});
    pos = payload + n;
  }
  return in;
}

// Appends one well-formed frame (seed generator and handshake).
inline void AppendFrame(uint16_t opcode, uint32_t flags, uint64_t request_id,
                        std::span<const uint8_t> payload, std::vector<uint8_t>* out) {
  protocol::FrameHeader h;
  h.opcode = opcode;
  h.flags = flags;
  h.request_id = request_id;
  h.payload_len = payload.size();
  h.checksum = protocol::Crc32c(payload.data(), payload.size());
  uint8_t raw[protocol::kHeaderSize];
  protocol::EncodeHeader(h, raw);
  out->insert(out->end(), raw, raw + sizeof(raw));
  out->insert(out->end(), payload.begin(), payload.end());
}

}  // namespace tensorspark::fuzz
