#include "protocol/table_messages.h"

#include <bit>
#include <cstring>
#include <string>

namespace tensorspark::protocol {

static_assert(std::endian::native == std::endian::little,
              "ids and rows travel as raw little-endian bytes");

namespace {

Status Malformed(const std::string& what) {
  return Status(StatusCode::kProtocolError, "malformed payload: " + what);
}

Status ReadTableName(Reader* r, std::string_view* name) {
  TS_RETURN_IF_ERROR(r->ReadStr(name));
  if (Status s = ValidateName(*name); !s.ok()) return Malformed("table name: " + s.message());
  return Status::OK();
}

// n ids (and n * dim floats when `dim` > 0) of `table`, checked against
// the bytes left before the caller allocates anything for them.
Status ReadRows(Reader* r, RowsSection* s, bool with_values) {
  const uint64_t row_bytes = 8 + (with_values ? uint64_t{s->dim} * 4 : 0);
  if (s->n > r->remaining() / row_bytes) {
    return Malformed("table '" + std::string(s->table) + "' announces " + std::to_string(s->n) +
                     " rows of " + std::to_string(row_bytes) + " bytes, but only " +
                     std::to_string(r->remaining()) + " bytes are left");
  }
  TS_RETURN_IF_ERROR(r->ReadBytes(size_t{s->n} * 8, &s->ids));
  if (with_values) {
    TS_RETURN_IF_ERROR(r->ReadBytes(size_t{s->n} * s->dim * 4, &s->values));
  }
  return Status::OK();
}

Status ReadCreated(Reader* r, std::vector<uint8_t>* created) {
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r->ReadCount(1, &count));
  created->resize(count);
  for (uint32_t i = 0; i < count; ++i) {
    TS_RETURN_IF_ERROR(r->ReadU8(&(*created)[i]));
    if ((*created)[i] > 1) return Malformed("created flag " + std::to_string((*created)[i]));
  }
  return r->Finish();
}

}  // namespace

void WriteTableRecord(Writer* w, const TableConfig& c) {
  w->Str(c.name);
  w->U32(c.dim);
  w->U64(c.vocab);
  w->U64(c.seed);
  w->U8(static_cast<uint8_t>(c.initializer));
  w->U8(static_cast<uint8_t>(c.eviction));
  w->U8(static_cast<uint8_t>(c.optimizer.kind));
  w->U8(0);
  w->F32(c.init_scale);
  const RowOptimizerConfig& o = c.optimizer;
  for (float v : {o.learning_rate, o.beta1, o.beta2, o.epsilon, o.initial_accumulator, o.l1, o.l2,
                  o.lr_power, o.beta}) {
    w->F32(v);
  }
  w->U64(c.capacity);
  w->U32(c.admit_after);
  w->U32(c.ttl_s);
}

Status ReadTableRecord(Reader* r, TableConfig* c) {
  std::string_view name;
  TS_RETURN_IF_ERROR(ReadTableName(r, &name));
  if (r->remaining() < kTableRecordFixedSize) {
    return Malformed("table '" + std::string(name) + "': truncated record (" +
                     std::to_string(r->remaining()) + " of " +
                     std::to_string(kTableRecordFixedSize) + " bytes after the name)");
  }
  c->name.assign(name);
  uint8_t init = 0, eviction = 0, kind = 0, reserved = 0;
  TS_RETURN_IF_ERROR(r->ReadU32(&c->dim));
  TS_RETURN_IF_ERROR(r->ReadU64(&c->vocab));
  TS_RETURN_IF_ERROR(r->ReadU64(&c->seed));
  TS_RETURN_IF_ERROR(r->ReadU8(&init));
  TS_RETURN_IF_ERROR(r->ReadU8(&eviction));
  TS_RETURN_IF_ERROR(r->ReadU8(&kind));
  TS_RETURN_IF_ERROR(r->ReadU8(&reserved));
  if (reserved != 0) {
    return Malformed("table '" + c->name + "': reserved byte is " + std::to_string(reserved) +
                     ", must be 0");
  }
  // Any byte is representable; ValidateTableConfig names unknown values.
  c->initializer = static_cast<RowInitializer>(init);
  c->eviction = static_cast<EvictionPolicy>(eviction);
  RowOptimizerConfig& o = c->optimizer;
  o.kind = static_cast<RowOptimizerKind>(kind);
  TS_RETURN_IF_ERROR(r->ReadF32(&c->init_scale));
  for (float* v : {&o.learning_rate, &o.beta1, &o.beta2, &o.epsilon, &o.initial_accumulator, &o.l1,
                   &o.l2, &o.lr_power, &o.beta}) {
    TS_RETURN_IF_ERROR(r->ReadF32(v));
  }
  TS_RETURN_IF_ERROR(r->ReadU64(&c->capacity));
  TS_RETURN_IF_ERROR(r->ReadU32(&c->admit_after));
  return r->ReadU32(&c->ttl_s);
}

