// Sparse tables in snapshots (docs/snapshots.md, "Tables").
//
// Rows live in chain files `tables-<seq>.ttab` beside the snapshot files.
// Each snapshot writes one chain file holding, per table, either a full
// image (every stored row) or an increment (the rows changed and the ids
// removed since the previous snapshot). The snapshot file (format 3) lists
// the chain files it needs, oldest first, each by name, size and CRC, and
// per table its config and which chain file holds its newest full image.
// A snapshot is read only together with its whole chain, every byte
// checked, so it is never half tables.
//
//   TableChainState chain;  // per snapshot_dir, guarded by the caller
//   TS_RETURN_IF_ERROR(WriteSnapshotWithTables(store, &tables, dir, &chain, &info, tag));
//   ...
//   SnapshotData data;  // ReadSnapshot / LoadSnapshot read the chain too
//   TS_RETURN_IF_ERROR(RestoreTables(std::move(data.tables), &fresh_tables));
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "storage/snapshot.h"
#include "storage/sparse_table.h"
#include "tensorspark/status.h"
#include "tensorspark/tables.h"

namespace tensorspark::storage {

// A table gets a full image at least every kTableFullEvery snapshots, so a
// chain is at most this many files.
inline constexpr uint32_t kTableFullEvery = 8;
inline constexpr uint16_t kTableFileFormat = 1;

// "tables-00000000000000000042.ttab" for sequence number 42.
std::string TableFileName(uint64_t seq);
// The sequence number of such a name; false for any other name.
bool ParseTableFileName(std::string_view name, uint64_t* seq);

// What a chain state remembers of one table between snapshots.
struct TableChainEntry {
  std::string name;
  RowOptimizerKind kind = RowOptimizerKind::kSgd;  // a new kind resets slots: full image
  uint32_t since = 0;           // ForEachRow/RemovedSince `since` of the next increment
  uint32_t full_index = 0;      // chain file of the newest full image
  uint32_t increments = 0;      // increments written since that image
  uint64_t increment_rows = 0;  // rows and removed ids in them
};

// The chain of the last snapshot written to a directory, for the next one
// to continue. Empty: the next snapshot writes full images of every table
// (at start, and after a resume or restore).
struct TableChainState {
  std::vector<TableChainFileRef> files;  // oldest first
  std::vector<TableChainEntry> tables;
  uint64_t last_seq = 0;  // highest chain file number written or seen
};

// Writes a snapshot of `store` and `tables` to `dir` (WriteSnapshot's
// file, atomicity and errors): when there is a table, first a chain file
// (temporary name, fsync, rename) with a full image or an increment of
// each, then the snapshot file referencing it (format 3); without tables a
// format-2 file as before. `chain` continues from the previous snapshot
// and is updated only on success; on failure the new chain file is
// removed. `tables` may be null (no tables). Not thread-safe: the caller
// serializes snapshots of one directory. Table requests may run meanwhile.
[[nodiscard]] Status WriteSnapshotWithTables(const ParamStore& store, const TableStore* tables,
                                             const std::string& dir, TableChainState* chain,
                                             WrittenSnapshot* info, uint64_t tag = 0);

// Reads and checks every chain file of `section` (in `dir`): size, every
// record's CRC, the file CRC, the trailer, then the contents; and merges
// each table's newest full image with the increments after it. Errors
// are kInvalidArgument naming the chain file, the table and the record.
[[nodiscard]] Status ReadTableChain(const std::string& dir, const TableSection& section,
                                    std::vector<TableImage>* out);

// Builds a table of each image (config validated, rows restored), touching
// no store: the slow part of a restore, done before the swap.
[[nodiscard]] Status BuildTables(std::vector<TableImage>&& images,
                                 std::vector<std::unique_ptr<SparseTable>>* out);
// BuildTables, and only then replaces all tables of `store` with them: all
// or nothing. The caller guarantees no request uses `store` during the call.
[[nodiscard]] Status RestoreTables(std::vector<TableImage>&& images, TableStore* store);

// The meta of a format-3 table record (docs/snapshots.md); Decode checks
// the config (ValidateTableConfig) and fails with the reason, no path.
void EncodeTableEntry(const TableSectionEntry& e, std::vector<uint8_t>* out);
[[nodiscard]] Status DecodeTableEntry(std::span<const uint8_t> meta, TableSectionEntry* out);

}  // namespace tensorspark::storage
