// Codecs of the sparse-table opcodes: round trips, every truncation and
// trailing byte rejected, huge counts rejected before allocating.
#include "protocol/table_messages.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace tensorspark::protocol {
namespace {

using Payload = std::vector<uint8_t>;

TableConfig SampleConfig(const std::string& name) {
  TableConfig c;
  c.name = name;
  c.dim = 16;
  c.vocab = 1000;
  c.seed = 0x1234567890ULL;
  c.initializer = RowInitializer::kNormal;
  c.init_scale = 0.25f;
  c.optimizer.kind = RowOptimizerKind::kFtrl;
  c.optimizer.learning_rate = 0.5f;
  c.optimizer.beta1 = 0.8f;
  c.optimizer.beta2 = 0.99f;
  c.optimizer.epsilon = 1e-6f;
  c.optimizer.initial_accumulator = 0.2f;
  c.optimizer.l1 = 0.01f;
  c.optimizer.l2 = 0.02f;
  c.optimizer.lr_power = -0.25f;
  c.optimizer.beta = 1.5f;
  c.capacity = 500;
  c.eviction = EvictionPolicy::kLfu;
  c.admit_after = 3;
  c.ttl_s = 60;
  return c;
}

void ExpectSameConfig(const TableConfig& a, const TableConfig& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.dim, b.dim);
  EXPECT_EQ(a.vocab, b.vocab);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.initializer, b.initializer);
  EXPECT_EQ(a.init_scale, b.init_scale);
  EXPECT_EQ(a.optimizer.kind, b.optimizer.kind);
  EXPECT_EQ(a.optimizer.learning_rate, b.optimizer.learning_rate);
  EXPECT_EQ(a.optimizer.beta1, b.optimizer.beta1);
  EXPECT_EQ(a.optimizer.beta2, b.optimizer.beta2);
  EXPECT_EQ(a.optimizer.epsilon, b.optimizer.epsilon);
  EXPECT_EQ(a.optimizer.initial_accumulator, b.optimizer.initial_accumulator);
  EXPECT_EQ(a.optimizer.l1, b.optimizer.l1);
  EXPECT_EQ(a.optimizer.l2, b.optimizer.l2);
  EXPECT_EQ(a.optimizer.lr_power, b.optimizer.lr_power);
  EXPECT_EQ(a.optimizer.beta, b.optimizer.beta);
  EXPECT_EQ(a.capacity, b.capacity);
  EXPECT_EQ(a.eviction, b.eviction);
  EXPECT_EQ(a.admit_after, b.admit_after);
  EXPECT_EQ(a.ttl_s, b.ttl_s);
}

// Every strict prefix and the payload plus one byte must fail with a
// protocol error; the full payload must decode.
void ExpectStrict(const Payload& p, const std::function<Status(std::span<const uint8_t>)>& decode) {
  ASSERT_TRUE(decode(p).ok()) << decode(p).ToString();
  for (size_t len = 0; len < p.size(); ++len) {
    Status s = decode(std::span<const uint8_t>(p.data(), len));
    EXPECT_EQ(s.code(), StatusCode::kProtocolError) << "prefix of " << len << " bytes";
  }
  Payload longer = p;
  longer.push_back(0);
  EXPECT_EQ(decode(longer).code(), StatusCode::kProtocolError) << "trailing byte";
}

TEST(TableMessages, TableCreateRoundTripAndStrict) {
  const TableConfig in[] = {SampleConfig("user"), SampleConfig("item/embedding")};
  Payload p;
  EncodeTableCreate(in, &p);
  EXPECT_EQ(p.size(), 4 + 2 * kTableRecordFixedSize + (2 + 4) + (2 + 14));
  std::vector<TableConfig> out;
  ASSERT_TRUE(DecodeTableCreate(p, &out).ok());
  ASSERT_EQ(out.size(), 2u);
  ExpectSameConfig(in[0], out[0]);
  ExpectSameConfig(in[1], out[1]);
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    std::vector<TableConfig> t;
    return DecodeTableCreate(b, &t);
  });
}

TEST(TableMessages, TableCreateRejectsReservedByteEmptyNameAndNoTables) {
  const TableConfig in[] = {SampleConfig("user")};
  Payload p;
  EncodeTableCreate(in, &p);
  std::vector<TableConfig> out;
  Payload bad = p;
  bad[4 + 2 + 4 + 4 + 8 + 8 + 3] = 1;  // reserved byte after the three u8 enums
  Status s = DecodeTableCreate(bad, &out);
  EXPECT_EQ(s.code(), StatusCode::kProtocolError);
  EXPECT_NE(s.message().find("reserved"), std::string::npos) << s.message();

  TableConfig empty = SampleConfig("");
  Payload q;
  EncodeTableCreate({&empty, 1}, &q);
  EXPECT_EQ(DecodeTableCreate(q, &out).code(), StatusCode::kProtocolError);

  Payload none;
  EncodeTableCreate({}, &none);
  EXPECT_EQ(DecodeTableCreate(none, &out).code(), StatusCode::kProtocolError);
}

