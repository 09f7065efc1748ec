// Tagged snapshots (format 2), format-1 files, the cheap header check,
// listing, pruning and the removal of newer files after a restore.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "storage/snapshot.h"
#include "test_util.h"

namespace tensorspark::storage {
namespace {

using testing::TempDir;

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// A store with an Adam variable (slots allocated) and a plain one.
void Fill(ParamStore* store, float start) {
  std::vector<float> w(6), b(3, start);
  for (size_t i = 0; i < w.size(); ++i) w[i] = start + 0.25f * static_cast<float>(i);
  const std::vector<int64_t> ws = {2, 3}, bs = {3};
  RegisterItem items[] = {{"w", ws, w.data()}, {"b", bs, b.data()}};
  std::vector<uint8_t> created;
  ASSERT_TRUE(store->Register(items, &created).ok());
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.learning_rate = 0.01f;
  std::string_view names[] = {"w"};
  ASSERT_TRUE(store->SetOptimizer(adam, names).ok());
  std::vector<float> g(6, 0.5f), d(3, 1.0f);
  PushItem grad[] = {{"w", ws, g.data(), 6}};
  PushItem delta[] = {{"b", bs, d.data(), 3}};
  uint64_t version;
  ASSERT_TRUE(store->Push(3, {}, grad, &version).ok());
  ASSERT_TRUE(store->Push(2, {}, delta, &version).ok());
}

// The values of every variable, by name.
std::map<std::string, std::vector<float>> ValuesOf(const ParamStore& store) {
  std::vector<Variable*> vars;
  store.All(&vars);
  std::map<std::string, std::vector<float>> out;
  for (const Variable* v : vars) {
    VariableState s;
    v->CopyState(&s);
    out[s.name] = s.values;
  }
  return out;
}

// The same snapshot in format 1: the header without the tag (68 bytes, CRC
// of its first 64), the records as they are, the file CRC recomputed.
std::vector<uint8_t> ToFormat1(const std::vector<uint8_t>& v2) {
  std::vector<uint8_t> out(v2.begin(), v2.begin() + 64);
  protocol::StoreLE16(out.data() + 6, 1);
  uint8_t crc[4];
  protocol::StoreLE32(crc, protocol::Crc32c(out.data(), out.size()));
  out.insert(out.end(), crc, crc + 4);
  out.insert(out.end(), v2.begin() + kSnapshotHeaderSize, v2.end() - 4);
  protocol::StoreLE32(crc, protocol::Crc32c(out.data(), out.size()));
  out.insert(out.end(), crc, crc + 4);
  return out;
}

std::vector<std::pair<uint64_t, uint64_t>> VersionsAndTags(const std::vector<SnapshotFile>& files) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const SnapshotFile& f : files) out.emplace_back(f.version, f.tag);
  return out;
}

TEST(TaggedSnapshotTest, FileNames) {
  EXPECT_EQ(SnapshotFileName(42, 7),
            "snapshot-00000000000000000042-tag-00000000000000000007.tsnap");
  EXPECT_EQ(SnapshotFileName(42, 0), "snapshot-00000000000000000042.tsnap");
  uint64_t v = 0, t = 9;
  EXPECT_TRUE(ParseSnapshotFileName("snapshot-00000000000000000042.tsnap", &v, &t));
  EXPECT_EQ(v, 42u);
  EXPECT_EQ(t, 0u);
  EXPECT_TRUE(ParseSnapshotFileName(SnapshotFileName(5, UINT64_MAX), &v, &t));
  EXPECT_EQ(v, 5u);
  EXPECT_EQ(t, UINT64_MAX);
  // Tag 0 is spelled without the infix; other spellings are not ours.
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-00000000000000000042-tag-00000000000000000000.tsnap",
                                     &v, &t));
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-00000000000000000042-tag-7.tsnap", &v, &t));
  EXPECT_FALSE(ParseSnapshotFileName("snapshot-00000000000000000042-xyz-00000000000000000007.tsnap",
                                     &v, &t));
}

