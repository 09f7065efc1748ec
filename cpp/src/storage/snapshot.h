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
#include "storage/sparse_table.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark::storage {

// Written by this build for a server without tables; format 1 (no tag) is
// still read, as tag 0.
inline constexpr uint16_t kSnapshotFormatVersion = 2;
// Written when the server has tables (format 2 plus a table section:
// storage/table_snapshot.h). Formats 1 and 2 read as "no tables".
inline constexpr uint16_t kSnapshotFormatTables = 3;
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
  // With tables (WriteSnapshotWithTables): the chain file written.
  uint64_t tables = 0;
  uint64_t full_images = 0;  // tables written as full images, the others as increments
  uint64_t table_rows = 0;   // rows written to the chain file
  std::string table_file;    // its path ("" without tables)
  uint64_t table_file_bytes = 0;
};

// A chain file a format-3 snapshot needs (storage/table_snapshot.h).
struct TableChainFileRef {
  std::string name;  // in the snapshot's directory
  uint64_t bytes = 0;
  uint32_t crc = 0;  // the file CRC in its trailer
};

// A table as a format-3 snapshot records it.
struct TableSectionEntry {
  TableConfig config;
  uint64_t epoch_unix_s = 0;
  uint32_t full_index = 0;      // chain file holding its newest full image
  uint32_t increments = 0;      // increments after that image in the chain
  uint64_t increment_rows = 0;  // rows and removed ids in those increments
  uint64_t rows = 0;            // stored rows when the snapshot was written
};

struct TableSection {
  std::vector<TableChainFileRef> files;   // oldest first
  std::vector<TableSectionEntry> tables;  // creation order
};

// One table read back: its config and stored rows (last_touch_s relative
// to epoch_unix_s), ready for SparseTable::Restore.
struct TableImage {
  TableConfig config;
  uint64_t epoch_unix_s = 0;
  std::vector<RowState> rows;  // by id
};

// A snapshot read back and checked.
struct SnapshotData {
  uint64_t version = 0;
  uint64_t tag = 0;  // 0: untagged (and every format-1 file)
  uint64_t created_unix_ms = 0;
  std::optional<OptimizerConfig> default_optimizer;
  std::vector<VariableState> variables;  // registration order
  // Format 3: the table section, and every table read from its chain.
  // Formats 1 and 2: no tables (restoring leaves a server with none).
  bool has_tables = false;
  TableSection table_section;
  std::vector<TableImage> tables;
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
// With `tables`, the file is format 3 and records the section (the chain
// files must exist already: WriteSnapshotWithTables writes them).
[[nodiscard]] Status WriteSnapshot(const ParamStore& store, const std::string& dir,
                                   WrittenSnapshot* info, uint64_t tag = 0,
                                   const TableSection* tables = nullptr);

// Keeps the `keep` newest untagged and the `keep` newest tagged snapshot
// files of `dir` (0 keeps all) and deletes the older ones, and any
// temporary file left by an interrupted write of an older version; never
// deletes `written` (the file just written, which may be older than others
// after resuming from an older snapshot). Then deletes the table chain
// files (storage/table_snapshot.h) that no remaining snapshot lists, never
// one a kept snapshot needs. `removed` receives the deleted paths; the
// first failure to delete is returned after trying every file.
[[nodiscard]] Status PruneSnapshots(const std::string& dir, uint64_t keep,
                                    std::vector<std::string>* removed,
                                    const std::string& written = "");

// Deletes the snapshot files of `dir` that sort newer than (version, tag):
// after a restore they belong to a history the server left (and the chain
// files only they needed). `removed` and the result as for PruneSnapshots.
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

// The header and table section of a file (empty for formats 1 and 2),
// each record's CRC checked; nothing of the tensors or the chain files.
[[nodiscard]] Status ReadSnapshotTables(const std::string& path, SnapshotHeader* header,
                                        TableSection* out);

// Reads and checks the whole file (magic, format version, every record's
// CRC-32C, sizes, the trailer's record count and file CRC, then the
// contents) and, for format 3, every chain file it needs
// (ReadTableChain), before returning anything. Errors are kInvalidArgument and
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
