// File I/O shared by the snapshot files (snapshot.cc) and the table chain
// files (table_snapshot.cc): buffered writing and checked reading with a
// running CRC-32C per record and per file.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "storage/snapshot.h"
#include "tensorspark/status.h"

namespace tensorspark::storage::snapshot_io {

inline constexpr size_t kIoBuffer = size_t{1} << 20;

inline std::string Errno(int err) { return std::strerror(err); }

// The number a file name spells as exactly `digits` decimal digits (zero
// padded); false for any other text or a value past UINT64_MAX.
inline bool ParseFixedDigits(std::string_view s, size_t digits, uint64_t* out) {
  if (s.size() != digits) return false;
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

// Disk full is a limit; every other I/O error is about the path given.
inline Status IoError(const std::string& path, const char* step, int err) {
  const StatusCode code =
      err == ENOSPC || err == EDQUOT ? StatusCode::kLimitExceeded : StatusCode::kInvalidArgument;
  return Status(code, path + ": " + step + " failed: " + Errno(err));
}

inline std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
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
    return RecordBytes(type, meta, data, numel * sizeof(float));
  }
  Status RecordBytes(uint8_t type, const std::vector<uint8_t>& meta, const void* data,
                     uint64_t data_len) {
    uint8_t head[kSnapshotRecordHeaderSize] = {};
    head[0] = type;
    protocol::StoreLE32(head + 4, static_cast<uint32_t>(meta.size()));
    protocol::StoreLE64(head + 8, data_len);
    crc_.BeginRecord();
    TS_RETURN_IF_ERROR(Append(head, sizeof(head)));
    TS_RETURN_IF_ERROR(Append(meta.data(), meta.size()));
    TS_RETURN_IF_ERROR(Append(data, data_len));
    uint8_t crc[4];
    protocol::StoreLE32(crc, crc_.EndRecord());
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

inline Status SyncDir(const std::string& dir) {
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

}  // namespace tensorspark::storage::snapshot_io
