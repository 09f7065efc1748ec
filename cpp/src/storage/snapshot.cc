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
constexpr uint8_t kFlagDefaultOptimizer = 1;  // header flags
constexpr uint8_t kFlagHasOptimizer = 1;      // tensor flags
constexpr uint8_t kFlagSlotsReady = 2;
constexpr size_t kOptimizerConfigSize = 28;
constexpr size_t kSlotMetaSize = 8;
// Tensor metas are far smaller (a 1024-byte name, 8 dims, 40 bytes of
// optimizer state); anything larger is corrupt.
constexpr uint32_t kMaxMetaLen = 4096;
constexpr size_t kIoBuffer = size_t{1} << 20;

std::string Errno(int err) { return std::strerror(err); }

// Disk full is a limit; every other I/O error is about the path given.
Status IoError(const std::string& path, const char* step, int err) {
  const StatusCode code =
      err == ENOSPC || err == EDQUOT ? StatusCode::kLimitExceeded : StatusCode::kInvalidArgument;
  return Status(code, path + ": " + step + " failed: " + Errno(err));
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

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
  if (s.size() != kVersionDigits) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
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

// The file CRC runs over every byte; a record's CRC over the record's
// bytes before its CRC field. Each byte is checksummed once: a record's CRC
// is folded into the file CRC with Crc32cCombine when the record ends.
class CrcTracker {
 public:
  void Add(const void* p, size_t n) {
    if (in_record_) {
      rec_crc_ = protocol::Crc32cExtend(rec_crc_, p, n);
      rec_len_ += n;
    } else {
      file_crc_ = protocol::Crc32cExtend(file_crc_, p, n);
    }
  }
  void BeginRecord() {
    in_record_ = true;
    rec_crc_ = 0;
    rec_len_ = 0;
  }
  // The record's CRC; its bytes now count in file_crc().
  uint32_t EndRecord() {
    in_record_ = false;
    file_crc_ = protocol::Crc32cCombine(file_crc_, rec_crc_, rec_len_);
    return rec_crc_;
  }
  uint32_t file_crc() const { return file_crc_; }

 private:
  bool in_record_ = false;
  uint32_t file_crc_ = 0;
  uint32_t rec_crc_ = 0;
  uint64_t rec_len_ = 0;
};

// ---- writing ----------------------------------------------------------------------

class FileWriter {
 public:
  explicit FileWriter(std::string path) : path_(std::move(path)), buf_(new uint8_t[kIoBuffer]) {}
  ~FileWriter() {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open() {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) return IoError(path_, "create", errno);
    return Status::OK();
  }

  Status Append(const void* p, size_t n) {
    if (n == 0) return Status::OK();
    crc_.Add(p, n);
    bytes_ += n;
    if (used_ + n <= kIoBuffer) {
      std::memcpy(buf_.get() + used_, p, n);
      used_ += n;
      return Status::OK();
    }
    TS_RETURN_IF_ERROR(Flush());
    if (n >= kIoBuffer) return WriteAll(p, n);
    std::memcpy(buf_.get(), p, n);
    used_ = n;
    return Status::OK();
  }

  // A record: header, meta, data, then its CRC.
  Status Record(uint8_t type, const std::vector<uint8_t>& meta, const float* data, uint64_t numel) {
    uint8_t head[kSnapshotRecordHeaderSize] = {};
    head[0] = type;
    StoreLE32(head + 4, static_cast<uint32_t>(meta.size()));
    StoreLE64(head + 8, numel * sizeof(float));
    crc_.BeginRecord();
    TS_RETURN_IF_ERROR(Append(head, sizeof(head)));
    TS_RETURN_IF_ERROR(Append(meta.data(), meta.size()));
    TS_RETURN_IF_ERROR(Append(data, numel * sizeof(float)));
    uint8_t crc[4];
    StoreLE32(crc, crc_.EndRecord());
    ++records_;
    return Append(crc, sizeof(crc));
  }

  // Flushes, fsyncs and closes.
  Status Finish() {
    TS_RETURN_IF_ERROR(Flush());
    if (::fsync(fd_) != 0) return IoError(path_, "fsync", errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) return IoError(path_, "close", errno);
    return Status::OK();
  }

  uint32_t file_crc() const { return crc_.file_crc(); }
  uint64_t records() const { return records_; }
  uint64_t bytes() const { return bytes_; }

 private:
  Status Flush() {
    const size_t n = used_;
    used_ = 0;
    return WriteAll(buf_.get(), n);
  }

  Status WriteAll(const void* p, size_t n) {
    const auto* c = static_cast<const uint8_t*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd_, c, std::min<size_t>(n, size_t{1} << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        return IoError(path_, "write", errno);
      }
      c += w;
      n -= static_cast<size_t>(w);
    }
    return Status::OK();
  }

  const std::string path_;
  int fd_ = -1;
  std::unique_ptr<uint8_t[]> buf_;
  size_t used_ = 0;
  CrcTracker crc_;
  uint64_t records_ = 0;
  uint64_t bytes_ = 0;
};

