#include "storage/table_snapshot.h"

#include <dirent.h>

#include <bit>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <unordered_map>
#include <unordered_set>

#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"
#include "storage/snapshot_io.h"

namespace tensorspark::storage {

using protocol::LoadLE16;
using protocol::LoadLE32;
using protocol::LoadLE64;
using protocol::StoreLE16;
using protocol::StoreLE32;
using protocol::StoreLE64;
using namespace snapshot_io;

namespace {

constexpr char kMagic[6] = {'T', 'S', 'T', 'A', 'B', 'L'};
constexpr char kTrailerMagic[8] = {'T', 'S', 'T', 'B', 'E', 'N', 'D', '\0'};
constexpr char kPrefix[] = "tables-";
constexpr char kSuffix[] = ".ttab";
constexpr char kTmpPrefix[] = ".tables-";
constexpr char kTmpSuffix[] = ".tmp";
constexpr size_t kSeqDigits = 20;
constexpr size_t kHeaderSize = 36;
constexpr size_t kTrailerSize = 20;
constexpr uint8_t kRecordSegment = 1;
constexpr uint8_t kRecordRows = 2;
constexpr uint8_t kRecordRemoved = 3;
constexpr uint8_t kRecordSegmentEnd = 4;
constexpr uint8_t kSegmentFull = 1;
constexpr uint8_t kSegmentIncrement = 2;
constexpr size_t kRowHeaderSize = 24;  // i64 id, u32 step, touches, last_touch_s, reserved
constexpr size_t kBatchBytes = size_t{1} << 20;
constexpr uint32_t kMaxMetaLen = 4096;
// A row batch or removed list is at most this large; larger is corrupt.
constexpr uint64_t kMaxRecordData = uint64_t{1} << 32;

std::string SeqDigits(uint64_t v) {
  std::string digits = std::to_string(v);
  return std::string(kSeqDigits - digits.size(), '0') + digits;
}

uint64_t NowMs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// The table record of the wire (TABLE_CREATE, LIST_TABLES), so both
// describe a table one way; a snapshot also refuses unknown enum values.
void EncodeConfig(const TableConfig& c, protocol::Writer* w) { protocol::WriteTableRecord(w, c); }

Status DecodeConfig(protocol::Reader* r, TableConfig* c) {
  TS_RETURN_IF_ERROR(protocol::ReadTableRecord(r, c));
  const auto init = static_cast<uint8_t>(c->initializer);
  const auto eviction = static_cast<uint8_t>(c->eviction);
  const auto kind = static_cast<uint8_t>(c->optimizer.kind);
  if (init > 2 || eviction > 2 || kind < 1 || kind > 4) {
    return Status(StatusCode::kInvalidArgument,
                  "table '" + c->name + "': unknown initializer, eviction or optimizer kind");
  }
  return ValidateTableConfig(*c);
}

// Strips the "malformed payload: " prefix of protocol::Reader errors.
std::string MetaError(const Status& s) {
  constexpr std::string_view kPrefixText = "malformed payload: ";
  std::string_view m = s.message();
  if (m.starts_with(kPrefixText)) m.remove_prefix(kPrefixText.size());
  return std::string(m);
}

uint64_t MaxSeqIn(const std::string& dir) {
  uint64_t max_seq = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      uint64_t seq = 0;
      if (ParseTableFileName(e->d_name, &seq)) max_seq = std::max(max_seq, seq);
    }
    ::closedir(d);
  }
  return max_seq;
}

// ---- writing ----------------------------------------------------------------------

// One table's segment of a chain file.
struct SegmentResult {
  uint64_t rows = 0;
  uint64_t removed = 0;
};

// Streams rows into row-batch records. ForEachRow calls Add under a
// stripe's shared lock; a full batch is appended to the writer's 1 MiB
// buffer (a write() to the page cache at most, never an fsync).
class RowBatcher {
 public:
  RowBatcher(FileWriter* w, uint32_t dim, int slots)
      : w_(w), dim_(dim), slots_(slots), row_bytes_(kRowHeaderSize + 4ull * dim * (1 + slots)) {}

