#include "storage/snapshot.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <tuple>
#include <unordered_set>

#include "optimizers/optimizers.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "storage/snapshot_io.h"
#include "storage/table_snapshot.h"

namespace tensorspark::storage {

using protocol::LoadLE16;
using protocol::LoadLE32;
using protocol::LoadLE64;
using protocol::StoreLE16;
using protocol::StoreLE32;
using protocol::StoreLE64;

namespace {

constexpr char kMagic[6] = {'T', 'S', 'S', 'N', 'A', 'P'};
constexpr char kTrailerMagic[8] = {'T', 'S', 'S', 'N', 'E', 'N', 'D', '\0'};
constexpr char kPrefix[] = "snapshot-";
constexpr char kSuffix[] = ".tsnap";
constexpr char kTmpPrefix[] = ".snapshot-";
constexpr char kTmpSuffix[] = ".tmp";
// Between version and tag in the name of a tagged snapshot.
constexpr std::string_view kTagInfix = "-tag-";
constexpr size_t kVersionDigits = 20;
// Format 1 (68-byte header, no tag) is still read.
constexpr uint16_t kFormatUntagged = 1;
constexpr size_t kHeaderSizeV1 = 68;
constexpr uint8_t kRecordTensor = 1;
constexpr uint8_t kRecordSlot = 2;
// Format 3's table section, before the tensors: one section record, its
// chain files, its tables (meta only, no data).
constexpr uint8_t kRecordTableSection = 3;
constexpr uint8_t kRecordChainFile = 4;
constexpr uint8_t kRecordTable = 5;
constexpr size_t kTableSectionMetaSize = 16;
// Far above what a writer produces (kTableFullEvery files, TableStore's
// 1024 tables by default); anything larger is corrupt.
constexpr uint32_t kMaxChainFiles = 1024;
constexpr uint32_t kMaxTables = 1u << 20;
constexpr uint8_t kFlagDefaultOptimizer = 1;  // header flags
constexpr uint8_t kFlagHasOptimizer = 1;      // tensor flags
constexpr uint8_t kFlagSlotsReady = 2;
constexpr size_t kOptimizerConfigSize = 28;
constexpr size_t kSlotMetaSize = 8;
// Tensor metas are far smaller (a 1024-byte name, 8 dims, 40 bytes of
// optimizer state); anything larger is corrupt.
constexpr uint32_t kMaxMetaLen = 4096;
using namespace snapshot_io;

std::string VersionDigits(uint64_t v) {
  std::string digits = std::to_string(v);
  return std::string(kVersionDigits - digits.size(), '0') + digits;
}

// "<version>" or "<version>-tag-<tag>": what sits between prefix and suffix.
std::string VersionAndTag(uint64_t version, uint64_t tag) {
  std::string s = VersionDigits(version);
  if (tag != 0) s += std::string(kTagInfix) + VersionDigits(tag);
  return s;
}

std::string TmpFileName(uint64_t version, uint64_t tag) {
  return kTmpPrefix + VersionAndTag(version, tag) + kTmpSuffix;
}

bool ParseDigits(std::string_view s, uint64_t* out) {
  return snapshot_io::ParseFixedDigits(s, kVersionDigits, out);
}

// Only canonical names: 20 digits each, and a tag only when it is not 0.
bool ParseWrapped(std::string_view name, std::string_view prefix, std::string_view suffix,
                  uint64_t* version, uint64_t* tag) {
  if (!name.starts_with(prefix) || !name.ends_with(suffix)) return false;
  name.remove_prefix(prefix.size());
  name.remove_suffix(suffix.size());
  uint64_t t = 0;
  if (name.size() == 2 * kVersionDigits + kTagInfix.size()) {
    if (name.substr(kVersionDigits, kTagInfix.size()) != kTagInfix ||
        !ParseDigits(name.substr(kVersionDigits + kTagInfix.size()), &t) || t == 0) {
      return false;
    }
    name = name.substr(0, kVersionDigits);
  }
  if (!ParseDigits(name, version)) return false;
  if (tag != nullptr) *tag = t;
  return true;
}

void EncodeConfig(const std::optional<OptimizerConfig>& c, uint8_t out[kOptimizerConfigSize]) {
  std::memset(out, 0, kOptimizerConfigSize);
  if (!c) return;
  out[0] = static_cast<uint8_t>(c->kind);
  const float fields[6] = {c->learning_rate, c->beta1,        c->beta2,
                           c->epsilon,       c->weight_decay, c->initial_accumulator};
  for (int i = 0; i < 6; ++i) StoreLE32(out + 4 + 4 * i, std::bit_cast<uint32_t>(fields[i]));
}

OptimizerConfig DecodeConfig(const uint8_t in[kOptimizerConfigSize]) {
  OptimizerConfig c;
  c.kind = static_cast<OptimizerKind>(in[0]);
  float* fields[6] = {&c.learning_rate, &c.beta1,        &c.beta2,
                      &c.epsilon,       &c.weight_decay, &c.initial_accumulator};
  for (int i = 0; i < 6; ++i) *fields[i] = std::bit_cast<float>(LoadLE32(in + 4 + 4 * i));
  return c;
}

// Writes header, records and trailer; info->version and tag are set by the
// caller.
Status WriteTableSection(const TableSection& t, FileWriter* w) {
  std::vector<uint8_t> meta(kTableSectionMetaSize, 0);
  StoreLE32(meta.data(), static_cast<uint32_t>(t.files.size()));
  StoreLE32(meta.data() + 4, static_cast<uint32_t>(t.tables.size()));
  TS_RETURN_IF_ERROR(w->Record(kRecordTableSection, meta, nullptr, 0));
  for (const TableChainFileRef& f : t.files) {
    meta.clear();
    protocol::Writer mw(&meta);
    mw.Str(f.name);
    mw.U64(f.bytes);
    mw.U32(f.crc);
    mw.U32(0);
    TS_RETURN_IF_ERROR(w->Record(kRecordChainFile, meta, nullptr, 0));
  }
  for (const TableSectionEntry& e : t.tables) {
    meta.clear();
    EncodeTableEntry(e, &meta);
    TS_RETURN_IF_ERROR(w->Record(kRecordTable, meta, nullptr, 0));
  }
  return Status::OK();
}

Status WriteBody(const ParamStore& store, FileWriter* w, WrittenSnapshot* info,
                 const TableSection* tables) {
  const std::optional<OptimizerConfig> default_opt = store.default_optimizer();
  std::vector<Variable*> vars;
  store.All(&vars);
  info->variables = vars.size();

  uint8_t header[kSnapshotHeaderSize] = {};
  std::memcpy(header, kMagic, sizeof(kMagic));
  StoreLE16(header + 6, tables != nullptr ? kSnapshotFormatTables : kSnapshotFormatVersion);
  StoreLE64(header + 8, info->version);
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  StoreLE64(header + 16, static_cast<uint64_t>(
                             std::chrono::duration_cast<std::chrono::milliseconds>(now).count()));
  StoreLE64(header + 24, vars.size());
  header[32] = default_opt ? kFlagDefaultOptimizer : 0;
  EncodeConfig(default_opt, header + 36);
  StoreLE64(header + 64, info->tag);
  StoreLE32(header + 72, protocol::Crc32c(header, 72));
  TS_RETURN_IF_ERROR(w->Append(header, sizeof(header)));
  if (tables != nullptr) TS_RETURN_IF_ERROR(WriteTableSection(*tables, w));

  VariableState state;  // reused: one variable's copy at a time
  std::vector<uint8_t> meta;
  for (const Variable* v : vars) {
    v->CopyState(&state);  // the only part under the variable's lock
    const int slots = state.slots_ready ? optimizers::NumSlots(state.optimizer->kind) : 0;
    meta.clear();
    protocol::Writer mw(&meta);
    mw.Meta(state.name, state.shape);
    mw.U8((state.optimizer ? kFlagHasOptimizer : 0) | (state.slots_ready ? kFlagSlotsReady : 0));
    mw.U8(static_cast<uint8_t>(slots));
    mw.U16(0);
    uint8_t config[kOptimizerConfigSize];
    EncodeConfig(state.optimizer, config);
    mw.Bytes(config, sizeof(config));
    mw.U64(state.step);
    TS_RETURN_IF_ERROR(w->Record(kRecordTensor, meta, state.values.data(), state.values.size()));
    for (int i = 0; i < slots; ++i) {
      meta.assign(kSlotMetaSize, 0);
      meta[0] = static_cast<uint8_t>(i);
      TS_RETURN_IF_ERROR(
          w->Record(kRecordSlot, meta, state.slots[i].data(), state.slots[i].size()));
    }
  }

  uint8_t trailer[kSnapshotTrailerSize];
  std::memcpy(trailer, kTrailerMagic, sizeof(kTrailerMagic));
  StoreLE64(trailer + 8, w->records());
  TS_RETURN_IF_ERROR(w->Append(trailer, 16));
  StoreLE32(trailer + 16, w->file_crc());
  TS_RETURN_IF_ERROR(w->Append(trailer + 16, 4));
  info->bytes = w->bytes();
  return w->Finish();
}

// Strips the "malformed payload: " prefix of protocol::Reader errors.
std::string MetaError(const Status& s) {
  constexpr std::string_view kPrefixText = "malformed payload: ";
  std::string_view m = s.message();
  if (m.starts_with(kPrefixText)) m.remove_prefix(kPrefixText.size());
  return std::string(m);
}

// One record read and checksummed; `meta` and `data` hold its contents.
struct RawRecord {
  uint8_t type = 0;
  uint64_t offset = 0;  // of its first byte
  std::vector<uint8_t> meta;
};

// For messages: "tensor 'w'" when the meta parses far enough, else "tensor #i".
std::string TensorLabel(const std::vector<uint8_t>& meta, uint64_t index) {
  protocol::Reader r(meta);
  std::string_view name;
  if (r.ReadStr(&name).ok() && !name.empty()) return "tensor '" + std::string(name) + "'";
  return "tensor #" + std::to_string(index);
}

// Reads record `index` (header, meta, data into `data`, CRC) and checks
// its framing and CRC, nothing of its meaning. `what` names it for messages
// until the meta can be trusted.
Status ReadRecord(FileReader* f, uint64_t index, const std::string& what, RawRecord* rec,
                  std::vector<float>* data) {
  rec->offset = f->pos();
  const std::string label = "record " + std::to_string(index) + " (" + what + ")";
  TS_RETURN_IF_ERROR(f->Need(kSnapshotRecordHeaderSize, "the header of " + label));
  f->crc().BeginRecord();
  uint8_t head[kSnapshotRecordHeaderSize];
  TS_RETURN_IF_ERROR(f->Read(head, sizeof(head)));
  rec->type = head[0];
  const uint32_t meta_len = LoadLE32(head + 4);
  const uint64_t data_len = LoadLE64(head + 8);
  const std::string at =
      " (record " + std::to_string(index) + " at byte " + std::to_string(rec->offset) + ")";
  if (meta_len > kMaxMetaLen || data_len % sizeof(float) != 0 ||
      data_len / sizeof(float) > protocol::kMaxElements) {
    return f->Fail(what + " has a corrupt record header: meta " + std::to_string(meta_len) +
                   " bytes, data " + std::to_string(data_len) + " bytes" + at);
  }
  TS_RETURN_IF_ERROR(f->Need(uint64_t{meta_len} + data_len + 4, "the rest of " + label));
  rec->meta.resize(meta_len);
  TS_RETURN_IF_ERROR(f->Read(rec->meta.data(), meta_len));
  data->resize(data_len / sizeof(float));
  TS_RETURN_IF_ERROR(f->Read(data->data(), data_len));
  const uint32_t computed = f->crc().EndRecord();
  uint8_t stored[4];
  TS_RETURN_IF_ERROR(f->Read(stored, sizeof(stored)));
  if (LoadLE32(stored) != computed) {
    const std::string name = rec->type == kRecordTensor ? TensorLabel(rec->meta, index) : what;
    return f->Fail(name + " checksum mismatch" + at);
  }
  return Status::OK();
}

Status ParseTensorMeta(const FileReader& f, const RawRecord& rec, uint64_t index, VariableState* v,
                       int* slot_count) {
  const std::string at =
      " (record " + std::to_string(index) + " at byte " + std::to_string(rec.offset) + ")";
  protocol::Reader r(rec.meta);
  VariableInfo info;
  uint64_t numel = 0;
  if (Status s = r.ReadMeta(&info, &numel); !s.ok()) {
    return f.Fail("tensor #" + std::to_string(index) + ": " + MetaError(s) + at);
  }
  const std::string who = "tensor '" + info.name + "'";
  uint8_t flags = 0, slots = 0;
  uint16_t reserved = 0;
  const uint8_t* config = nullptr;
  uint64_t step = 0;
  Status s = r.ReadU8(&flags);
  if (s.ok()) s = r.ReadU8(&slots);
  if (s.ok()) s = r.ReadU16(&reserved);
  if (s.ok()) s = r.ReadBytes(kOptimizerConfigSize, &config);
  if (s.ok()) s = r.ReadU64(&step);
  if (s.ok()) s = r.Finish();
  if (!s.ok()) return f.Fail(who + ": " + MetaError(s) + at);
  if ((flags & ~(kFlagHasOptimizer | kFlagSlotsReady)) != 0 || reserved != 0) {
    return f.Fail(who + ": unknown flags or reserved bits set" + at);
  }
  v->name = std::move(info.name);
  v->shape = std::move(info.shape);
  v->slots_ready = (flags & kFlagSlotsReady) != 0;
  v->step = step;
  v->optimizer.reset();
  if (flags & kFlagHasOptimizer) {
    v->optimizer = DecodeConfig(config);
    if (Status c = optimizers::ValidateConfig(*v->optimizer); !c.ok()) {
      return f.Fail(who + ": " + c.message() + at);
    }
  } else if (v->slots_ready || step != 0 ||
             std::any_of(config, config + kOptimizerConfigSize, [](uint8_t b) { return b; })) {
    return f.Fail(who + ": optimizer state without an optimizer" + at);
  }
  const int expected = v->slots_ready ? optimizers::NumSlots(v->optimizer->kind) : 0;
  if (slots != expected) {
    return f.Fail(who + ": " + std::to_string(slots) + " slot records announced, " +
                  std::to_string(expected) + " expected" + at);
  }
  *slot_count = slots;
  if (v->values.size() != numel) {
    return f.Fail(who + ": " + std::to_string(v->values.size()) + " values for shape " +
                  protocol::ShapeToString(v->shape) + at);
  }
  return Status::OK();
}

// Reads and checks the header (format 1 or 2) and that the file can hold
// the tensors it announces (at least a record header and CRC each, and the
// trailer). Leaves the reader at the first record.
Status ReadHeader(FileReader* f, SnapshotHeader* h, std::optional<OptimizerConfig>* default_opt) {
  uint8_t header[kSnapshotHeaderSize];  // format 2's, the larger
  const size_t magic_have = static_cast<size_t>(std::min<uint64_t>(f->size(), sizeof(kMagic)));
  const size_t fixed_have = static_cast<size_t>(std::min<uint64_t>(f->size(), 8));
  TS_RETURN_IF_ERROR(f->Read(header, fixed_have));
  if (std::memcmp(header, kMagic, magic_have) != 0) {
    return f->Fail("not a tensorspark snapshot (the file does not start with \"TSSNAP\")");
  }
  if (fixed_have < 8) {
    return f->Truncated(f->size(),
                        "the header needs at least " + std::to_string(kHeaderSizeV1) + " bytes");
  }
  const uint16_t format = LoadLE16(header + 6);
  if (format != kFormatUntagged && format != kSnapshotFormatVersion &&
      format != kSnapshotFormatTables) {
    return f->Fail("snapshot format version " + std::to_string(format) +
                   " is not supported (this build reads versions 1 to " +
                   std::to_string(kSnapshotFormatTables) + ")");
  }
  const size_t size = format == kFormatUntagged ? kHeaderSizeV1 : kSnapshotHeaderSize;
  if (f->size() < size) {
    return f->Truncated(f->size(), "the header needs " + std::to_string(size) + " bytes");
  }
  TS_RETURN_IF_ERROR(f->Read(header + 8, size - 8));
  if (LoadLE32(header + size - 4) != protocol::Crc32c(header, size - 4)) {
    return f->Fail("header checksum mismatch");
  }
  h->format = format;
  h->version = LoadLE64(header + 8);
  h->created_unix_ms = LoadLE64(header + 16);
  h->tensors = LoadLE64(header + 24);
  h->tag = format == kFormatUntagged ? 0 : LoadLE64(header + 64);
  const uint8_t header_flags = header[32];
  if ((header_flags & ~kFlagDefaultOptimizer) != 0 || header[33] || header[34] || header[35]) {
    return f->Fail("unknown header flags or reserved bits set");
  }
  default_opt->reset();
  if (header_flags & kFlagDefaultOptimizer) {
    *default_opt = DecodeConfig(header + 36);
    if (Status c = optimizers::ValidateConfig(**default_opt); !c.ok()) {
      return f->Fail("default " + c.message());
    }
  }
  // Each tensor takes at least a record header and CRC: the header is
  // intact (its CRC matched), so a file too short for them was cut. The
  // check also keeps a huge count from sizing an allocation.
  const uint64_t count = h->tensors;
  const uint64_t min_record = kSnapshotRecordHeaderSize + 4;
  const uint64_t left = f->size() - f->pos();
  if (count > left / min_record || left < count * min_record + kSnapshotTrailerSize) {
    return f->Truncated(f->size(), "the header announces " + std::to_string(count) +
                                       " tensors, which need more bytes");
  }
  return Status::OK();
}

// Format 3's table section (header already read); `records` counts on.
Status ReadTableSection(FileReader* f, uint64_t* records, TableSection* out) {
  out->files.clear();
  out->tables.clear();
  RawRecord rec;
  std::vector<float> data;
  const auto at = [&] {
    return " (record " + std::to_string(*records) + " at byte " + std::to_string(rec.offset) + ")";
  };
  TS_RETURN_IF_ERROR(ReadRecord(f, *records, "table section", &rec, &data));
  if (rec.type != kRecordTableSection || rec.meta.size() != kTableSectionMetaSize ||
      !data.empty() ||
      std::any_of(rec.meta.begin() + 8, rec.meta.end(), [](uint8_t b) { return b; })) {
    return f->Fail("the table section record is malformed" + at());
  }
  const uint32_t files = LoadLE32(rec.meta.data());
  const uint32_t tables = LoadLE32(rec.meta.data() + 4);
  if (files > kMaxChainFiles || tables > kMaxTables || (tables > 0) != (files > 0)) {
    return f->Fail("the table section announces " + std::to_string(files) + " chain files and " +
                   std::to_string(tables) + " tables" + at());
  }
  ++*records;
  for (uint32_t i = 0; i < files; ++i) {
    const std::string what = "chain file #" + std::to_string(i);
    TS_RETURN_IF_ERROR(ReadRecord(f, *records, what, &rec, &data));
    protocol::Reader r(rec.meta);
    std::string_view name;
    TableChainFileRef ref;
    uint32_t reserved = 0;
    Status s = rec.type == kRecordChainFile && data.empty()
                   ? r.ReadStr(&name)
                   : Status(StatusCode::kInvalidArgument, "not a chain file record");
    if (s.ok()) s = r.ReadU64(&ref.bytes);
    if (s.ok()) s = r.ReadU32(&ref.crc);
    if (s.ok()) s = r.ReadU32(&reserved);
    if (s.ok()) s = r.Finish();
    uint64_t seq = 0;
    if (s.ok() && (reserved != 0 || !ParseTableFileName(name, &seq))) {
      s = Status(StatusCode::kInvalidArgument, "not a chain file name");
    }
    if (!s.ok()) return f->Fail(what + ": " + MetaError(s) + at());
    ref.name = std::string(name);
    out->files.push_back(std::move(ref));
    ++*records;
  }
  std::unordered_set<std::string> names;
  for (uint32_t i = 0; i < tables; ++i) {
    const std::string what = "table #" + std::to_string(i);
    TS_RETURN_IF_ERROR(ReadRecord(f, *records, what, &rec, &data));
    TableSectionEntry e;
    Status s = rec.type == kRecordTable && data.empty()
                   ? DecodeTableEntry(rec.meta, &e)
                   : Status(StatusCode::kInvalidArgument, "not a table record");
    if (s.ok() && e.full_index >= files) {
      s = Status(StatusCode::kInvalidArgument, "its full image is in chain file #" +
                                                   std::to_string(e.full_index) + " of " +
                                                   std::to_string(files));
    }
    if (s.ok() && !names.insert(e.config.name).second) {
      s = Status(StatusCode::kInvalidArgument, "table '" + e.config.name + "' appears twice");
    }
    if (!s.ok()) return f->Fail(what + ": " + s.message() + at());
    out->tables.push_back(std::move(e));
    ++*records;
  }
  return Status::OK();
}

Status ReadAll(FileReader* f, SnapshotData* out) {
  SnapshotHeader h;
  TS_RETURN_IF_ERROR(ReadHeader(f, &h, &out->default_optimizer));
  out->version = h.version;
  out->tag = h.tag;
  out->created_unix_ms = h.created_unix_ms;
  const uint64_t count = h.tensors;

  // Records.
  uint64_t records = 0;
  out->has_tables = h.format == kSnapshotFormatTables;
  out->table_section = {};
  out->tables.clear();
  if (out->has_tables) TS_RETURN_IF_ERROR(ReadTableSection(f, &records, &out->table_section));
  out->variables.clear();
  out->variables.reserve(count);
  std::unordered_set<std::string> names;
  RawRecord rec;
  for (uint64_t t = 0; t < count; ++t) {
    VariableState v;
    const std::string what = "tensor #" + std::to_string(t);
    TS_RETURN_IF_ERROR(ReadRecord(f, records, what, &rec, &v.values));
    if (rec.type != kRecordTensor) {
      return f->Fail("record " + std::to_string(records) + " at byte " +
                     std::to_string(rec.offset) + " has type " + std::to_string(rec.type) +
                     " where tensor #" + std::to_string(t) + " was expected");
    }
    int slots = 0;
    TS_RETURN_IF_ERROR(ParseTensorMeta(*f, rec, records, &v, &slots));
    ++records;
    if (!names.insert(v.name).second) {
      return f->Fail("tensor '" + v.name + "' appears twice");
    }
    for (int i = 0; i < slots; ++i) {
      const std::string slot_what = "tensor '" + v.name + "' slot " + std::to_string(i);
      TS_RETURN_IF_ERROR(ReadRecord(f, records, slot_what, &rec, &v.slots[i]));
      const std::string at =
          " (record " + std::to_string(records) + " at byte " + std::to_string(rec.offset) + ")";
      ++records;
      if (rec.type != kRecordSlot || rec.meta.size() != kSlotMetaSize || rec.meta[0] != i ||
          std::any_of(rec.meta.begin() + 1, rec.meta.end(), [](uint8_t b) { return b; })) {
        return f->Fail(slot_what + ": not the expected slot record" + at);
      }
      if (v.slots[i].size() != v.values.size()) {
        return f->Fail(slot_what + ": " + std::to_string(v.slots[i].size()) + " values for " +
                       std::to_string(v.values.size()) + " elements" + at);
      }
    }
    out->variables.push_back(std::move(v));
  }

  // Trailer.
  TS_RETURN_IF_ERROR(f->Need(kSnapshotTrailerSize, "the trailer"));
  uint8_t trailer[kSnapshotTrailerSize];
  TS_RETURN_IF_ERROR(f->Read(trailer, 16));
  const uint32_t computed = f->crc().file_crc();
  TS_RETURN_IF_ERROR(f->Read(trailer + 16, 4));
  if (std::memcmp(trailer, kTrailerMagic, sizeof(kTrailerMagic)) != 0) {
    return f->Fail("no trailer at byte " + std::to_string(f->pos() - kSnapshotTrailerSize) +
                   " (the file is corrupt or was cut and appended to)");
  }
  if (LoadLE64(trailer + 8) != records) {
    return f->Fail("the trailer counts " + std::to_string(LoadLE64(trailer + 8)) +
                   " records, the file holds " + std::to_string(records));
  }
  if (LoadLE32(trailer + 16) != computed) return f->Fail("file checksum mismatch");
  if (f->pos() != f->size()) {
    return f->Fail(std::to_string(f->size() - f->pos()) + " bytes after the trailer");
  }
  return Status::OK();
}

// Deletes `paths` (already gone counts as deleted); the first failure is
// returned after trying every file.
Status RemoveFiles(const std::vector<std::string>& paths, std::vector<std::string>* removed) {
  Status first;
  for (const std::string& path : paths) {
    if (::unlink(path.c_str()) == 0) {
      removed->push_back(path);
    } else if (errno != ENOENT && first.ok()) {
      first = IoError(path, "delete", errno);
    }
  }
  return first;
}

// Deletes the chain files (and leftover temporary chain files) that no
// snapshot file of `dir` references. When a snapshot's table section
// cannot be read, nothing is deleted: its chain is unknown.
Status RemoveUnreferencedChainFiles(const std::string& dir, std::vector<std::string>* removed) {
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  std::unordered_set<std::string> needed;
  for (const SnapshotFile& f : files) {
    SnapshotHeader h;
    TableSection t;
    if (!ReadSnapshotTables(f.path, &h, &t).ok()) return Status::OK();
    for (const TableChainFileRef& ref : t.files) needed.insert(ref.name);
  }
  std::vector<std::string> doomed;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return IoError(dir, "opening the directory", errno);
  while (const dirent* e = ::readdir(d)) {
    const std::string_view name = e->d_name;
    uint64_t seq = 0;
    if ((ParseTableFileName(name, &seq) && !needed.contains(std::string(name))) ||
        (name.starts_with(".tables-") && name.ends_with(".tmp"))) {
      doomed.push_back(JoinPath(dir, std::string(name)));
    }
  }
  ::closedir(d);
  return RemoveFiles(doomed, removed);
}

}  // namespace

std::string SnapshotFileName(uint64_t version, uint64_t tag) {
  return kPrefix + VersionAndTag(version, tag) + kSuffix;
}

bool ParseSnapshotFileName(std::string_view name, uint64_t* version, uint64_t* tag) {
  return ParseWrapped(name, kPrefix, kSuffix, version, tag);
}

Status WriteSnapshot(const ParamStore& store, const std::string& dir, WrittenSnapshot* info,
                     uint64_t tag, const TableSection* tables) {
  // Read before anything is copied: the snapshot holds at least every
  // change counted in them (pushes may overlap the copy; see the header).
  info->version = store.version();
  info->generation = store.generation();
  info->tag = tag;
  const std::string tmp = JoinPath(dir, TmpFileName(info->version, tag));
  Status s;
  {
    FileWriter w(tmp);
    s = w.Open();
    if (s.ok()) s = WriteBody(store, &w, info, tables);
  }
  if (s.ok()) {
    info->path = JoinPath(dir, SnapshotFileName(info->version, tag));
    if (::rename(tmp.c_str(), info->path.c_str()) != 0) s = IoError(info->path, "rename", errno);
  }
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  return SyncDir(dir);
}

Status ListSnapshotFiles(const std::string& dir, std::vector<SnapshotFile>* out) {
  out->clear();
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return IoError(dir, "opening the directory", errno);
  while (const dirent* e = ::readdir(d)) {
    SnapshotFile f;
    if (ParseSnapshotFileName(e->d_name, &f.version, &f.tag)) {
      f.path = JoinPath(dir, e->d_name);
      out->push_back(std::move(f));
    }
  }
  ::closedir(d);
  std::sort(out->begin(), out->end(), [](const SnapshotFile& a, const SnapshotFile& b) {
    return std::tie(a.version, a.tag) > std::tie(b.version, b.tag);
  });
  return Status::OK();
}

Status ListSnapshots(const std::string& dir, std::vector<std::pair<uint64_t, std::string>>* out) {
  out->clear();
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  for (SnapshotFile& f : files) out->emplace_back(f.version, std::move(f.path));
  return Status::OK();
}

Status PruneSnapshots(const std::string& dir, uint64_t keep, std::vector<std::string>* removed,
                      const std::string& written) {
  removed->clear();
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  std::vector<std::string> doomed;
  if (keep > 0) {
    // Tagged and untagged snapshots are kept apart: frequent timed
    // snapshots must not push out the tagged ones a restore needs.
    for (const bool tagged : {false, true}) {
      const auto in_group = [tagged](const SnapshotFile& f) { return (f.tag != 0) == tagged; };
      // `written` counts among the kept ones wherever it sorts.
      const bool protect = std::any_of(files.begin(), files.end(), [&](const SnapshotFile& f) {
        return in_group(f) && f.path == written;
      });
      uint64_t kept = 0;
      for (const SnapshotFile& f : files) {
        if (!in_group(f) || f.path == written) continue;
        if (kept + (protect ? 1 : 0) < keep) {
          ++kept;
        } else {
          doomed.push_back(f.path);
        }
      }
    }
  }
  // Leftovers of writes cut short (a crash) of versions older than the
  // newest snapshot: no write of ours is in flight (the caller serializes).
  if (!files.empty()) {
    if (DIR* d = ::opendir(dir.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        uint64_t v;
        if (ParseWrapped(e->d_name, kTmpPrefix, kTmpSuffix, &v, nullptr) && v < files[0].version) {
          doomed.push_back(JoinPath(dir, e->d_name));
        }
      }
      ::closedir(d);
    }
  }
  Status first = RemoveFiles(doomed, removed);
  // Chain files only the deleted snapshots needed.
  Status chains = RemoveUnreferencedChainFiles(dir, removed);
  return first.ok() ? chains : first;
}

Status RemoveSnapshotsNewerThan(const std::string& dir, uint64_t version, uint64_t tag,
                                std::vector<std::string>* removed) {
  removed->clear();
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  std::vector<std::string> doomed;
  for (const SnapshotFile& f : files) {
    if (std::tie(f.version, f.tag) > std::tie(version, tag)) doomed.push_back(f.path);
  }
  Status first = RemoveFiles(doomed, removed);
  Status chains = RemoveUnreferencedChainFiles(dir, removed);
  return first.ok() ? chains : first;
}

Status ReadSnapshotHeader(const std::string& path, SnapshotHeader* out) {
  FileReader f(path);
  TS_RETURN_IF_ERROR(f.Open());
  std::optional<OptimizerConfig> default_opt;
  TS_RETURN_IF_ERROR(ReadHeader(&f, out, &default_opt));
  if (out->format == kSnapshotFormatTables) {
    // The chain files must be there, at their size (their bytes are
    // checked by ReadSnapshot).
    TableSection t;
    uint64_t records = 0;
    TS_RETURN_IF_ERROR(ReadTableSection(&f, &records, &t));
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash);
    for (const TableChainFileRef& ref : t.files) {
      struct stat st;
      const std::string chain = JoinPath(dir, ref.name);
      if (::stat(chain.c_str(), &st) != 0) {
        return f.Fail("its table chain file " + chain + " cannot be used: " + Errno(errno));
      }
      if (static_cast<uint64_t>(st.st_size) != ref.bytes) {
        return f.Fail("its table chain file " + chain + " has " + std::to_string(st.st_size) +
                      " bytes, the snapshot expects " + std::to_string(ref.bytes));
      }
    }
  }
  // The trailer's magic and record count, not the file CRC (that needs
  // every byte): a cut file almost never ends with them.
  uint8_t trailer[kSnapshotTrailerSize];
  TS_RETURN_IF_ERROR(f.ReadAt(f.size() - sizeof(trailer), trailer, sizeof(trailer)));
  if (std::memcmp(trailer, kTrailerMagic, sizeof(kTrailerMagic)) != 0) {
    return f.Fail("no trailer at the end of the file (it was cut or is corrupt)");
  }
  if (LoadLE64(trailer + 8) < out->tensors) {
    return f.Fail("the trailer counts " + std::to_string(LoadLE64(trailer + 8)) + " records for " +
                  std::to_string(out->tensors) + " tensors");
  }
  return Status::OK();
}