// Writes header, records and trailer; info->version and tag are set by the
// caller.
Status WriteBody(const ParamStore& store, FileWriter* w, WrittenSnapshot* info) {
  const std::optional<OptimizerConfig> default_opt = store.default_optimizer();
  std::vector<Variable*> vars;
  store.All(&vars);
  info->variables = vars.size();

  uint8_t header[kSnapshotHeaderSize] = {};
  std::memcpy(header, kMagic, sizeof(kMagic));
  StoreLE16(header + 6, kSnapshotFormatVersion);
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

Status SyncDir(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return IoError(dir, "open (to fsync the directory)", errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return IoError(dir, "fsync of the directory", err);
  return Status::OK();
}

// ---- reading ----------------------------------------------------------------------

class FileReader {
 public:
  explicit FileReader(std::string path) : path_(std::move(path)) {}
  ~FileReader() {
    if (fd_ >= 0) ::close(fd_);
  }

  Status Open() {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return Fail("cannot open: " + Errno(errno));
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Fail("cannot stat: " + Errno(errno));
    if (!S_ISREG(st.st_mode)) return Fail("not a regular file");
    size_ = static_cast<uint64_t>(st.st_size);
    return Status::OK();
  }

  // Reads exactly n bytes; the caller checked (Need) that the file has them.
  Status Read(void* dst, size_t n) {
    if (n == 0) return Status::OK();
    auto* out = static_cast<uint8_t*>(dst);
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ::read(fd_, out + done, std::min<size_t>(n - done, size_t{1} << 30));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Fail("read error at byte " + std::to_string(pos_ + done) + ": " + Errno(errno));
      }
      if (r == 0) return Truncated(pos_ + done, "the file shrank while being read");
      done += static_cast<size_t>(r);
    }
    crc_.Add(dst, n);
    pos_ += n;
    return Status::OK();
  }

  // Reads n bytes at `offset` without moving pos() or counting them in the
  // CRC (the cheap header and trailer check of ReadSnapshotHeader).
  Status ReadAt(uint64_t offset, void* dst, size_t n) {
    auto* out = static_cast<uint8_t*>(dst);
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(fd_, out + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        return Fail("read error at byte " + std::to_string(offset + done) + ": " + Errno(errno));
      }
      if (r == 0) return Truncated(offset + done, "the file shrank while being read");
      done += static_cast<size_t>(r);
    }
    return Status::OK();
  }

  // Fails with "truncated at byte <size>" unless n more bytes exist.
  Status Need(uint64_t n, const std::string& what) const {
    if (size_ - pos_ >= n) return Status::OK();
    return Truncated(size_, what + " at byte " + std::to_string(pos_) + " needs " +
                                std::to_string(n) + " bytes, " + std::to_string(size_ - pos_) +
                                " are left");
  }

  Status Fail(const std::string& why) const {
    return Status(StatusCode::kInvalidArgument, path_ + ": " + why);
  }
  Status Truncated(uint64_t at, const std::string& why) const {
    return Fail("truncated at byte " + std::to_string(at) + ": " + why);
  }

  CrcTracker& crc() { return crc_; }
  uint64_t pos() const { return pos_; }
  uint64_t size() const { return size_; }

 private:
  const std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint64_t pos_ = 0;
  CrcTracker crc_;
};

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
  if (format != kFormatUntagged && format != kSnapshotFormatVersion) {
    return f->Fail("snapshot format version " + std::to_string(format) +
                   " is not supported (this build reads versions 1 and " +
                   std::to_string(kSnapshotFormatVersion) + ")");
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

Status ReadAll(FileReader* f, SnapshotData* out) {
  SnapshotHeader h;
  TS_RETURN_IF_ERROR(ReadHeader(f, &h, &out->default_optimizer));
  out->version = h.version;
  out->tag = h.tag;
  out->created_unix_ms = h.created_unix_ms;
  const uint64_t count = h.tensors;

  // Records.
  out->variables.clear();
  out->variables.reserve(count);
  std::unordered_set<std::string> names;
  RawRecord rec;
  uint64_t records = 0;
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

}  // namespace

std::string SnapshotFileName(uint64_t version, uint64_t tag) {
  return kPrefix + VersionAndTag(version, tag) + kSuffix;
}

bool ParseSnapshotFileName(std::string_view name, uint64_t* version, uint64_t* tag) {
  return ParseWrapped(name, kPrefix, kSuffix, version, tag);
}

Status WriteSnapshot(const ParamStore& store, const std::string& dir, WrittenSnapshot* info,
                     uint64_t tag) {
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
    if (s.ok()) s = WriteBody(store, &w, info);
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
  return RemoveFiles(doomed, removed);
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
  return RemoveFiles(doomed, removed);
}

Status ReadSnapshotHeader(const std::string& path, SnapshotHeader* out) {
  FileReader f(path);
  TS_RETURN_IF_ERROR(f.Open());
  std::optional<OptimizerConfig> default_opt;
  TS_RETURN_IF_ERROR(ReadHeader(&f, out, &default_opt));
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

Status ReadSnapshot(const std::string& path, SnapshotData* out) {
  FileReader f(path);
  TS_RETURN_IF_ERROR(f.Open());
  return ReadAll(&f, out);
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