  void Add(const RowView& row) {
    if (!status_.ok()) return;
    if (row.values.size() != dim_ || row.slots.size() != size_t{dim_} * slots_) {
      status_ = Status(StatusCode::kInvalidArgument,
                       "a row of the table changed its size during the snapshot (the table was "
                       "reconfigured); write the snapshot again");
      return;
    }
    const size_t at = data_.size();
    data_.resize(at + row_bytes_);
    uint8_t* p = data_.data() + at;
    StoreLE64(p, static_cast<uint64_t>(row.id));
    StoreLE32(p + 8, row.step);
    StoreLE32(p + 12, row.touches);
    StoreLE32(p + 16, row.last_touch_s);
    StoreLE32(p + 20, 0);
    std::memcpy(p + kRowHeaderSize, row.values.data(), 4ull * dim_);
    if (slots_ > 0) {
      std::memcpy(p + kRowHeaderSize + 4ull * dim_, row.slots.data(), 4ull * dim_ * slots_);
    }
    ++count_;
    ++total_;
    if (data_.size() + row_bytes_ > kBatchBytes) status_ = Flush();
  }

  Status Flush() {
    if (count_ == 0) return Status::OK();
    std::vector<uint8_t> meta(8, 0);
    StoreLE32(meta.data(), count_);
    Status s = w_->RecordBytes(kRecordRows, meta, data_.data(), data_.size());
    data_.clear();
    count_ = 0;
    return s;
  }

  const Status& status() const { return status_; }
  uint64_t total() const { return total_; }

 private:
  FileWriter* w_;
  const uint32_t dim_;
  const int slots_;
  const uint64_t row_bytes_;
  std::vector<uint8_t> data_;
  uint32_t count_ = 0;
  uint64_t total_ = 0;
  Status status_;
};

Status WriteSegment(SparseTable* table, const TableConfig& config, bool full, uint32_t since,
                    FileWriter* w, SegmentResult* result) {
  const int slots = RowSlots(config.optimizer.kind);
  std::vector<uint8_t> meta;
  protocol::Writer mw(&meta);
  mw.Str(config.name);
  mw.U8(full ? kSegmentFull : kSegmentIncrement);
  mw.U8(static_cast<uint8_t>(config.optimizer.kind));
  mw.U16(0);
  mw.U32(config.dim);
  mw.U32(static_cast<uint32_t>(slots));
  mw.U64(table->epoch_unix_s());
  TS_RETURN_IF_ERROR(w->RecordBytes(kRecordSegment, meta, nullptr, 0));

  // Ids removed before the rows are visited; an id removed and stored
  // again is visited and so is not removed (see docs/snapshots.md).
  std::vector<int64_t> removed;
  if (!full) table->RemovedSince(since, &removed);
  std::unordered_set<int64_t> visited;
  RowBatcher batch(w, config.dim, slots);
  table->ForEachRow(full ? 0 : since, [&](const RowView& row) {
    batch.Add(row);
    if (!full && !removed.empty()) visited.insert(row.id);
  });
  TS_RETURN_IF_ERROR(batch.status());
  TS_RETURN_IF_ERROR(batch.Flush());
  if (!visited.empty()) {
    std::erase_if(removed, [&](int64_t id) { return visited.contains(id); });
  }
  if (!removed.empty()) {
    std::vector<uint8_t> data(removed.size() * 8);
    for (size_t i = 0; i < removed.size(); ++i) {
      StoreLE64(data.data() + 8 * i, static_cast<uint64_t>(removed[i]));
    }
    std::vector<uint8_t> rmeta(8, 0);
    StoreLE64(rmeta.data(), removed.size());
    TS_RETURN_IF_ERROR(w->RecordBytes(kRecordRemoved, rmeta, data.data(), data.size()));
  }
  result->rows = batch.total();
  result->removed = removed.size();
  std::vector<uint8_t> end(16);
  StoreLE64(end.data(), result->rows);
  StoreLE64(end.data() + 8, result->removed);
  return w->RecordBytes(kRecordSegmentEnd, end, nullptr, 0);
}