Status ListValidSnapshots(const std::string& dir, std::vector<SnapshotFile>* out,
                          std::vector<std::string>* skipped) {
  out->clear();
  skipped->clear();
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  for (SnapshotFile& f : files) {
    SnapshotHeader h;
    if (Status s = ReadSnapshotHeader(f.path, &h); !s.ok()) {
      skipped->push_back(s.message());
    } else if (h.version != f.version || h.tag != f.tag) {
      // Renamed by hand: its name would misplace it in every ordering.
      skipped->push_back(f.path + ": the header says version " + std::to_string(h.version) +
                         ", tag " + std::to_string(h.tag) + "; the name says version " +
                         std::to_string(f.version) + ", tag " + std::to_string(f.tag));
    } else {
      out->push_back(std::move(f));
    }
  }
  return Status::OK();
}

Status ReadSnapshotTables(const std::string& path, SnapshotHeader* header, TableSection* out) {
  FileReader f(path);
  TS_RETURN_IF_ERROR(f.Open());
  std::optional<OptimizerConfig> default_opt;
  TS_RETURN_IF_ERROR(ReadHeader(&f, header, &default_opt));
  *out = {};
  if (header->format != kSnapshotFormatTables) return Status::OK();
  uint64_t records = 0;
  return ReadTableSection(&f, &records, out);
}