TEST(TaggedSnapshotTest, TaggedSnapshotIsWrittenAndReadBack) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 1.0f);
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 7).ok());
  EXPECT_EQ(info.tag, 7u);
  EXPECT_EQ(info.path, dir.Sub(SnapshotFileName(2, 7)));

  SnapshotHeader h;
  ASSERT_TRUE(ReadSnapshotHeader(info.path, &h).ok());
  EXPECT_EQ(h.format, kSnapshotFormatVersion);
  EXPECT_EQ(h.version, 2u);
  EXPECT_EQ(h.tag, 7u);
  EXPECT_EQ(h.tensors, 2u);

  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  EXPECT_EQ(data.tag, 7u);
  EXPECT_EQ(data.version, 2u);
  ParamStore b(10);
  ASSERT_TRUE(RestoreSnapshot(std::move(data), &b).ok());
  EXPECT_EQ(ValuesOf(b), ValuesOf(a));
  EXPECT_EQ(b.version(), 2u);

  // The tag is under the header CRC.
  std::vector<uint8_t> bytes = ReadBytes(info.path);
  bytes[64] ^= 1;
  const std::string bad = dir.Sub("bad.tsnap");
  WriteBytes(bad, bytes);
  EXPECT_TRUE(Contains(ReadSnapshot(bad, &data).message(), "header checksum mismatch"));
  EXPECT_TRUE(Contains(ReadSnapshotHeader(bad, &h).message(), "header checksum mismatch"));
}

TEST(TaggedSnapshotTest, FormatOneFileReadsAsTagZero) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 2.0f);
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  const std::vector<uint8_t> v1 = ToFormat1(ReadBytes(info.path));
  ASSERT_EQ(v1.size(), info.bytes - 8);
  WriteBytes(info.path, v1);  // the directory now holds a format-1 file

  SnapshotData data;
  Status s = ReadSnapshot(info.path, &data);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(data.tag, 0u);
  EXPECT_EQ(data.version, 2u);
  SnapshotHeader h;
  ASSERT_TRUE(ReadSnapshotHeader(info.path, &h).ok());
  EXPECT_EQ(h.format, 1u);
  EXPECT_EQ(h.tag, 0u);
  std::vector<SnapshotFile> valid;
  std::vector<std::string> skipped;
  ASSERT_TRUE(ListValidSnapshots(dir.path(), &valid, &skipped).ok());
  EXPECT_EQ(VersionsAndTags(valid), (std::vector<std::pair<uint64_t, uint64_t>>{{2, 0}}));
  EXPECT_TRUE(skipped.empty());

  // Resuming from the directory restores it exactly.
  std::string chosen;
  ASSERT_TRUE(LoadSnapshot(dir.path(), &data, &chosen, &skipped).ok());
  ParamStore b(10);
  ASSERT_TRUE(RestoreSnapshot(std::move(data), &b).ok());
  EXPECT_EQ(ValuesOf(b), ValuesOf(a));

  // Its truncations are caught as well.
  const std::string cut = dir.Sub("cut.tsnap");
  for (size_t len = 0; len < v1.size(); ++len) {
    WriteBytes(cut, std::span(v1).first(len));
    Status r = ReadSnapshot(cut, &data);
    ASSERT_EQ(r.code(), StatusCode::kInvalidArgument) << len;
    EXPECT_TRUE(r.message().starts_with(cut + ": truncated at byte " + std::to_string(len) + ": "))
        << r.message();
  }
}