// ---- reading ----------------------------------------------------------------------

struct Record {
  uint8_t type = 0;
  uint64_t index = 0;
  uint64_t offset = 0;
  std::vector<uint8_t> meta;
  std::vector<uint8_t> data;
  std::string At() const {
    return " (record " + std::to_string(index) + " at byte " + std::to_string(offset) + ")";
  }
};

Status ReadRecord(FileReader* f, uint64_t index, const std::string& what, Record* rec) {
  rec->index = index;
  rec->offset = f->pos();
  const std::string label = "record " + std::to_string(index) + " (" + what + ")";
  TS_RETURN_IF_ERROR(f->Need(kSnapshotRecordHeaderSize, "the header of " + label));
  f->crc().BeginRecord();
  uint8_t head[kSnapshotRecordHeaderSize];
  TS_RETURN_IF_ERROR(f->Read(head, sizeof(head)));
  rec->type = head[0];
  const uint32_t meta_len = LoadLE32(head + 4);
  const uint64_t data_len = LoadLE64(head + 8);
  if (meta_len > kMaxMetaLen || data_len > kMaxRecordData || head[1] || head[2] || head[3]) {
    return f->Fail(what + " has a corrupt record header: meta " + std::to_string(meta_len) +
                   " bytes, data " + std::to_string(data_len) + " bytes" + rec->At());
  }
  TS_RETURN_IF_ERROR(f->Need(uint64_t{meta_len} + data_len + 4, "the rest of " + label));
  rec->meta.resize(meta_len);
  TS_RETURN_IF_ERROR(f->Read(rec->meta.data(), meta_len));
  rec->data.resize(data_len);
  TS_RETURN_IF_ERROR(f->Read(rec->data.data(), data_len));
  const uint32_t computed = f->crc().EndRecord();
  uint8_t stored[4];
  TS_RETURN_IF_ERROR(f->Read(stored, sizeof(stored)));
  if (LoadLE32(stored) != computed) return f->Fail(what + " checksum mismatch" + rec->At());
  return Status::OK();
}

// The rows of one table while its chain is read.
struct Merge {
  const TableSectionEntry* entry = nullptr;
  uint32_t first = 0;  // chain index of its full image
  bool started = false;
  std::unordered_map<int64_t, RowState> rows;
};

