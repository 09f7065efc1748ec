// Payload codecs of wire protocol v1 (docs/protocol.md).
//
// Reader checks every field against the bytes left and fails with
// kProtocolError on truncation; Finish() rejects trailing bytes. Decoded
// views (string_view, data pointers) point into the payload buffer, which
// must outlive them.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/frame.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::protocol {

inline constexpr size_t kMaxNameLen = 1024;
inline constexpr size_t kMaxDims = 8;
inline constexpr size_t kNonceSize = 32;
// Largest element count of one tensor: keeps numel * 4 and sums of a few of
// them far from overflow.
inline constexpr uint64_t kMaxElements = uint64_t{1} << 48;
// Smallest encoded meta: u16 len, 1 name byte, u8 dtype, u8 ndim.
inline constexpr size_t kMinMetaSize = 5;

using Nonce = std::array<uint8_t, kNonceSize>;

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  explicit Reader(std::span<const uint8_t> s) : Reader(s.data(), s.size()) {}

  [[nodiscard]] Status ReadU8(uint8_t* v);
  [[nodiscard]] Status ReadU16(uint16_t* v);
  [[nodiscard]] Status ReadU32(uint32_t* v);
  [[nodiscard]] Status ReadU64(uint64_t* v);
  [[nodiscard]] Status ReadI32(int32_t* v);
  [[nodiscard]] Status ReadI64(int64_t* v);
  [[nodiscard]] Status ReadF32(float* v);
  [[nodiscard]] Status ReadF64(double* v);
  [[nodiscard]] Status ReadBytes(size_t n, const uint8_t** out);
  [[nodiscard]] Status ReadNonce(Nonce* out);
  // `str`: u16 length + bytes.
  [[nodiscard]] Status ReadStr(std::string_view* out);
  // u32 length + bytes (error messages).
  [[nodiscard]] Status ReadLongStr(std::string_view* out);
  // A `meta`; validates name length, dtype, ndim and dims. `numel` may be null.
  [[nodiscard]] Status ReadMeta(VariableInfo* out, uint64_t* numel);
  // A u32 count of items each at least `min_item_size` bytes long: rejects
  // counts the remaining bytes cannot hold (so callers may reserve safely).
  [[nodiscard]] Status ReadCount(size_t min_item_size, uint32_t* count);
  // Fails on trailing bytes.
  [[nodiscard]] Status Finish() const;

  size_t remaining() const { return size_ - pos_; }
  size_t offset() const { return pos_; }

 private:
  [[nodiscard]] Status Need(size_t n, const char* what);

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

// Appends little-endian fields to a byte vector.
class Writer {
 public:
  explicit Writer(std::vector<uint8_t>* out) : out_(out) {}
  void U8(uint8_t v) { out_->push_back(v); }
  void U16(uint16_t v);
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I32(int32_t v) { U32(static_cast<uint32_t>(v)); }
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F32(float v);
  void F64(double v);
  void Bytes(const void* p, size_t n);
  // Caller guarantees s.size() <= 65535 (names are validated first).
  void Str(std::string_view s);
  void LongStr(std::string_view s);
  // Caller validates with ValidateMeta first.
  void Meta(std::string_view name, std::span<const int64_t> shape);

 private:
  std::vector<uint8_t>* out_;
};

// Checks a variable name (1..kMaxNameLen bytes).
[[nodiscard]] Status ValidateName(std::string_view name);
// Checks name, ndim and dims and returns the element count.
[[nodiscard]] Status ValidateMeta(std::string_view name, std::span<const int64_t> shape,
                                  uint64_t* numel);
std::string ShapeToString(std::span<const int64_t> shape);

// ---- error frames ------------------------------------------------------------
void EncodeError(const Status& status, std::vector<uint8_t>* out);
// Parses an error payload into `remote` (never OK: code 0 becomes a protocol
// error). The return value reports malformed payloads.
[[nodiscard]] Status DecodeError(std::span<const uint8_t> payload, Status* remote);

// ---- handshake -----------------------------------------------------------------
// Connection options a client may ask for in HELLO (docs/protocol.md,
// "Connection options"). Bit 0: frames after AUTH carry checksum 0 and
// neither side computes or checks CRC-32C.
inline constexpr uint32_t kOptionNoChecksum = 1u << 0;
inline constexpr uint32_t kKnownOptions = kOptionNoChecksum;