TEST(TaggedSnapshotTest, ListValidSnapshotsIsNewestFirstAndSkipsBadFiles) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 0.0f);  // version 2
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 1).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());     // untagged at the same version
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 3).ok());  // a higher tag sorts newer
  std::vector<float> d(3, 1.0f);
  const std::vector<int64_t> bs = {3};
  PushItem delta[] = {{"b", bs, d.data(), 3}};
  uint64_t version;
  ASSERT_TRUE(a.Push(2, {}, delta, &version).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 2).ok());  // version 3, tag 2
  // A cut file, a renamed one (its header says version 3, tag 2) and a
  // leftover temporary file.
  std::vector<uint8_t> bytes = ReadBytes(info.path);
  WriteBytes(dir.Sub(SnapshotFileName(9, 9)), std::span(bytes).first(bytes.size() - 1));
  WriteBytes(dir.Sub(SnapshotFileName(8, 2)), bytes);
  WriteBytes(dir.Sub(".snapshot-00000000000000000010-tag-00000000000000000001.tmp"), bytes);

  std::vector<SnapshotFile> files;
  ASSERT_TRUE(ListSnapshotFiles(dir.path(), &files).ok());
  EXPECT_EQ(VersionsAndTags(files), (std::vector<std::pair<uint64_t, uint64_t>>{
                                        {9, 9}, {8, 2}, {3, 2}, {2, 3}, {2, 1}, {2, 0}}));
  std::vector<std::string> skipped;
  ASSERT_TRUE(ListValidSnapshots(dir.path(), &files, &skipped).ok());
  EXPECT_EQ(VersionsAndTags(files),
            (std::vector<std::pair<uint64_t, uint64_t>>{{3, 2}, {2, 3}, {2, 1}, {2, 0}}));
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_TRUE(skipped[0].starts_with(dir.Sub(SnapshotFileName(9, 9)) + ": no trailer"))
      << skipped[0];
  EXPECT_EQ(skipped[1], dir.Sub(SnapshotFileName(8, 2)) +
                            ": the header says version 3, tag 2; the name says version 8, tag 2");
}

TEST(TaggedSnapshotTest, PruningKeepsTaggedAndUntaggedApart) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 0.0f);
  std::vector<float> d(3, 1.0f);
  const std::vector<int64_t> bs = {3};
  PushItem delta[] = {{"b", bs, d.data(), 3}};
  WrittenSnapshot info;
  std::vector<std::string> removed;
  // Tags 1..3 early, then many untagged snapshots: the tagged ones stay.
  for (uint64_t tag = 1; tag <= 3; ++tag) {
    uint64_t version;
    ASSERT_TRUE(a.Push(2, {}, delta, &version).ok());
    ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, tag).ok());
    ASSERT_TRUE(PruneSnapshots(dir.path(), 2, &removed, info.path).ok());
  }
  for (int i = 0; i < 4; ++i) {
    uint64_t version;
    ASSERT_TRUE(a.Push(2, {}, delta, &version).ok());
    ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
    ASSERT_TRUE(PruneSnapshots(dir.path(), 2, &removed, info.path).ok());
  }
  std::vector<SnapshotFile> files;
  ASSERT_TRUE(ListSnapshotFiles(dir.path(), &files).ok());
  EXPECT_EQ(VersionsAndTags(files),
            (std::vector<std::pair<uint64_t, uint64_t>>{{9, 0}, {8, 0}, {5, 3}, {4, 2}}));
}

TEST(TaggedSnapshotTest, LoadTaggedSnapshotFallsBackAndNamesTheTagsThere) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 0.0f);
  WrittenSnapshot older, newer, other;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &older, 4).ok());  // version 2
  const auto values_at_2 = ValuesOf(a);
  std::vector<float> d(3, 1.0f);
  const std::vector<int64_t> bs = {3};
  PushItem delta[] = {{"b", bs, d.data(), 3}};
  uint64_t version;
  ASSERT_TRUE(a.Push(2, {}, delta, &version).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &newer, 4).ok());  // version 3, same tag
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &other, 6).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &other).ok());

  SnapshotData data;
  std::string chosen;
  std::vector<std::string> skipped;
  ASSERT_TRUE(LoadTaggedSnapshot(dir.path(), 4, &data, &chosen, &skipped).ok());
  EXPECT_EQ(chosen, newer.path);
  EXPECT_EQ(data.version, 3u);

  // A corrupt newer file of the tag: the older one is taken.
  std::vector<uint8_t> bytes = ReadBytes(newer.path);
  bytes[bytes.size() - 30] ^= 0x40;
  WriteBytes(newer.path, bytes);
  ASSERT_TRUE(LoadTaggedSnapshot(dir.path(), 4, &data, &chosen, &skipped).ok());
  EXPECT_EQ(chosen, older.path);
  EXPECT_EQ(data.tag, 4u);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_TRUE(skipped[0].starts_with(newer.path + ": ")) << skipped[0];
  ParamStore b(10);
  ASSERT_TRUE(RestoreSnapshot(std::move(data), &b).ok());
  EXPECT_EQ(ValuesOf(b), values_at_2);

  // No file of the tag: kNotFound with the tags there are.
  Status s = LoadTaggedSnapshot(dir.path(), 5, &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(s.message(), "holds no snapshot with tag 5 (its tags: 6, 4)"))
      << s.message();

  // Every file of the tag corrupt: kInvalidArgument naming each.
  std::filesystem::resize_file(older.path, 100);
  s = LoadTaggedSnapshot(dir.path(), 4, &data, &chosen, &skipped);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "no valid snapshot with tag 4 (2 tried)")) << s.message();
  EXPECT_TRUE(Contains(s.message(), older.path + ": truncated at byte 100")) << s.message();
}