// Reads one chain file and applies its segments to `merges` (by name).
Status ReadChainFile(const std::string& path, const TableChainFileRef& ref, uint32_t index,
                     std::unordered_map<std::string, Merge>* merges) {
  FileReader f(path);
  TS_RETURN_IF_ERROR(f.Open());
  if (f.size() != ref.bytes) {
    return f.Fail("has " + std::to_string(f.size()) + " bytes, the snapshot expects " +
                  std::to_string(ref.bytes) + " (it was replaced or cut)");
  }
  TS_RETURN_IF_ERROR(f.Need(kHeaderSize + kTrailerSize, "the header and trailer"));
  uint8_t header[kHeaderSize];
  TS_RETURN_IF_ERROR(f.Read(header, sizeof(header)));
  if (std::memcmp(header, kMagic, sizeof(kMagic)) != 0) {
    return f.Fail("not a tensorspark table chain file (it does not start with \"TSTABL\")");
  }
  if (LoadLE32(header + 32) != protocol::Crc32c(header, 32)) {
    return f.Fail("header checksum mismatch");
  }
  if (LoadLE16(header + 6) != kTableFileFormat) {
    return f.Fail("table file format " + std::to_string(LoadLE16(header + 6)) +
                  " is not supported (this build reads " + std::to_string(kTableFileFormat) + ")");
  }
  uint64_t name_seq = 0;
  if (!ParseTableFileName(ref.name, &name_seq) || LoadLE64(header + 8) != name_seq ||
      LoadLE32(header + 28) != 0) {
    return f.Fail("the header's sequence number " + std::to_string(LoadLE64(header + 8)) +
                  " does not match the name");
  }
  const uint32_t segments = LoadLE32(header + 24);
  uint64_t records = 0;
  Record rec;
  std::unordered_set<std::string> seen;
  for (uint32_t sgi = 0; sgi < segments; ++sgi) {
    const std::string what = "segment #" + std::to_string(sgi);
    TS_RETURN_IF_ERROR(ReadRecord(&f, records++, what, &rec));
    protocol::Reader r(rec.meta);
    std::string_view name;
    uint8_t kind = 0, opt = 0;
    uint16_t reserved = 0;
    uint32_t dim = 0, slots = 0;
    uint64_t epoch = 0;
    Status s = rec.type == kRecordSegment && rec.data.empty()
                   ? r.ReadStr(&name)
                   : Status(StatusCode::kInvalidArgument, "not a segment record");
    if (s.ok()) s = r.ReadU8(&kind);
    if (s.ok()) s = r.ReadU8(&opt);
    if (s.ok()) s = r.ReadU16(&reserved);
    if (s.ok()) s = r.ReadU32(&dim);
    if (s.ok()) s = r.ReadU32(&slots);
    if (s.ok()) s = r.ReadU64(&epoch);
    if (s.ok()) s = r.Finish();
    if (s.ok() && (kind != kSegmentFull && kind != kSegmentIncrement)) {
      s = Status(StatusCode::kInvalidArgument, "unknown segment kind " + std::to_string(kind));
    }
    if (!s.ok()) return f.Fail(what + ": " + MetaError(s) + rec.At());
    const std::string table = "table '" + std::string(name) + "'";
    if (!seen.insert(std::string(name)).second) return f.Fail(table + " appears twice" + rec.At());
    auto it = merges->find(std::string(name));
    Merge* m = nullptr;
    if (it != merges->end() && index >= it->second.first) {
      m = &it->second;
      const TableConfig& c = m->entry->config;
      if (dim != c.dim || opt != static_cast<uint8_t>(c.optimizer.kind) ||
          static_cast<int>(slots) != RowSlots(c.optimizer.kind)) {
        return f.Fail(table + ": the segment has dim " + std::to_string(dim) + " and " +
                      std::to_string(slots) + " slots, the snapshot's config another" + rec.At());
      }
      if ((index == m->first) != (kind == kSegmentFull)) {
        return f.Fail(table + ": " + (kind == kSegmentFull ? "a full image" : "an increment") +
                      " where the snapshot expects " +
                      (index == m->first ? "its full image" : "an increment") + rec.At());
      }
      m->started = true;
    }
    const uint64_t row_bytes = kRowHeaderSize + 4ull * dim * (1 + uint64_t{slots});
    uint64_t rows = 0, removed = 0;
    for (;;) {
      TS_RETURN_IF_ERROR(ReadRecord(&f, records++, table + " rows", &rec));
      if (rec.type == kRecordSegmentEnd) {
        if (rec.meta.size() != 16 || !rec.data.empty() || LoadLE64(rec.meta.data()) != rows ||
            LoadLE64(rec.meta.data() + 8) != removed) {
          return f.Fail(table + ": the segment's end record does not match its " +
                        std::to_string(rows) + " rows and " + std::to_string(removed) +
                        " removed ids" + rec.At());
        }
        break;
      }
      if (rec.type == kRecordRows) {
        const uint64_t n = rec.meta.size() == 8 ? LoadLE32(rec.meta.data()) : 0;
        if (n == 0 || LoadLE32(rec.meta.data() + 4) != 0 || rec.data.size() != n * row_bytes) {
          return f.Fail(table + ": a malformed row batch" + rec.At());
        }
        rows += n;
        if (m == nullptr) continue;
        const int64_t epoch_shift =
            static_cast<int64_t>(epoch) - static_cast<int64_t>(m->entry->epoch_unix_s);
        for (uint64_t i = 0; i < n; ++i) {
          const uint8_t* p = rec.data.data() + i * row_bytes;
          RowState row;
          row.id = static_cast<int64_t>(LoadLE64(p));
          row.step = LoadLE32(p + 8);
          row.touches = LoadLE32(p + 12);
          const int64_t touch = static_cast<int64_t>(LoadLE32(p + 16)) + epoch_shift;
          row.last_touch_s = static_cast<uint32_t>(
              std::clamp<int64_t>(touch, 0, std::numeric_limits<uint32_t>::max()));
          row.values.resize(dim);
          std::memcpy(row.values.data(), p + kRowHeaderSize, 4ull * dim);
          row.slots.resize(size_t{dim} * slots);
          std::memcpy(row.slots.data(), p + kRowHeaderSize + 4ull * dim, 4ull * dim * slots);
          const int64_t id = row.id;
          m->rows.insert_or_assign(id, std::move(row));
        }
        continue;
      }
      if (rec.type == kRecordRemoved) {
        const uint64_t n = rec.meta.size() == 8 ? LoadLE64(rec.meta.data()) : 0;
        if (n == 0 || kind == kSegmentFull || rec.data.size() != n * 8) {
          return f.Fail(table + ": a malformed list of removed ids" + rec.At());
        }
        removed += n;
        if (m == nullptr) continue;
        for (uint64_t i = 0; i < n; ++i) {
          m->rows.erase(static_cast<int64_t>(LoadLE64(rec.data.data() + 8 * i)));
        }
        continue;
      }
      return f.Fail(table + ": unexpected record type " + std::to_string(rec.type) + rec.At());
    }
  }
  TS_RETURN_IF_ERROR(f.Need(kTrailerSize, "the trailer"));
  uint8_t trailer[kTrailerSize];
  TS_RETURN_IF_ERROR(f.Read(trailer, 16));
  const uint32_t computed = f.crc().file_crc();
  TS_RETURN_IF_ERROR(f.Read(trailer + 16, 4));
  if (std::memcmp(trailer, kTrailerMagic, sizeof(kTrailerMagic)) != 0) {
    return f.Fail("no trailer at byte " + std::to_string(f.pos() - kTrailerSize));
  }
  if (LoadLE64(trailer + 8) != records) {
    return f.Fail("the trailer counts " + std::to_string(LoadLE64(trailer + 8)) +
                  " records, the file holds " + std::to_string(records));
  }
  if (LoadLE32(trailer + 16) != computed) return f.Fail("file checksum mismatch");
  if (LoadLE32(trailer + 16) != ref.crc) {
    return f.Fail("its checksum differs from the one the snapshot recorded (it was replaced)");
  }
  if (f.pos() != f.size()) return f.Fail("bytes after the trailer");
  for (const auto& [name, m] : *merges) {
    if (index >= m.first && !seen.contains(name)) {
      return f.Fail("table '" + name + "' has no segment, the snapshot expects one");
    }
  }
  return Status::OK();
}

}  // namespace

