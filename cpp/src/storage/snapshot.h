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
//   WrittenSnapshot info;
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
// Tagged snapshots (a tag the driver chooses, recorded in the header and
// the file name) mark points that are consistent across several servers:
//
//   TS_RETURN_IF_ERROR(WriteSnapshot(store, "/ckpt", &info, /*tag=*/7));
//   std::vector<SnapshotFile> valid;
//   TS_RETURN_IF_ERROR(ListValidSnapshots("/ckpt", &valid, &skipped));  // header checks only
//   TS_RETURN_IF_ERROR(LoadTaggedSnapshot("/ckpt", 7, &data, &chosen, &skipped));
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

// Written by this build; format 1 (no tag) is still read, as tag 0.
inline constexpr uint16_t kSnapshotFormatVersion = 2;
// Fixed sizes of the format (docs/snapshots.md); format 1's header is 68 bytes.
inline constexpr size_t kSnapshotHeaderSize = 76;
inline constexpr size_t kSnapshotRecordHeaderSize = 16;
inline constexpr size_t kSnapshotTrailerSize = 20;

// What WriteSnapshot wrote.
struct WrittenSnapshot {
  std::string path;         // <dir>/SnapshotFileName(version, tag)
  uint64_t version = 0;     // the store's version when the copy started
  uint64_t tag = 0;         // 0: untagged
  uint64_t generation = 0;  // ParamStore::generation() when the copy started
  uint64_t variables = 0;
  uint64_t bytes = 0;  // file size
};

// A snapshot read back and checked.
struct SnapshotData {
  uint64_t version = 0;
  uint64_t tag = 0;  // 0: untagged (and every format-1 file)
  uint64_t created_unix_ms = 0;
  std::optional<OptimizerConfig> default_optimizer;
  std::vector<VariableState> variables;  // registration order
};

// What a header says (ReadSnapshotHeader).
struct SnapshotHeader {
  uint16_t format = 0;
  uint64_t version = 0;
  uint64_t tag = 0;
  uint64_t created_unix_ms = 0;
  uint64_t tensors = 0;
};

// A snapshot file of a directory, as its name says.
struct SnapshotFile {
  uint64_t version = 0;
  uint64_t tag = 0;
  std::string path;
};

// "snapshot-00000000000000000042.tsnap" for version 42, and
// "snapshot-00000000000000000042-tag-00000000000000000007.tsnap" with tag 7.
std::string SnapshotFileName(uint64_t version, uint64_t tag = 0);
// The version and tag (0 without one) of such a name; false for any other
// name. `tag` may be null.
bool ParseSnapshotFileName(std::string_view name, uint64_t* version, uint64_t* tag = nullptr);

// Writes a snapshot of `store`, recording `tag` (0: untagged), to
// `<dir>/.snapshot-<version>[-tag-<tag>].tmp`, fsyncs it, renames it to
// SnapshotFileName(version, tag) (replacing a file of that name) and fsyncs
// `dir`. On failure the temporary file is removed and the Status names the
// file and the failing step (kLimitExceeded when the disk is full,
// kInvalidArgument for other I/O errors).
[[nodiscard]] Status WriteSnapshot(const ParamStore& store, const std::string& dir,
                                   WrittenSnapshot* info, uint64_t tag = 0);

// Keeps the `keep` newest untagged and the `keep` newest tagged snapshot
// files of `dir` (0 keeps all) and deletes the older ones, and any
// temporary file left by an interrupted write of an older version; never
// deletes `written` (the file just written, which may be older than others
// after resuming from an older snapshot). `removed` receives the deleted
// paths; the first failure to delete is returned after trying every file.
[[nodiscard]] Status PruneSnapshots(const std::string& dir, uint64_t keep,
                                    std::vector<std::string>* removed,
                                    const std::string& written = "");

// Deletes the snapshot files of `dir` that sort newer than (version, tag):
// after a restore they belong to a history the server left. `removed` and
// the result as for PruneSnapshots.
[[nodiscard]] Status RemoveSnapshotsNewerThan(const std::string& dir, uint64_t version,
                                              uint64_t tag, std::vector<std::string>* removed);

// The snapshot files of `dir` (by name, nothing read), newest first: by
// version, then tag (an untagged file counts as tag 0).
[[nodiscard]] Status ListSnapshotFiles(const std::string& dir, std::vector<SnapshotFile>* out);
// The same as (version, path).
[[nodiscard]] Status ListSnapshots(const std::string& dir,
                                   std::vector<std::pair<uint64_t, std::string>>* out);

// The cheap check of a file: its header (magic, format, CRC, flags, room
// for the tensors it announces) and its trailer's magic and record count,
// without reading the records or the file CRC (ReadSnapshot does). Errors
// as ReadSnapshot's.
[[nodiscard]] Status ReadSnapshotHeader(const std::string& path, SnapshotHeader* out);
// ListSnapshotFiles, keeping the files that pass ReadSnapshotHeader and
// whose header agrees with their name (version and tag); each other one is
// a "<file>: <why>" line in `skipped`.
[[nodiscard]] Status ListValidSnapshots(const std::string& dir, std::vector<SnapshotFile>* out,
                                        std::vector<std::string>* skipped);

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

// Reads the newest valid snapshot of `dir` with `tag` (ReadSnapshot, and the
// header's tag must match the name's): newer ones with that tag that fail
// are skipped, each with a "<file>: <why>" line in `skipped`. kNotFound
// (naming the tags the directory has) when no file has the tag,
// kInvalidArgument naming every file tried when none is valid.
[[nodiscard]] Status LoadTaggedSnapshot(const std::string& dir, uint64_t tag, SnapshotData* out,
                                        std::string* chosen, std::vector<std::string>* skipped);

// Puts `data` into an empty store (ParamStore::Restore).
[[nodiscard]] Status RestoreSnapshot(SnapshotData&& data, ParamStore* store);

}  // namespace tensorspark::storage