void CopyIds(const RowsSection& s, int64_t* out) {
  if (s.n > 0) std::memcpy(out, s.ids, size_t{s.n} * 8);
}

void CopyValues(const RowsSection& s, float* out) {
  if (s.n > 0 && s.dim > 0) std::memcpy(out, s.values, size_t{s.n} * s.dim * 4);
}

// ---- TABLE_CREATE ----

void EncodeTableCreate(std::span<const TableConfig> tables, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(tables.size()));
  for (const TableConfig& c : tables) WriteTableRecord(&w, c);
}

Status DecodeTableCreate(std::span<const uint8_t> payload, std::vector<TableConfig>* tables) {
  Reader r(payload);
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinTableRecordSize, &count));
  if (count == 0) return Malformed("TABLE_CREATE with no tables");
  tables->assign(count, TableConfig{});
  for (uint32_t i = 0; i < count; ++i) TS_RETURN_IF_ERROR(ReadTableRecord(&r, &(*tables)[i]));
  return r.Finish();
}

void EncodeTableCreateResponse(std::span<const uint8_t> created, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(created.size()));
  for (uint8_t c : created) w.U8(c);
}

Status DecodeTableCreateResponse(std::span<const uint8_t> payload, std::vector<uint8_t>* created) {
  Reader r(payload);
  return ReadCreated(&r, created);
}

// ---- PULL_ROWS ----

void EncodePullRowsRequest(std::span<const PullRowsItem> items, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(items.size()));
  for (const PullRowsItem& it : items) {
    w.Str(it.table);
    w.U32(static_cast<uint32_t>(it.ids.size()));
    w.Bytes(it.ids.data(), it.ids.size_bytes());
  }
}

Status DecodePullRowsRequest(std::span<const uint8_t> payload, std::vector<RowsSection>* tables) {
  Reader r(payload);
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinPullRowsEntrySize, &count));
  tables->assign(count, RowsSection{});
  for (RowsSection& s : *tables) {
    TS_RETURN_IF_ERROR(ReadTableName(&r, &s.table));
    TS_RETURN_IF_ERROR(r.ReadU32(&s.n));
    TS_RETURN_IF_ERROR(ReadRows(&r, &s, false));
  }
  return r.Finish();
}

Status DecodePullRowsResponse(std::span<const uint8_t> payload, uint64_t* version,
                              std::vector<RowsBlock>* tables) {
  Reader r(payload);
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  TS_RETURN_IF_ERROR(r.ReadCount(8, &count));
  tables->assign(count, RowsBlock{});
  for (RowsBlock& b : *tables) {
    uint32_t n = 0;
    TS_RETURN_IF_ERROR(r.ReadU32(&b.dim));
    TS_RETURN_IF_ERROR(r.ReadU32(&n));
    const uint64_t floats = uint64_t{n} * b.dim;
    if (floats > r.remaining() / 4) {
      return Malformed("PULL_ROWS response announces " + std::to_string(n) + " rows of dim " +
                       std::to_string(b.dim) + " but only " + std::to_string(r.remaining()) +
                       " bytes are left");
    }
    const uint8_t* p = nullptr;
    TS_RETURN_IF_ERROR(r.ReadBytes(floats * 4, &p));
    b.values.resize(floats);
    if (floats > 0) std::memcpy(b.values.data(), p, floats * 4);
  }
  return r.Finish();
}

// ---- PUSH_ROWS ----

void EncodePushRows(uint8_t kind, float learning_rate, std::span<const PushRowsItem> items,
                    std::vector<uint8_t>* out) {
  Writer w(out);
  w.U8(kind);
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.F32(learning_rate);
  w.U32(static_cast<uint32_t>(items.size()));
  for (const PushRowsItem& it : items) {
    w.Str(it.table);
    w.U32(it.dim);
    w.U32(static_cast<uint32_t>(it.ids.size()));
    w.Bytes(it.ids.data(), it.ids.size_bytes());
    w.Bytes(it.values.data(), it.values.size_bytes());
  }
}