std::string TableFileName(uint64_t seq) { return kPrefix + SeqDigits(seq) + kSuffix; }

bool ParseTableFileName(std::string_view name, uint64_t* seq) {
  if (!name.starts_with(kPrefix) || !name.ends_with(kSuffix)) return false;
  name.remove_prefix(sizeof(kPrefix) - 1);
  name.remove_suffix(sizeof(kSuffix) - 1);
  return snapshot_io::ParseFixedDigits(name, kSeqDigits, seq);
}

void EncodeTableEntry(const TableSectionEntry& e, std::vector<uint8_t>* out) {
  protocol::Writer w(out);
  EncodeConfig(e.config, &w);
  w.U64(e.epoch_unix_s);
  w.U32(e.full_index);
  w.U32(e.increments);
  w.U64(e.increment_rows);
  w.U64(e.rows);
}

Status DecodeTableEntry(std::span<const uint8_t> meta, TableSectionEntry* out) {
  protocol::Reader r(meta);
  Status s = DecodeConfig(&r, &out->config);
  if (s.ok()) s = r.ReadU64(&out->epoch_unix_s);
  if (s.ok()) s = r.ReadU32(&out->full_index);
  if (s.ok()) s = r.ReadU32(&out->increments);
  if (s.ok()) s = r.ReadU64(&out->increment_rows);
  if (s.ok()) s = r.ReadU64(&out->rows);
  if (s.ok()) s = r.Finish();
  if (!s.ok()) return Status(StatusCode::kInvalidArgument, MetaError(s));
  return Status::OK();
}