TEST(TableMessages, HugeCountsAreRejectedBeforeAllocating) {
  std::vector<TableConfig> tables;
  std::vector<RowsSection> sections;
  uint8_t kind = 0;
  float lr = 0;
  Payload p(4, 0xFF);  // count 2^32-1 with nothing after it
  EXPECT_EQ(DecodeTableCreate(p, &tables).code(), StatusCode::kProtocolError);
  EXPECT_EQ(DecodePullRowsRequest(p, &sections).code(), StatusCode::kProtocolError);
  std::vector<TableInfo> infos;
  EXPECT_EQ(DecodeListTablesResponse(p, &infos).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> created;
  EXPECT_EQ(DecodeTableCreateResponse(p, &created).code(), StatusCode::kProtocolError);

  // One table announcing 2^32-1 ids (and, for a push, rows of dim 65536).
  Payload pull;
  Writer w(&pull);
  w.U32(1);
  w.Str("user");
  w.U32(0xFFFFFFFFu);
  Status s = DecodePullRowsRequest(pull, &sections);
  EXPECT_EQ(s.code(), StatusCode::kProtocolError);
  EXPECT_NE(s.message().find("table 'user'"), std::string::npos) << s.message();

  Payload push;
  Writer pw(&push);
  pw.U8(3);
  pw.U8(0);
  pw.U8(0);
  pw.U8(0);
  pw.F32(0.0f);
  pw.U32(1);
  pw.Str("user");
  pw.U32(kMaxTableDim);
  pw.U32(0xFFFFFFFFu);
  pw.U64(0);
  EXPECT_EQ(DecodePushRows(push, &kind, &lr, &sections).code(), StatusCode::kProtocolError);

  Payload resp;
  Writer rw(&resp);
  rw.U64(7);
  rw.U32(1);
  rw.U32(kMaxTableDim);
  rw.U32(0xFFFFFFFFu);
  std::vector<RowsBlock> blocks;
  uint64_t version = 0;
  EXPECT_EQ(DecodePullRowsResponse(resp, &version, &blocks).code(), StatusCode::kProtocolError);
}

TEST(TableMessages, PullRowsRoundTripAndStrict) {
  const int64_t a[] = {3, -1, 3, std::numeric_limits<int64_t>::max()};
  const int64_t b[] = {42};
  const PullRowsItem items[] = {{"user", a}, {"item", b}, {"empty", {}}};
  Payload p;
  EncodePullRowsRequest(items, &p);
  std::vector<RowsSection> out;
  ASSERT_TRUE(DecodePullRowsRequest(p, &out).ok());
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].table, "user");
  ASSERT_EQ(out[0].n, 4u);
  std::vector<int64_t> ids(4);
  CopyIds(out[0], ids.data());
  EXPECT_EQ(ids, std::vector<int64_t>(a, a + 4));
  EXPECT_EQ(out[1].table, "item");
  EXPECT_EQ(out[1].n, 1u);
  EXPECT_EQ(out[2].n, 0u);
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    std::vector<RowsSection> s;
    return DecodePullRowsRequest(b, &s);
  });
}

TEST(TableMessages, PullRowsResponseStrict) {
  Payload p;
  Writer w(&p);
  w.U64(9);
  w.U32(2);
  w.U32(2);  // dim
  w.U32(2);  // n
  for (float f : {1.0f, 2.0f, 3.0f, 4.0f}) w.F32(f);
  w.U32(3);
  w.U32(0);
  uint64_t version = 0;
  std::vector<RowsBlock> blocks;
  ASSERT_TRUE(DecodePullRowsResponse(p, &version, &blocks).ok());
  EXPECT_EQ(version, 9u);
  ASSERT_EQ(blocks.size(), 2u);
  EXPECT_EQ(blocks[0].values, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(blocks[1].dim, 3u);
  EXPECT_TRUE(blocks[1].values.empty());
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    uint64_t v;
    std::vector<RowsBlock> t;
    return DecodePullRowsResponse(b, &v, &t);
  });
}

TEST(TableMessages, PushRowsRoundTripAndStrict) {
  const int64_t ids[] = {5, 9};
  const float vals[] = {0.5f, -1.0f, 2.0f, 3.5f, 1e-3f, 7.0f};
  const PushRowsItem items[] = {{"user", 3, ids, vals}};
  Payload p;
  EncodePushRows(3, 0.25f, items, &p);
  uint8_t kind = 0;
  float lr = 0;
  std::vector<RowsSection> out;
  ASSERT_TRUE(DecodePushRows(p, &kind, &lr, &out).ok());
  EXPECT_EQ(kind, 3);
  EXPECT_EQ(lr, 0.25f);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].dim, 3u);
  EXPECT_EQ(out[0].n, 2u);
  std::vector<int64_t> got_ids(2);
  std::vector<float> got(6);
  CopyIds(out[0], got_ids.data());
  CopyValues(out[0], got.data());
  EXPECT_EQ(got_ids, (std::vector<int64_t>{5, 9}));
  EXPECT_EQ(got, std::vector<float>(vals, vals + 6));
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    uint8_t k;
    float l;
    std::vector<RowsSection> s;
    return DecodePushRows(b, &k, &l, &s);
  });
}