Status DecodePushRows(std::span<const uint8_t> payload, uint8_t* kind, float* learning_rate,
                      std::vector<RowsSection>* tables) {
  Reader r(payload);
  uint8_t reserved[3];
  TS_RETURN_IF_ERROR(r.ReadU8(kind));
  for (uint8_t& b : reserved) TS_RETURN_IF_ERROR(r.ReadU8(&b));
  if (reserved[0] != 0 || reserved[1] != 0 || reserved[2] != 0) {
    return Malformed("PUSH_ROWS reserved bytes must be 0");
  }
  if (*kind != static_cast<uint8_t>(UpdateKind::kDelta) &&
      *kind != static_cast<uint8_t>(UpdateKind::kGradient)) {
    return Malformed("PUSH_ROWS kind " + std::to_string(*kind) +
                     "; rows take 2 (delta) or 3 (gradient)");
  }
  TS_RETURN_IF_ERROR(r.ReadF32(learning_rate));
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinPushRowsEntrySize, &count));
  tables->assign(count, RowsSection{});
  for (RowsSection& s : *tables) {
    TS_RETURN_IF_ERROR(ReadTableName(&r, &s.table));
    TS_RETURN_IF_ERROR(r.ReadU32(&s.dim));
    TS_RETURN_IF_ERROR(r.ReadU32(&s.n));
    if (s.dim == 0 || s.dim > kMaxTableDim) {
      return Malformed("table '" + std::string(s.table) + "': dim " + std::to_string(s.dim) +
                       " is outside 1.." + std::to_string(kMaxTableDim));
    }
    TS_RETURN_IF_ERROR(ReadRows(&r, &s, true));
  }
  return r.Finish();
}

// ---- EXPORT_ROWS ----

void EncodeExportRowsRequest(std::string_view table, uint64_t cursor, uint32_t max_rows,
                             std::vector<uint8_t>* out) {
  Writer w(out);
  w.Str(table);
  w.U64(cursor);
  w.U32(max_rows);
}

Status DecodeExportRowsRequest(std::span<const uint8_t> payload, std::string_view* table,
                               uint64_t* cursor, uint32_t* max_rows) {
  Reader r(payload);
  TS_RETURN_IF_ERROR(ReadTableName(&r, table));
  TS_RETURN_IF_ERROR(r.ReadU64(cursor));
  TS_RETURN_IF_ERROR(r.ReadU32(max_rows));
  if (*max_rows == 0) return Malformed("EXPORT_ROWS max_rows must be at least 1");
  return r.Finish();
}

Status DecodeExportRowsResponse(std::span<const uint8_t> payload, uint64_t* next_cursor,
                                RowsBlock* rows) {
  Reader r(payload);
  RowsSection s;
  TS_RETURN_IF_ERROR(r.ReadU64(next_cursor));
  TS_RETURN_IF_ERROR(r.ReadU32(&s.dim));
  TS_RETURN_IF_ERROR(r.ReadU32(&s.n));
  if (s.dim == 0 || s.dim > kMaxTableDim) {
    return Malformed("EXPORT_ROWS response dim " + std::to_string(s.dim));
  }
  TS_RETURN_IF_ERROR(ReadRows(&r, &s, true));
  TS_RETURN_IF_ERROR(r.Finish());
  rows->dim = s.dim;
  rows->ids.resize(s.n);
  rows->values.resize(size_t{s.n} * s.dim);
  CopyIds(s, rows->ids.data());
  CopyValues(s, rows->values.data());
  return Status::OK();
}

// ---- LIST_TABLES ----

void EncodeListTablesResponse(std::span<const TableInfo> tables, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(tables.size()));
  for (const TableInfo& t : tables) {
    WriteTableRecord(&w, t.config);
    w.U64(t.rows);
  }
}

Status DecodeListTablesResponse(std::span<const uint8_t> payload, std::vector<TableInfo>* tables) {
  Reader r(payload);
  uint32_t count = 0;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinTableRecordSize + 8, &count));
  tables->assign(count, TableInfo{});
  for (TableInfo& t : *tables) {
    TS_RETURN_IF_ERROR(ReadTableRecord(&r, &t.config));
    TS_RETURN_IF_ERROR(r.ReadU64(&t.rows));
  }
  return r.Finish();
}

}  // namespace tensorspark::protocol