Status WriteSnapshotWithTables(const ParamStore& store, const TableStore* tables,
                               const std::string& dir, TableChainState* chain,
                               WrittenSnapshot* info, uint64_t tag) {
  std::vector<SparseTable*> all;
  if (tables != nullptr) tables->All(&all);
  if (all.empty()) {
    TS_RETURN_IF_ERROR(WriteSnapshot(store, dir, info, tag));
    chain->files.clear();
    chain->tables.clear();
    return Status::OK();
  }
  const uint64_t seq = std::max(chain->last_seq, MaxSeqIn(dir)) + 1;
  chain->last_seq = seq;
  const std::string name = TableFileName(seq);
  const std::string tmp = JoinPath(dir, kTmpPrefix + SeqDigits(seq) + kTmpSuffix);
  const std::string path = JoinPath(dir, name);

  TableChainState next;
  next.last_seq = seq;
  next.files = chain->files;
  const uint32_t new_index = static_cast<uint32_t>(next.files.size());
  TableSection section;
  uint64_t full_images = 0, rows_written = 0;
  Status s;
  {
    FileWriter w(tmp);
    s = w.Open();
    uint8_t header[kHeaderSize] = {};
    std::memcpy(header, kMagic, sizeof(kMagic));
    StoreLE16(header + 6, kTableFileFormat);
    StoreLE64(header + 8, seq);
    StoreLE64(header + 16, NowMs());
    StoreLE32(header + 24, static_cast<uint32_t>(all.size()));
    StoreLE32(header + 32, protocol::Crc32c(header, 32));
    if (s.ok()) s = w.Append(header, sizeof(header));
    for (size_t i = 0; i < all.size() && s.ok(); ++i) {
      SparseTable* t = all[i];
      const TableConfig config = t->config();
      const TableChainEntry* prev = nullptr;
      for (const TableChainEntry& e : chain->tables) {
        if (e.name == config.name) prev = &e;
      }
      const uint64_t rows_now = t->Stats().rows;
      bool full = prev == nullptr || prev->kind != config.optimizer.kind ||
                  prev->increments + 1 >= kTableFullEvery || prev->increment_rows > rows_now;
      std::vector<int64_t> probe;
      if (!full && !t->RemovedSince(prev->since, &probe)) full = true;  // the log was trimmed
      const uint32_t epoch = t->BeginSnapshot();
      SegmentResult seg;
      s = WriteSegment(t, config, full, full ? 0 : prev->since, &w, &seg);
      if (!s.ok()) {
        s = s.WithContext("table '" + config.name + "'");
        break;
      }
      TableChainEntry e;
      e.name = config.name;
      e.kind = config.optimizer.kind;
      e.since = epoch + 1;
      e.full_index = full ? new_index : prev->full_index;
      e.increments = full ? 0 : prev->increments + 1;
      e.increment_rows = full ? 0 : prev->increment_rows + seg.rows + seg.removed;
      next.tables.push_back(e);
      TableSectionEntry se;
      se.config = config;
      se.epoch_unix_s = t->epoch_unix_s();
      se.full_index = e.full_index;
      se.increments = e.increments;
      se.increment_rows = e.increment_rows;
      se.rows = rows_now;
      section.tables.push_back(std::move(se));
      full_images += full ? 1 : 0;
      rows_written += seg.rows;
    }
    if (s.ok()) {
      uint8_t trailer[kTrailerSize];
      std::memcpy(trailer, kTrailerMagic, sizeof(kTrailerMagic));
      StoreLE64(trailer + 8, w.records());
      s = w.Append(trailer, 16);
      const uint32_t crc = w.file_crc();
      StoreLE32(trailer + 16, crc);
      if (s.ok()) s = w.Append(trailer + 16, 4);
      next.files.push_back({name, w.bytes(), crc});
      if (s.ok()) s = w.Finish();
    }
  }
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) s = IoError(path, "rename", errno);
  if (s.ok()) s = SyncDir(dir);
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    ::unlink(path.c_str());
    return s;
  }
  // Drop the chain files no table needs any more.
  uint32_t first = new_index;
  for (const TableChainEntry& e : next.tables) first = std::min(first, e.full_index);
  next.files.erase(next.files.begin(), next.files.begin() + first);
  for (TableChainEntry& e : next.tables) e.full_index -= first;
  for (TableSectionEntry& e : section.tables) e.full_index -= first;
  section.files = next.files;

  s = WriteSnapshot(store, dir, info, tag, &section);
  if (!s.ok()) {
    ::unlink(path.c_str());
    return s;
  }
  info->tables = all.size();
  info->full_images = full_images;
  info->table_rows = rows_written;
  info->table_file = path;
  info->table_file_bytes = section.files.back().bytes;
  *chain = std::move(next);
  return Status::OK();
}

