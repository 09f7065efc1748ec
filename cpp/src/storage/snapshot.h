// Parameter snapshots: the store's variables, optimizer state and model
// version in one versioned binary file (docs/snapshots.md), written
// atomically and read back only after every byte has been checked.
//
// Writing copies one variable at a time under its shared lock into a
// reused buffer (Variable::CopyState) and does all file I/O without locks,
// so a push waits at most for one variable's copy. Each variable is
// consistent; variables are not consistent with each other (a push that
// overlaps the copy may be in some of them), as in any async PS. The
// snapshot's version is the store's version when the copy started.
//
//   SnapshotInfo info;
//   TS_RETURN_IF_ERROR(WriteSnapshot(store, "/ckpt", &info));
//   std::vector<std::string> removed;
//   TS_RETURN_IF_ERROR(PruneSnapshots("/ckpt", 3, &removed));
//   ...
//   SnapshotData data;
//   std::string chosen;
//   std::vector<std::string> skipped;
//   TS_RETURN_IF_ERROR(LoadSnapshot("/ckpt", &data, &chosen, &skipped));
//   TS_RETURN_IF_ERROR(RestoreSnapshot(std::move(data), &fresh_store));
//
// One server per snapshot directory: nothing coordinates two writers.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "storage/param_store.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::storage {

inline constexpr uint16_t kSnapshotFormatVersion = 1;
// Fixed sizes of the format (docs/snapshots.md).
inline constexpr size_t kSnapshotHeaderSize = 68;
inline constexpr size_t kSnapshotRecordHeaderSize = 16;
inline constexpr size_t kSnapshotTrailerSize = 20;

// What WriteSnapshot wrote.
struct SnapshotInfo {
  std::string path;         // <dir>/snapshot-<version, 20 digits>.tsnap
  uint64_t version = 0;     // the store's version when the copy started
  uint64_t generation = 0;  // ParamStore::generation() when the copy started
  uint64_t variables = 0;
  uint64_t bytes = 0;  // file size
};

// A snapshot read back and checked.
struct SnapshotData {
  uint64_t version = 0;
  uint64_t created_unix_ms = 0;
  std::optional<OptimizerConfig> default_optimizer;
  std::vector<VariableState> variables;  // registration order
};

// "snapshot-00000000000000000042.tsnap" for version 42.
std::string SnapshotFileName(uint64_t version);
// The version of such a name; false for any other name.
bool ParseSnapshotFileName(std::string_view name, uint64_t* version);

// Writes a snapshot of `store` to `<dir>/.snapshot-<version>.tmp`, fsyncs
// it, renames it to SnapshotFileName(version) (replacing a file of that
// name) and fsyncs `dir`. On failure the temporary file is removed and the
// Status names the file and the failing step (kLimitExceeded when the disk
// is full, kInvalidArgument for other I/O errors).
[[nodiscard]] Status WriteSnapshot(const ParamStore& store, const std::string& dir,
                                   SnapshotInfo* info);

// Keeps the `keep` newest snapshot files of `dir` (0 keeps all) and
// deletes the older ones, and any temporary file left by an interrupted
// write of an older version; never deletes `written` (the file just
// written, which may be older than others after resuming from an older
// snapshot). `removed` receives the deleted paths; the first failure to
// delete is returned after trying every file.
[[nodiscard]] Status PruneSnapshots(const std::string& dir, uint64_t keep,
                                    std::vector<std::string>* removed,
                                    const std::string& written = "");

// The snapshot files of `dir` as (version, path), newest first.
[[nodiscard]] Status ListSnapshots(const std::string& dir,
                                   std::vector<std::pair<uint64_t, std::string>>* out);

// Reads and checks the whole file (magic, format version, every record's
// CRC-32C, sizes, the trailer's record count and file CRC, then the
// contents) before returning anything. Errors are kInvalidArgument and
// start with the path: "<path>: tensor 'w' checksum mismatch (record 3 at
// byte 1024)", "<path>: truncated at byte 900 (...)".
[[nodiscard]] Status ReadSnapshot(const std::string& path, SnapshotData* out);

// `path` is a snapshot file (read as is) or a directory, whose newest
// valid snapshot is read: newer ones that fail ReadSnapshot are skipped,
// each with a "<file>: <why>" line in `skipped`. `chosen` receives the
// file read. kNotFound when `path` does not exist or the directory holds no
// snapshot file; kInvalidArgument naming every file and its fault when
// none is valid.
[[nodiscard]] Status LoadSnapshot(const std::string& path, SnapshotData* out, std::string* chosen,
                                  std::vector<std::string>* skipped);

// Puts `data` into an empty store (ParamStore::Restore).
[[nodiscard]] Status RestoreSnapshot(SnapshotData&& data, ParamStore* store);

}  // namespace tensorspark::storage