Status ReadSnapshot(const std::string& path, SnapshotData* out) {
  {
    FileReader f(path);
    TS_RETURN_IF_ERROR(f.Open());
    TS_RETURN_IF_ERROR(ReadAll(&f, out));
  }
  if (!out->has_tables) return Status::OK();
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  Status s = ReadTableChain(dir, out->table_section, &out->tables);
  if (!s.ok()) {
    out->variables.clear();
    out->tables.clear();
    return Status(StatusCode::kInvalidArgument, path + ": " + s.message());
  }
  return Status::OK();
}

Status LoadSnapshot(const std::string& path, SnapshotData* out, std::string* chosen,
                    std::vector<std::string>* skipped) {
  skipped->clear();
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return Status(StatusCode::kNotFound,
                  "resume_from '" + path + "' cannot be used: " + Errno(errno));
  }
  if (!S_ISDIR(st.st_mode)) {
    TS_RETURN_IF_ERROR(ReadSnapshot(path, out));
    *chosen = path;
    return Status::OK();
  }
  std::vector<std::pair<uint64_t, std::string>> files;
  TS_RETURN_IF_ERROR(ListSnapshots(path, &files));
  if (files.empty()) {
    return Status(
        StatusCode::kNotFound,
        "resume_from '" + path + "' holds no snapshot file (snapshot-<version>" + kSuffix + ")");
  }
  for (const auto& [version, file] : files) {
    Status s = ReadSnapshot(file, out);
    if (s.ok()) {
      *chosen = file;
      return Status::OK();
    }
    skipped->push_back(s.message());
  }
  std::string msg = "resume_from '" + path + "' holds no valid snapshot (" +
                    std::to_string(files.size()) + " tried):";
  for (const std::string& why : *skipped) msg += "\n  " + why;
  out->variables.clear();
  return Status(StatusCode::kInvalidArgument, std::move(msg));
}