Status ReadTableChain(const std::string& dir, const TableSection& section,
                      std::vector<TableImage>* out) {
  out->clear();
  std::unordered_map<std::string, Merge> merges;
  uint32_t first = static_cast<uint32_t>(section.files.size());
  for (const TableSectionEntry& e : section.tables) {
    Merge& m = merges[e.config.name];
    m.entry = &e;
    m.first = e.full_index;
    first = std::min(first, e.full_index);
  }
  for (uint32_t i = first; i < section.files.size(); ++i) {
    const std::string path = JoinPath(dir, section.files[i].name);
    TS_RETURN_IF_ERROR(ReadChainFile(path, section.files[i], i, &merges)
                           .WithContext("table chain file " + std::to_string(i + 1) + " of " +
                                        std::to_string(section.files.size())));
  }
  out->reserve(section.tables.size());
  for (const TableSectionEntry& e : section.tables) {
    Merge& m = merges[e.config.name];
    if (!m.started) {
      return Status(StatusCode::kInvalidArgument,
                    "table '" + e.config.name + "': its chain holds no full image");
    }
    TableImage image;
    image.config = e.config;
    image.epoch_unix_s = e.epoch_unix_s;
    image.rows.reserve(m.rows.size());
    for (auto& [id, row] : m.rows) image.rows.push_back(std::move(row));
    std::sort(image.rows.begin(), image.rows.end(),
              [](const RowState& a, const RowState& b) { return a.id < b.id; });
    m.rows.clear();
    out->push_back(std::move(image));
  }
  return Status::OK();
}

Status BuildTables(std::vector<TableImage>&& images,
                   std::vector<std::unique_ptr<SparseTable>>* out) {
  out->clear();
  out->reserve(images.size());
  for (TableImage& image : images) {
    const std::string what = "restore table '" + image.config.name + "'";
    TS_RETURN_IF_ERROR(ValidateTableConfig(image.config).WithContext(what));
    auto table = std::make_unique<SparseTable>(image.config);
    TS_RETURN_IF_ERROR(
        table->Restore(std::move(image.rows), {}, image.epoch_unix_s).WithContext(what));
    out->push_back(std::move(table));
  }
  return Status::OK();
}

Status RestoreTables(std::vector<TableImage>&& images, TableStore* store) {
  std::vector<std::unique_ptr<SparseTable>> built;
  TS_RETURN_IF_ERROR(BuildTables(std::move(images), &built));
  store->ReplaceAll(std::move(built));
  return Status::OK();
}

}  // namespace tensorspark::storage