struct HelloRequest {
  Nonce client_nonce{};
  int32_t partition_id = -1;
  int32_t attempt = 0;
  std::string client_name;
  // Sent as a trailing u32 only when set: a HELLO without it is the
  // original one, which every server accepts.
  bool has_options = false;
  uint32_t options = 0;
};
void EncodeHello(const HelloRequest& req, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeHello(std::span<const uint8_t> payload, HelloRequest* req);
// HELLO response: the server nonce, then (only when the HELLO carried
// options) the u32 options the server accepted.
void EncodeHelloResponse(const Nonce& server_nonce, bool has_options, uint32_t accepted,
                         std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeHelloResponse(std::span<const uint8_t> payload, bool expect_options,
                                         Nonce* server_nonce, uint32_t* accepted);
// AUTH request and AUTH response are each one 32-byte value.
void EncodeNonce(const Nonce& v, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeNonce(std::span<const uint8_t> payload, Nonce* v);

// ---- REGISTER / PUSH -------------------------------------------------------------
// The tensor part shared by REGISTER and PUSH: `count`, metas, data section.
struct TensorSection {
  std::vector<VariableInfo> metas;
  std::vector<uint64_t> numels;
  size_t data_offset = 0;  // payload offset of the data section
  size_t data_len = 0;     // == elem_size * sum(numels)
};
// `elem_size` is the wire size of one element: 4 (float32) or 2 (fp16/bf16,
// see WireElementSize).
[[nodiscard]] Status DecodeRegister(std::span<const uint8_t> payload, TensorSection* req,
                                    size_t elem_size = 4);

struct PushHead {
  uint8_t kind = 0;
  uint32_t mean_window = 1;
  float learning_rate = 0.0f;
};
// Head of the PUSH payload, before the tensor section (12 bytes).
inline constexpr size_t kPushHeadSize = 12;
void EncodePushHead(const PushHead& head, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodePush(std::span<const uint8_t> payload, PushHead* head,
                                TensorSection* tensors, size_t elem_size = 4);

struct RegisterResponse {
  uint64_t version = 0;
  std::vector<uint8_t> created;
};
void EncodeRegisterResponse(const RegisterResponse& r, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeRegisterResponse(std::span<const uint8_t> payload, RegisterResponse* r);

// PUSH response: the version after the push.
void EncodeVersion(uint64_t version, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeVersion(std::span<const uint8_t> payload, uint64_t* version);

// ---- LIST / PULL ----------------------------------------------------------------
void EncodeListResponse(uint64_t version, std::span<const VariableInfo> vars,
                        std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeListResponse(std::span<const uint8_t> payload, uint64_t* version,
                                        std::vector<VariableInfo>* vars);

// PULL request: u32 count (0 = all), names.
void EncodePullRequest(std::span<const std::string_view> names, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodePullRequest(std::span<const uint8_t> payload,
                                       std::vector<std::string_view>* names);
// PULL response fully in memory (tests and small tools; the client parses it
// incrementally instead).
// `flags` of the response header select the data encoding (decoded to
// float32 here).
[[nodiscard]] Status DecodePullResponse(std::span<const uint8_t> payload, uint64_t* version,
                                        std::vector<Tensor>* tensors, uint32_t flags = 0);
// Encodes n floats into the wire encoding of `flags` (fp16 or bf16) and
// back; `flags` must select one encoding.
void EncodeElements(uint32_t flags, const float* in, uint16_t* out, size_t n);
void DecodeElements(uint32_t flags, const uint16_t* in, float* out, size_t n);

// ---- SET_OPTIMIZER ------------------------------------------------------------------
// Request: u8 kind, u8[3] reserved (0), f32 learning_rate, beta1, beta2,
// epsilon, weight_decay, initial_accumulator, u32 count (0 = every
// variable), count x str name. The response is a version (EncodeVersion).
// Decoding checks the layout and the names only; the values are checked by
// optimizers::ValidateConfig, so an unknown kind is kInvalidArgument.
inline constexpr size_t kSetOptimizerHeadSize = 28;
void EncodeSetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                        std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeSetOptimizer(std::span<const uint8_t> payload, OptimizerConfig* config,
                                        std::vector<std::string_view>* names);

// ---- JOIN / LEAVE / HEARTBEAT / CONFIGURE (docs/consistency.md) ------------------------
// JOIN and LEAVE requests are empty; LEAVE, HEARTBEAT and CONFIGURE answer
// a version (EncodeVersion). JOIN answers u64 version, u64 clock.
// HEARTBEAT is empty or a progress report: u64 steps, u64 samples,
// f64 loss (NaN = unknown); any other length is malformed.
inline constexpr size_t kProgressReportSize = 24;
struct ProgressReport {
  uint64_t steps = 0;
  uint64_t samples = 0;
  double loss = 0.0;
};
// `report` null encodes the empty payload.
void EncodeHeartbeat(const ProgressReport* report, std::vector<uint8_t>* out);
// `has_report` tells whether the payload carried a report.
[[nodiscard]] Status DecodeHeartbeat(std::span<const uint8_t> payload, bool* has_report,
                                     ProgressReport* report);
inline constexpr size_t kJoinResponseSize = 16;
void EncodeJoinResponse(uint64_t version, uint64_t clock, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeJoinResponse(std::span<const uint8_t> payload, uint64_t* version,
                                        uint64_t* clock);
// CONFIGURE request: u8 mode, u8[3] reserved (0), u32 staleness,
// f32 heartbeat_timeout_s, f32 wait_timeout_s. Decoding checks the layout
// only; ValidateRunConfig checks the values (kInvalidArgument).
inline constexpr size_t kConfigureSize = 16;
void EncodeConfigure(const RunConfig& config, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeConfigure(std::span<const uint8_t> payload, RunConfig* config);
[[nodiscard]] Status ValidateRunConfig(const RunConfig& config);

// ---- REPORT / REPORTS (docs/consistency.md, "Stack dumps") -------------------------
// REPORT request: u8 kind, u8[3] reserved (0), u32 length, `length` bytes of
// UTF-8 text (not validated), length <= kMaxReportBytes. The response is a
// version (EncodeVersion). Unknown kinds, reserved bytes, a longer text and
// missing or trailing bytes are malformed.
inline constexpr uint8_t kReportStackDump = 1;
inline constexpr size_t kMaxReportBytes = 64 * 1024;
inline constexpr size_t kReportHeadSize = 8;
// Caller guarantees text.size() <= kMaxReportBytes (see ReportTail).
void EncodeReport(uint8_t kind, std::string_view text, std::vector<uint8_t>* out);
// `text` points into the payload.
[[nodiscard]] Status DecodeReport(std::span<const uint8_t> payload, uint8_t* kind,
                                  std::string_view* text);
// The last kMaxReportBytes of `text` (all of it if shorter), starting at a
// UTF-8 character boundary.
std::string_view ReportTail(std::string_view text);
// REPORTS request is empty; the response is u32 count, then per member
// i32 partition, i32 attempt, u64 clock, u64 steps, u64 progress_age_ms,
// u64 report_age_ms (UINT64_MAX: none), u32 length, text bytes.
inline constexpr size_t kMinReportsEntrySize = 44;
void EncodeReportsResponse(std::span<const WorkerReport> reports, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeReportsResponse(std::span<const uint8_t> payload,
                                           std::vector<WorkerReport>* reports);

// ---- SNAPSHOT / SNAPSHOTS / RESTORE (docs/protocol.md, "Tagged snapshots") ------------

// SNAPSHOT and RESTORE requests: exactly u64 tag (any value here; the
// server refuses tag 0).
inline constexpr size_t kTagRequestSize = 8;
void EncodeTagRequest(uint64_t tag, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeTagRequest(std::span<const uint8_t> payload, uint64_t* tag);
// Snapshot file names are 1..kMaxSnapshotNameLen bytes (NAME_MAX), not
// validated as UTF-8 (the server's are ASCII).
inline constexpr size_t kMaxSnapshotNameLen = 255;
// SNAPSHOT response: u64 version, str name (the file written).
void EncodeSnapshotResponse(uint64_t version, std::string_view name, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeSnapshotResponse(std::span<const uint8_t> payload, uint64_t* version,
                                            std::string* name);
// SNAPSHOTS request is empty; the response is u32 count, then per file
// u64 tag, u64 version, str name, newest first (at most kMaxListedSnapshots).
inline constexpr size_t kMinSnapshotsEntrySize = 19;
inline constexpr size_t kMaxListedSnapshots = 10000;
void EncodeSnapshotsResponse(std::span<const SnapshotInfo> files, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeSnapshotsResponse(std::span<const uint8_t> payload,
                                             std::vector<SnapshotInfo>* files);
// RESTORE response: the restored version (EncodeVersion).

// ---- STATS ------------------------------------------------------------------------
void EncodeStatsResponse(std::span<const StatEntry> stats, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeStatsResponse(std::span<const uint8_t> payload,
                                         std::vector<StatEntry>* stats);

}  // namespace tensorspark::protocol