TEST(TaggedSnapshotTest, RemoveSnapshotsNewerThan) {
  TempDir dir;
  ParamStore a(10);
  Fill(&a, 0.0f);  // version 2
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 1).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 2).ok());
  std::vector<float> d(3, 1.0f);
  const std::vector<int64_t> bs = {3};
  PushItem delta[] = {{"b", bs, d.data(), 3}};
  uint64_t version;
  ASSERT_TRUE(a.Push(2, {}, delta, &version).ok());
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info).ok());
  std::vector<std::string> removed;
  ASSERT_TRUE(RemoveSnapshotsNewerThan(dir.path(), 2, 1, &removed).ok());
  EXPECT_EQ(removed, (std::vector<std::string>{dir.Sub(SnapshotFileName(3)),
                                               dir.Sub(SnapshotFileName(2, 2))}));
  std::vector<SnapshotFile> files;
  ASSERT_TRUE(ListSnapshotFiles(dir.path(), &files).ok());
  EXPECT_EQ(VersionsAndTags(files), (std::vector<std::pair<uint64_t, uint64_t>>{{2, 1}, {2, 0}}));
}

TEST(TaggedSnapshotTest, ReplaceSwapsTheWholeState) {
  ParamStore a(10), b(10);
  Fill(&a, 1.0f);
  Fill(&b, 5.0f);
  std::vector<float> extra(4, 9.0f);
  const std::vector<int64_t> es = {4};
  RegisterItem items[] = {{"extra", es, extra.data()}};
  std::vector<uint8_t> created;
  ASSERT_TRUE(b.Register(items, &created).ok());
  const uint64_t generation = b.generation();

  TempDir dir;
  WrittenSnapshot info;
  ASSERT_TRUE(WriteSnapshot(a, dir.path(), &info, 1).ok());
  SnapshotData data;
  ASSERT_TRUE(ReadSnapshot(info.path, &data).ok());
  ASSERT_TRUE(b.Replace(data.version, data.default_optimizer, std::move(data.variables)).ok());
  EXPECT_EQ(ValuesOf(b), ValuesOf(a));
  EXPECT_EQ(b.num_variables(), 2u);
  EXPECT_EQ(b.num_parameters(), 9u);
  EXPECT_EQ(b.version(), a.version());
  EXPECT_GT(b.generation(), generation);
  std::vector<Variable*> vars;
  std::string_view gone[] = {"extra"};
  EXPECT_EQ(b.Lookup(gone, &vars).code(), StatusCode::kNotFound);

  // Invalid state changes nothing.
  std::vector<VariableState> twice(2);
  twice[0].name = twice[1].name = "x";
  EXPECT_EQ(b.Replace(1, std::nullopt, std::move(twice)).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ValuesOf(b), ValuesOf(a));
  // Restore still wants an empty store.
  EXPECT_EQ(b.Restore(1, std::nullopt, {}).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tensorspark::storage