TEST(TableMessages, PushRowsRejectsKindReservedAndDim) {
  const int64_t ids[] = {1};
  const float vals[] = {1.0f};
  const PushRowsItem items[] = {{"user", 1, ids, vals}};
  uint8_t kind = 0;
  float lr = 0;
  std::vector<RowsSection> out;
  for (uint8_t k : {0, 1, 4}) {
    Payload p;
    EncodePushRows(k, 0.0f, items, &p);
    Status s = DecodePushRows(p, &kind, &lr, &out);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError) << int(k);
    EXPECT_NE(s.message().find("kind"), std::string::npos) << s.message();
  }
  Payload p;
  EncodePushRows(2, 0.0f, items, &p);
  p[2] = 1;
  EXPECT_EQ(DecodePushRows(p, &kind, &lr, &out).code(), StatusCode::kProtocolError);
  const PushRowsItem zero_dim[] = {{"user", 0, {}, {}}};
  Payload q;
  EncodePushRows(2, 0.0f, zero_dim, &q);
  EXPECT_EQ(DecodePushRows(q, &kind, &lr, &out).code(), StatusCode::kProtocolError);
}

TEST(TableMessages, ExportRowsRoundTripAndStrict) {
  Payload p;
  EncodeExportRowsRequest("user", (uint64_t{3} << 32) | 17, 4096, &p);
  std::string_view name;
  uint64_t cursor = 0;
  uint32_t max_rows = 0;
  ASSERT_TRUE(DecodeExportRowsRequest(p, &name, &cursor, &max_rows).ok());
  EXPECT_EQ(name, "user");
  EXPECT_EQ(cursor, (uint64_t{3} << 32) | 17);
  EXPECT_EQ(max_rows, 4096u);
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    std::string_view n;
    uint64_t c;
    uint32_t m;
    return DecodeExportRowsRequest(b, &n, &c, &m);
  });
  Payload zero;
  EncodeExportRowsRequest("user", 0, 0, &zero);
  EXPECT_EQ(DecodeExportRowsRequest(zero, &name, &cursor, &max_rows).code(),
            StatusCode::kProtocolError);

  Payload r;
  Writer w(&r);
  w.U64(kExportDone);
  w.U32(2);
  w.U32(1);
  w.I64(-7);
  w.F32(1.5f);
  w.F32(2.5f);
  uint64_t next = 0;
  RowsBlock rows;
  ASSERT_TRUE(DecodeExportRowsResponse(r, &next, &rows).ok());
  EXPECT_EQ(next, kExportDone);
  EXPECT_EQ(rows.ids, (std::vector<int64_t>{-7}));
  EXPECT_EQ(rows.values, (std::vector<float>{1.5f, 2.5f}));
  ExpectStrict(r, [](std::span<const uint8_t> b) {
    uint64_t c;
    RowsBlock rb;
    return DecodeExportRowsResponse(b, &c, &rb);
  });
}

TEST(TableMessages, ListTablesAndCreatedRoundTripAndStrict) {
  const TableInfo in[] = {{SampleConfig("user"), 12}, {SampleConfig("item"), 0}};
  Payload p;
  EncodeListTablesResponse(in, &p);
  std::vector<TableInfo> out;
  ASSERT_TRUE(DecodeListTablesResponse(p, &out).ok());
  ASSERT_EQ(out.size(), 2u);
  ExpectSameConfig(in[0].config, out[0].config);
  EXPECT_EQ(out[0].rows, 12u);
  EXPECT_EQ(out[1].config.name, "item");
  ExpectStrict(p, [](std::span<const uint8_t> b) {
    std::vector<TableInfo> t;
    return DecodeListTablesResponse(b, &t);
  });

  const uint8_t flags[] = {1, 0, 1};
  Payload c;
  EncodeTableCreateResponse(flags, &c);
  std::vector<uint8_t> created;
  ASSERT_TRUE(DecodeTableCreateResponse(c, &created).ok());
  EXPECT_EQ(created, (std::vector<uint8_t>{1, 0, 1}));
  ExpectStrict(c, [](std::span<const uint8_t> b) {
    std::vector<uint8_t> f;
    return DecodeTableCreateResponse(b, &f);
  });
  c.back() = 2;
  EXPECT_EQ(DecodeTableCreateResponse(c, &created).code(), StatusCode::kProtocolError);
}

}  // namespace
}  // namespace tensorspark::protocol
