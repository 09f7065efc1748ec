// Payload codecs of the sparse-table opcodes 19-23 (docs/protocol.md,
// "Sparse tables"). Same rules as messages.h: every field is checked
// against the bytes left before use, counts are checked against the bytes
// that could hold them before anything is allocated, and Finish() rejects
// trailing bytes. Decoded views point into the payload, which must outlive
// them; id and value sections may be unaligned there, so they are exposed
// as bytes and copied out (CopyIds, CopyValues) or used where aligned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "protocol/messages.h"
#include "tensorspark/status.h"
#include "tensorspark/tables.h"
#include "tensorspark/types.h"

namespace tensorspark::protocol {

// Fixed part of a table record after its name: u32 dim, u64 vocab,
// u64 seed, u8 initializer, u8 eviction, u8 optimizer kind, u8 reserved,
// 10 x f32, u64 capacity, u32 admit_after, u32 ttl_s.
inline constexpr size_t kTableRecordFixedSize = 80;
// Smallest record: a 1-byte name (u16 length + 1) plus the fixed part.
inline constexpr size_t kMinTableRecordSize = 3 + kTableRecordFixedSize;
// Smallest per-table entry of PULL_ROWS (str of 1 byte, u32 n) and
// PUSH_ROWS (plus u32 dim).
inline constexpr size_t kMinPullRowsEntrySize = 7;
inline constexpr size_t kMinPushRowsEntrySize = 11;
// PUSH_ROWS head: u8 kind, u8[3] reserved, f32 learning_rate.
inline constexpr size_t kPushRowsHeadSize = 8;
// EXPORT_ROWS: a cursor of this value means the export is done.
inline constexpr uint64_t kExportDone = UINT64_MAX;

// A table record (TABLE_CREATE, LIST_TABLES). The caller validates the
// name first (ValidateName). Decoding checks the layout and the reserved
// byte; ValidateTableConfig checks the values.
void WriteTableRecord(Writer* w, const TableConfig& config);
[[nodiscard]] Status ReadTableRecord(Reader* r, TableConfig* config);

// ---- TABLE_CREATE (19) ----
void EncodeTableCreate(std::span<const TableConfig> tables, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeTableCreate(std::span<const uint8_t> payload,
                                       std::vector<TableConfig>* tables);
// Response: u32 count, count x u8 created (0 or 1).
void EncodeTableCreateResponse(std::span<const uint8_t> created, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeTableCreateResponse(std::span<const uint8_t> payload,
                                               std::vector<uint8_t>* created);

// One table's part of PULL_ROWS / PUSH_ROWS / EXPORT_ROWS as decoded.
struct RowsSection {
  std::string_view table;
  uint32_t dim = 0;  // PUSH_ROWS and responses only
  uint32_t n = 0;
  const uint8_t* ids = nullptr;     // n little-endian i64
  const uint8_t* values = nullptr;  // n * dim little-endian f32 (PUSH_ROWS, responses)
};
void CopyIds(const RowsSection& s, int64_t* out);
void CopyValues(const RowsSection& s, float* out);

// ---- PULL_ROWS (20) ----
// Request: u32 table_count, per table: str name, u32 n, n x i64 ids.
struct PullRowsItem {
  std::string_view table;
  std::span<const int64_t> ids;
};
// The caller validates the names (ValidateName) and counts (< 2^32).
void EncodePullRowsRequest(std::span<const PullRowsItem> items, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodePullRowsRequest(std::span<const uint8_t> payload,
                                           std::vector<RowsSection>* tables);
// Response: u64 version, u32 table_count, per table: u32 dim, u32 n,
// n x dim f32. Decoded in memory (tests, fuzzer; the client streams it).
struct RowsBlock {
  uint32_t dim = 0;
  std::vector<int64_t> ids;  // EXPORT_ROWS only
  std::vector<float> values;
};
[[nodiscard]] Status DecodePullRowsResponse(std::span<const uint8_t> payload, uint64_t* version,
                                            std::vector<RowsBlock>* tables);

// ---- PUSH_ROWS (21) ----
// Request: u8 kind (2 delta, 3 gradient), u8[3] reserved (0),
// f32 learning_rate, u32 table_count, per table: str name, u32 dim, u32 n,
// n x i64 ids, n x dim f32. The response is a version (EncodeVersion).
struct PushRowsItem {
  std::string_view table;
  uint32_t dim = 0;
  std::span<const int64_t> ids;
  std::span<const float> values;  // ids.size() * dim
};
// Encodes the whole request into `out` (tests, fuzzer seeds; the client
// sends ids and values from the caller's buffers instead).
void EncodePushRows(uint8_t kind, float learning_rate, std::span<const PushRowsItem> items,
                    std::vector<uint8_t>* out);
// Checks the layout, the kind (2 or 3) and that n x dim fits the payload;
// dim is checked against the table by the server.
[[nodiscard]] Status DecodePushRows(std::span<const uint8_t> payload, uint8_t* kind,
                                    float* learning_rate, std::vector<RowsSection>* tables);

// ---- EXPORT_ROWS (22) ----
// Request: exactly str name, u64 cursor, u32 max_rows (>= 1).
void EncodeExportRowsRequest(std::string_view table, uint64_t cursor, uint32_t max_rows,
                             std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeExportRowsRequest(std::span<const uint8_t> payload,
                                             std::string_view* table, uint64_t* cursor,
                                             uint32_t* max_rows);
// Response: u64 next_cursor (kExportDone: no more rows), u32 dim, u32 n,
// n x i64 ids, n x dim f32.
[[nodiscard]] Status DecodeExportRowsResponse(std::span<const uint8_t> payload,
                                              uint64_t* next_cursor, RowsBlock* rows);

// ---- LIST_TABLES (23) ----
// Request empty; response: u32 count, count x (table record, u64 rows).
void EncodeListTablesResponse(std::span<const TableInfo> tables, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeListTablesResponse(std::span<const uint8_t> payload,
                                              std::vector<TableInfo>* tables);

}  // namespace tensorspark::protocol