Status LoadTaggedSnapshot(const std::string& dir, uint64_t tag, SnapshotData* out,
                          std::string* chosen, std::vector<std::string>* skipped) {
  skipped->clear();
  std::vector<SnapshotFile> files;
  TS_RETURN_IF_ERROR(ListSnapshotFiles(dir, &files));
  std::vector<uint64_t> tags;  // for the message when the tag is missing
  size_t tried = 0;
  for (const SnapshotFile& f : files) {
    if (f.tag != tag) {
      if (f.tag != 0 && std::find(tags.begin(), tags.end(), f.tag) == tags.end()) {
        tags.push_back(f.tag);
      }
      continue;
    }
    ++tried;
    Status s = ReadSnapshot(f.path, out);
    if (s.ok() && out->tag != tag) {
      s = Status(StatusCode::kInvalidArgument,
                 f.path + ": the header says tag " + std::to_string(out->tag));
    }
    if (s.ok()) {
      *chosen = f.path;
      return Status::OK();
    }
    skipped->push_back(s.message());
  }
  out->variables.clear();
  if (tried == 0) {
    std::sort(tags.rbegin(), tags.rend());
    std::string have;
    for (size_t i = 0; i < tags.size() && i < 10; ++i) {
      have += (i == 0 ? "" : ", ") + std::to_string(tags[i]);
    }
    if (tags.size() > 10) have += ", ...";
    return Status(
        StatusCode::kNotFound,
        "snapshot_dir '" + dir + "' holds no snapshot with tag " + std::to_string(tag) +
            (tags.empty() ? " (it holds no tagged snapshot)" : " (its tags: " + have + ")"));
  }
  std::string msg = "snapshot_dir '" + dir + "' holds no valid snapshot with tag " +
                    std::to_string(tag) + " (" + std::to_string(tried) + " tried):";
  for (const std::string& why : *skipped) msg += "\n  " + why;
  return Status(StatusCode::kInvalidArgument, std::move(msg));
}

Status RestoreSnapshot(SnapshotData&& data, ParamStore* store) {
  return store->Restore(data.version, data.default_optimizer, std::move(data.variables));
}

}  // namespace tensorspark::storage
