#include "protocol/messages.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "protocol/frame.h"

namespace tensorspark::protocol {
namespace {

std::vector<uint8_t> PushPayload(const PushHead& head, std::string_view name,
                                 std::vector<int64_t> shape, const std::vector<float>& data) {
  std::vector<uint8_t> p;
  EncodePushHead(head, &p);
  Writer w(&p);
  w.U32(1);
  w.Meta(name, shape);
  w.Bytes(data.data(), data.size() * sizeof(float));
  return p;
}

TEST(ReaderTest, ReadsLittleEndianAndChecksBounds) {
  std::vector<uint8_t> p;
  Writer w(&p);
  w.U8(7);
  w.U16(0x0102);
  w.U32(0x01020304);
  w.U64(0x0102030405060708ull);
  w.I32(-5);
  w.I64(-6);
  w.F32(1.5f);
  w.Str("abc");
  EXPECT_EQ(p[1], 0x02);
  EXPECT_EQ(p[3], 0x04);
  Reader r(p);
  uint8_t u8;
  uint16_t u16;
  uint32_t u32;
  uint64_t u64;
  int32_t i32;
  int64_t i64;
  float f;
  std::string_view s;
  ASSERT_TRUE(r.ReadU8(&u8).ok());
  ASSERT_TRUE(r.ReadU16(&u16).ok());
  ASSERT_TRUE(r.ReadU32(&u32).ok());
  ASSERT_TRUE(r.ReadU64(&u64).ok());
  ASSERT_TRUE(r.ReadI32(&i32).ok());
  ASSERT_TRUE(r.ReadI64(&i64).ok());
  ASSERT_TRUE(r.ReadF32(&f).ok());
  ASSERT_TRUE(r.ReadStr(&s).ok());
  EXPECT_EQ(u8, 7);
  EXPECT_EQ(u16, 0x0102);
  EXPECT_EQ(u32, 0x01020304u);
  EXPECT_EQ(u64, 0x0102030405060708ull);
  EXPECT_EQ(i32, -5);
  EXPECT_EQ(i64, -6);
  EXPECT_EQ(f, 1.5f);
  EXPECT_EQ(s, "abc");
  EXPECT_TRUE(r.Finish().ok());
  EXPECT_EQ(r.ReadU8(&u8).code(), StatusCode::kProtocolError);
}

TEST(ReaderTest, StringLongerThanPayloadIsTruncation) {
  std::vector<uint8_t> p = {10, 0, 'a', 'b'};
  Reader r(p);
  std::string_view s;
  EXPECT_EQ(r.ReadStr(&s).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, PushRoundTrip) {
  PushHead head{2, 3, 0.5f};
  std::vector<float> data = {1, 2, 3, 4, 5, 6};
  auto p = PushPayload(head, "layer/W", {2, 3}, data);
  PushHead h;
  TensorSection t;
  ASSERT_TRUE(DecodePush(p, &h, &t).ok());
  EXPECT_EQ(h.kind, 2);
  EXPECT_EQ(h.mean_window, 3u);
  EXPECT_EQ(h.learning_rate, 0.5f);
  ASSERT_EQ(t.metas.size(), 1u);
  EXPECT_EQ(t.metas[0].name, "layer/W");
  EXPECT_EQ(t.metas[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t.numels[0], 6u);
  EXPECT_EQ(t.data_len, 24u);
  EXPECT_EQ(0, std::memcmp(p.data() + t.data_offset, data.data(), 24));
}

TEST(MessagesTest, EveryTruncationOfAPushIsAProtocolError) {
  auto p = PushPayload({1, 1, 0}, "W", {2, 2}, {1, 2, 3, 4});
  for (size_t n = 0; n < p.size(); ++n) {
    PushHead h;
    TensorSection t;
    Status s = DecodePush(std::span<const uint8_t>(p.data(), n), &h, &t);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError) << "prefix " << n;
  }
}

TEST(MessagesTest, TrailingBytesAreAProtocolError) {
  auto p = PushPayload({1, 1, 0}, "W", {2}, {1, 2});
  p.push_back(0);
  PushHead h;
  TensorSection t;
  EXPECT_EQ(DecodePush(p, &h, &t).code(), StatusCode::kProtocolError);

  std::vector<uint8_t> v;
  EncodeVersion(5, &v);
  v.push_back(1);
  uint64_t version;
  EXPECT_EQ(DecodeVersion(v, &version).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, NonZeroPushPaddingIsRejected) {
  auto p = PushPayload({1, 1, 0}, "W", {1}, {1});
  p[2] = 1;
  PushHead h;
  TensorSection t;
  EXPECT_EQ(DecodePush(p, &h, &t).code(), StatusCode::kProtocolError);
}

std::vector<uint8_t> RegisterWithMeta(const std::vector<uint8_t>& meta, size_t data_bytes) {
  std::vector<uint8_t> p;
  Writer w(&p);
  w.U32(1);
  w.Bytes(meta.data(), meta.size());
  p.resize(p.size() + data_bytes);
  return p;
}

TEST(MessagesTest, RejectsNameTooLongOrEmpty) {
  for (size_t len : {size_t{0}, size_t{1025}, size_t{4000}}) {
    std::vector<uint8_t> meta;
    Writer w(&meta);
    w.Str(std::string(len, 'x'));
    w.U8(1);
    w.U8(0);
    TensorSection t;
    EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 4), &t).code(), StatusCode::kProtocolError)
        << len;
  }
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Str(std::string(1024, 'x'));
  w.U8(1);
  w.U8(0);
  TensorSection t;
  EXPECT_TRUE(DecodeRegister(RegisterWithMeta(meta, 4), &t).ok());
}

TEST(MessagesTest, RejectsTooManyDims) {
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Str("W");
  w.U8(1);
  w.U8(9);
  for (int i = 0; i < 9; ++i) w.I64(1);
  TensorSection t;
  Status s = DecodeRegister(RegisterWithMeta(meta, 4), &t);
  EXPECT_EQ(s.code(), StatusCode::kProtocolError);
  EXPECT_NE(s.message().find("dimensions"), std::string::npos) << s.message();
}

TEST(MessagesTest, RejectsNegativeDims) {
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Str("W");
  w.U8(1);
  w.U8(2);
  w.I64(-1);
  w.I64(-4);
  TensorSection t;
  EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 16), &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, RejectsElementCountOverflow) {
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Str("W");
  w.U8(1);
  w.U8(3);
  w.I64(int64_t{1} << 31);
  w.I64(int64_t{1} << 31);
  w.I64(int64_t{1} << 31);
  TensorSection t;
  EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 0), &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, RejectsBadDtypeAndHugeCount) {
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Str("W");
  w.U8(2);  // not float32
  w.U8(0);
  TensorSection t;
  EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 4), &t).code(), StatusCode::kProtocolError);

  std::vector<uint8_t> p;
  Writer(&p).U32(0xffffffffu);  // count the payload cannot hold
  EXPECT_EQ(DecodeRegister(p, &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, DataSectionMustMatchMetas) {
  std::vector<uint8_t> meta;
  Writer w(&meta);
  w.Meta("W", std::vector<int64_t>{3});
  TensorSection t;
  EXPECT_TRUE(DecodeRegister(RegisterWithMeta(meta, 12), &t).ok());
  EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 8), &t).code(), StatusCode::kProtocolError);
  EXPECT_EQ(DecodeRegister(RegisterWithMeta(meta, 16), &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, ElementSumThatWrapsIsRejected) {
  // 2^16 metas of 2^48 elements sum to 2^64: a wrapping sum would accept an
  // empty data section and the server would read far past the payload.
  const std::vector<int64_t> huge{int64_t{1} << 48};
  std::vector<uint8_t> p;
  Writer w(&p);
  w.U32(1u << 16);
  for (int i = 0; i < (1 << 16); ++i) w.Meta("W", huge);
  TensorSection t;
  EXPECT_EQ(DecodeRegister(p, &t).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> push;
  EncodePushHead(PushHead{2, 1, 0.0f}, &push);
  push.insert(push.end(), p.begin(), p.end());
  PushHead head;
  EXPECT_EQ(DecodePush(push, &head, &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, ZeroSizedAndScalarTensors) {
  std::vector<uint8_t> p;
  Writer w(&p);
  w.U32(2);
  w.Meta("scalar", std::vector<int64_t>{});
  w.Meta("empty", std::vector<int64_t>{0, 5});
  w.F32(3.0f);
  TensorSection t;
  ASSERT_TRUE(DecodeRegister(p, &t).ok());
  EXPECT_EQ(t.numels[0], 1u);
  EXPECT_EQ(t.numels[1], 0u);
}

TEST(MessagesTest, ErrorRoundTrip) {
  std::vector<uint8_t> p;
  EncodeError(Status(StatusCode::kShapeMismatch, "bad shape"), &p);
  Status remote;
  ASSERT_TRUE(DecodeError(p, &remote).ok());
  EXPECT_EQ(remote.code(), StatusCode::kShapeMismatch);
  EXPECT_EQ(remote.message(), "bad shape");
  p.pop_back();
  EXPECT_EQ(DecodeError(p, &remote).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, HelloRoundTrip) {
  HelloRequest in;
  for (size_t i = 0; i < kNonceSize; ++i) in.client_nonce[i] = static_cast<uint8_t>(i);
  in.partition_id = 17;
  in.attempt = 2;
  in.client_name = "worker";
  std::vector<uint8_t> p;
  EncodeHello(in, &p);
  EXPECT_EQ(p.size(), 32u + 4 + 4 + 2 + 6);
  HelloRequest out;
  ASSERT_TRUE(DecodeHello(p, &out).ok());
  EXPECT_EQ(out.client_nonce, in.client_nonce);
  EXPECT_EQ(out.partition_id, 17);
  EXPECT_EQ(out.attempt, 2);
  EXPECT_EQ(out.client_name, "worker");
  p.resize(20);
  EXPECT_EQ(DecodeHello(p, &out).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, PullRequestListStatsRegisterResponseRoundTrips) {
  std::vector<std::string_view> names = {"a", "bb"};
  std::vector<uint8_t> p;
  EncodePullRequest(names, &p);
  std::vector<std::string_view> got;
  ASSERT_TRUE(DecodePullRequest(p, &got).ok());
  EXPECT_EQ(got, names);

  std::vector<VariableInfo> vars(2);
  vars[0].name = "x";
  vars[0].shape = {4};
  vars[1].name = "y";
  p.clear();
  EncodeListResponse(9, vars, &p);
  uint64_t version;
  std::vector<VariableInfo> vars2;
  ASSERT_TRUE(DecodeListResponse(p, &version, &vars2).ok());
  EXPECT_EQ(version, 9u);
  ASSERT_EQ(vars2.size(), 2u);
  EXPECT_EQ(vars2[0].shape, vars[0].shape);
  EXPECT_EQ(vars2[1].shape.size(), 0u);

  std::vector<StatEntry> stats = {{"version", 3}, {"pushes", 7}};
  p.clear();
  EncodeStatsResponse(stats, &p);
  std::vector<StatEntry> stats2;
  ASSERT_TRUE(DecodeStatsResponse(p, &stats2).ok());
  EXPECT_EQ(stats2, stats);

  RegisterResponse rr{4, {1, 0, 1}};
  p.clear();
  EncodeRegisterResponse(rr, &p);
  RegisterResponse rr2;
  ASSERT_TRUE(DecodeRegisterResponse(p, &rr2).ok());
  EXPECT_EQ(rr2.version, 4u);
  EXPECT_EQ(rr2.created, rr.created);
}

TEST(MessagesTest, PullResponseDecode) {
  std::vector<uint8_t> p;
  Writer w(&p);
  w.U64(3);
  w.U32(1);
  w.Meta("v", std::vector<int64_t>{2});
  w.F32(1.0f);
  w.F32(-2.0f);
  uint64_t version;
  std::vector<Tensor> t;
  ASSERT_TRUE(DecodePullResponse(p, &version, &t).ok());
  EXPECT_EQ(version, 3u);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].values, (std::vector<float>{1.0f, -2.0f}));
  p.pop_back();
  EXPECT_EQ(DecodePullResponse(p, &version, &t).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, SetOptimizerRoundTrip) {
  OptimizerConfig c;
  c.kind = OptimizerKind::kAdamW;
  c.learning_rate = 1e-3f;
  c.beta1 = 0.8f;
  c.beta2 = 0.99f;
  c.epsilon = 1e-8f;
  c.weight_decay = 0.004f;
  c.initial_accumulator = 0.1f;
  std::vector<std::string_view> names = {"layer/W", "b"};
  std::vector<uint8_t> p;
  EncodeSetOptimizer(c, names, &p);
  ASSERT_EQ(p.size(), kSetOptimizerHeadSize + 4 + (2 + 7) + (2 + 1));
  EXPECT_EQ(p[0], 6);
  OptimizerConfig d;
  std::vector<std::string_view> got;
  ASSERT_TRUE(DecodeSetOptimizer(p, &d, &got).ok());
  EXPECT_EQ(d.kind, c.kind);
  EXPECT_EQ(d.learning_rate, c.learning_rate);
  EXPECT_EQ(d.beta1, c.beta1);
  EXPECT_EQ(d.beta2, c.beta2);
  EXPECT_EQ(d.epsilon, c.epsilon);
  EXPECT_EQ(d.weight_decay, c.weight_decay);
  EXPECT_EQ(d.initial_accumulator, c.initial_accumulator);
  EXPECT_EQ(got, names);

  // No names (= every variable), and a kind the decoder leaves to the
  // server's validation.
  c.kind = static_cast<OptimizerKind>(200);
  p.clear();
  EncodeSetOptimizer(c, {}, &p);
  ASSERT_EQ(p.size(), kSetOptimizerHeadSize + 4);
  ASSERT_TRUE(DecodeSetOptimizer(p, &d, &got).ok());
  EXPECT_EQ(static_cast<int>(d.kind), 200);
  EXPECT_TRUE(got.empty());
}

TEST(MessagesTest, MalformedSetOptimizerIsAProtocolError) {
  OptimizerConfig c;
  std::vector<std::string_view> names = {"w"};
  std::vector<uint8_t> p;
  EncodeSetOptimizer(c, names, &p);
  OptimizerConfig d;
  std::vector<std::string_view> got;
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeSetOptimizer(cut, &d, &got).code(), StatusCode::kProtocolError) << len;
  }
  std::vector<uint8_t> trailing = p;
  trailing.push_back(0);
  EXPECT_EQ(DecodeSetOptimizer(trailing, &d, &got).code(), StatusCode::kProtocolError);
  for (size_t i = 1; i <= 3; ++i) {
    std::vector<uint8_t> reserved = p;
    reserved[i] = 1;
    Status s = DecodeSetOptimizer(reserved, &d, &got);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError);
    EXPECT_NE(s.message().find("reserved"), std::string::npos);
  }
  // An empty name, and a count the remaining bytes cannot hold.
  std::vector<uint8_t> empty_name;
  std::vector<std::string_view> blank = {""};
  EncodeSetOptimizer(c, blank, &empty_name);
  EXPECT_EQ(DecodeSetOptimizer(empty_name, &d, &got).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> huge = p;
  std::fill_n(huge.begin() + kSetOptimizerHeadSize, 4, uint8_t{0xFF});  // count 2^32 - 1
  EXPECT_EQ(DecodeSetOptimizer(huge, &d, &got).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, JoinResponseRoundTrip) {
  std::vector<uint8_t> p;
  EncodeJoinResponse(7, 3, &p);
  ASSERT_EQ(p.size(), kJoinResponseSize);
  uint64_t version = 0, clock = 0;
  ASSERT_TRUE(DecodeJoinResponse(p, &version, &clock).ok());
  EXPECT_EQ(version, 7u);
  EXPECT_EQ(clock, 3u);
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeJoinResponse(cut, &version, &clock).code(), StatusCode::kProtocolError);
  }
  p.push_back(0);
  EXPECT_EQ(DecodeJoinResponse(p, &version, &clock).code(), StatusCode::kProtocolError);
}

TEST(MessagesTest, ConfigureRoundTrip) {
  RunConfig c;
  c.mode = ConsistencyMode::kBoundedStaleness;
  c.staleness = 3;
  c.heartbeat_timeout_s = 0.5f;
  c.wait_timeout_s = 12.0f;
  std::vector<uint8_t> p;
  EncodeConfigure(c, &p);
  ASSERT_EQ(p.size(), kConfigureSize);
  EXPECT_EQ(p[0], 2);
  RunConfig d;
  ASSERT_TRUE(DecodeConfigure(p, &d).ok());
  EXPECT_EQ(d.mode, c.mode);
  EXPECT_EQ(d.staleness, 3u);
  EXPECT_EQ(d.heartbeat_timeout_s, 0.5f);
  EXPECT_EQ(d.wait_timeout_s, 12.0f);
  EXPECT_TRUE(ValidateRunConfig(d).ok());
  // An unknown mode decodes; validation refuses it.
  p[0] = 9;
  ASSERT_TRUE(DecodeConfigure(p, &d).ok());
  EXPECT_EQ(ValidateRunConfig(d).code(), StatusCode::kInvalidArgument);
  d.mode = ConsistencyMode::kSync;
  d.wait_timeout_s = 0.0f;
  EXPECT_EQ(ValidateRunConfig(d).code(), StatusCode::kInvalidArgument);
}

TEST(MessagesTest, MalformedConfigureIsAProtocolError) {
  std::vector<uint8_t> p;
  EncodeConfigure(RunConfig{}, &p);
  RunConfig d;
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeConfigure(cut, &d).code(), StatusCode::kProtocolError) << len;
  }
  std::vector<uint8_t> trailing = p;
  trailing.push_back(0);
  EXPECT_EQ(DecodeConfigure(trailing, &d).code(), StatusCode::kProtocolError);
  for (size_t i = 1; i <= 3; ++i) {
    std::vector<uint8_t> reserved = p;
    reserved[i] = 1;
    EXPECT_EQ(DecodeConfigure(reserved, &d).code(), StatusCode::kProtocolError) << i;
  }
}

TEST(MessagesTest, HeartbeatIsEmptyOrAProgressReport) {
  std::vector<uint8_t> p;
  EncodeHeartbeat(nullptr, &p);
  EXPECT_TRUE(p.empty());
  bool has = true;
  ProgressReport r;
  ASSERT_TRUE(DecodeHeartbeat(p, &has, &r).ok());
  EXPECT_FALSE(has);
  const ProgressReport sent{12, 384, -0.125};
  EncodeHeartbeat(&sent, &p);
  ASSERT_EQ(p.size(), kProgressReportSize);
  EXPECT_EQ(p[0], 12);     // little-endian steps
  EXPECT_EQ(p[23], 0xbf);  // sign and exponent of -0.125, last byte
  ASSERT_TRUE(DecodeHeartbeat(p, &has, &r).ok());
  EXPECT_TRUE(has);
  EXPECT_EQ(r.steps, 12u);
  EXPECT_EQ(r.samples, 384u);
  EXPECT_EQ(r.loss, -0.125);
  const ProgressReport unknown{1, 2, std::numeric_limits<double>::quiet_NaN()};
  p.clear();
  EncodeHeartbeat(&unknown, &p);
  ASSERT_TRUE(DecodeHeartbeat(p, &has, &r).ok());
  EXPECT_TRUE(std::isnan(r.loss));
  for (size_t len : {1u, 8u, 23u, 25u, 48u}) {
    std::vector<uint8_t> bad(len, 0);
    Status s = DecodeHeartbeat(bad, &has, &r);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError) << len;
    EXPECT_FALSE(has);
    EXPECT_NE(s.message().find("got " + std::to_string(len) + " bytes"), std::string::npos)
        << s.message();
  }
}

TEST(MessagesTest, ReportRoundTrip) {
  const std::string text = "Thread 0x01 (most recent call first):\n  File \"x.py\", line 3 in f\n";
  std::vector<uint8_t> p;
  EncodeReport(kReportStackDump, text, &p);
  ASSERT_EQ(p.size(), kReportHeadSize + text.size());
  EXPECT_EQ(p[0], 1);
  EXPECT_EQ(p[1] | p[2] | p[3], 0);
  EXPECT_EQ(LoadLE32(p.data() + 4), text.size());
  uint8_t kind = 0;
  std::string_view got;
  ASSERT_TRUE(DecodeReport(p, &kind, &got).ok());
  EXPECT_EQ(kind, kReportStackDump);
  EXPECT_EQ(got, text);
  // An empty text, and one of exactly the limit, are fine.
  for (size_t len : {size_t{0}, kMaxReportBytes}) {
    const std::string t(len, 'x');
    p.clear();
    EncodeReport(kReportStackDump, t, &p);
    ASSERT_TRUE(DecodeReport(p, &kind, &got).ok()) << len;
    EXPECT_EQ(got.size(), len);
  }
}

TEST(MessagesTest, MalformedReportIsAProtocolError) {
  std::vector<uint8_t> p;
  EncodeReport(kReportStackDump, "abc", &p);
  uint8_t kind;
  std::string_view text;
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeReport(cut, &kind, &text).code(), StatusCode::kProtocolError) << len;
  }
  std::vector<uint8_t> trailing = p;
  trailing.push_back(0);
  EXPECT_EQ(DecodeReport(trailing, &kind, &text).code(), StatusCode::kProtocolError);
  for (uint8_t bad : {0, 2, 255}) {
    std::vector<uint8_t> k = p;
    k[0] = bad;
    Status s = DecodeReport(k, &kind, &text);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError);
    EXPECT_NE(s.message().find("unknown REPORT kind"), std::string::npos) << s.message();
  }
  for (size_t i = 1; i <= 3; ++i) {
    std::vector<uint8_t> reserved = p;
    reserved[i] = 1;
    Status s = DecodeReport(reserved, &kind, &text);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError);
    EXPECT_NE(s.message().find("reserved"), std::string::npos) << s.message();
  }
  // Over 64 KiB: refused by its length, whether or not the bytes follow.
  std::vector<uint8_t> big;
  EncodeReport(kReportStackDump, std::string(kMaxReportBytes + 1, 'x'), &big);
  Status s = DecodeReport(big, &kind, &text);
  EXPECT_EQ(s.code(), StatusCode::kProtocolError);
  EXPECT_NE(s.message().find("exceeds the limit of 65536 bytes"), std::string::npos) << s.message();
  big.resize(kReportHeadSize);
  EXPECT_NE(DecodeReport(big, &kind, &text).message().find("exceeds"), std::string::npos);
}

TEST(MessagesTest, ReportTailKeepsTheLast64KiBAtACharacterBoundary) {
  const std::string small = "short";
  EXPECT_EQ(ReportTail(small), small);
  std::string big = "HEAD" + std::string(kMaxReportBytes, 'a') + "TAIL";
  std::string_view tail = ReportTail(big);
  EXPECT_EQ(tail.size(), kMaxReportBytes);
  EXPECT_TRUE(tail.ends_with("TAIL"));
  EXPECT_EQ(tail.data(), big.data() + big.size() - kMaxReportBytes);
  // A 3-byte character (U+20AC) cut by the limit is dropped whole.
  std::string euro = "\xE2\x82\xAC" + std::string(kMaxReportBytes - 1, 'b');
  tail = ReportTail(euro);
  EXPECT_EQ(tail.size(), kMaxReportBytes - 1);
  EXPECT_EQ(tail.front(), 'b');
}

TEST(MessagesTest, ReportsResponseRoundTrip) {
  std::vector<WorkerReport> reports(2);
  reports[0] = {0, 1, 7, 120, 35, 12, "File \"train.py\", line 9"};
  reports[1] = {3, 0, 6, 0, 9000, WorkerReport::kNoReport, ""};
  std::vector<uint8_t> p;
  EncodeReportsResponse(reports, &p);
  ASSERT_EQ(p.size(), 4 + 2 * kMinReportsEntrySize + reports[0].text.size());
  std::vector<WorkerReport> got;
  ASSERT_TRUE(DecodeReportsResponse(p, &got).ok());
  ASSERT_EQ(got.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(got[i].partition, reports[i].partition);
    EXPECT_EQ(got[i].attempt, reports[i].attempt);
    EXPECT_EQ(got[i].clock, reports[i].clock);
    EXPECT_EQ(got[i].steps, reports[i].steps);
    EXPECT_EQ(got[i].progress_age_ms, reports[i].progress_age_ms);
    EXPECT_EQ(got[i].report_age_ms, reports[i].report_age_ms);
    EXPECT_EQ(got[i].text, reports[i].text);
  }
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeReportsResponse(cut, &got).code(), StatusCode::kProtocolError) << len;
  }
  std::vector<uint8_t> trailing = p;
  trailing.push_back(0);
  EXPECT_EQ(DecodeReportsResponse(trailing, &got).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> huge = p;
  std::fill_n(huge.begin(), 4, uint8_t{0xFF});  // count 2^32 - 1
  EXPECT_EQ(DecodeReportsResponse(huge, &got).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> empty;
  EncodeReportsResponse({}, &empty);
  ASSERT_TRUE(DecodeReportsResponse(empty, &got).ok());
  EXPECT_TRUE(got.empty());
}

TEST(MessagesTest, TagRequestIsExactlyAU64) {
  std::vector<uint8_t> p;
  EncodeTagRequest(0x0102030405060708u, &p);
  ASSERT_EQ(p.size(), kTagRequestSize);
  EXPECT_EQ(p[0], 0x08);  // little-endian
  uint64_t tag = 0;
  ASSERT_TRUE(DecodeTagRequest(p, &tag).ok());
  EXPECT_EQ(tag, 0x0102030405060708u);
  for (size_t len : {0, 7, 9}) {
    std::vector<uint8_t> other(len);
    Status s = DecodeTagRequest(other, &tag);
    EXPECT_EQ(s.code(), StatusCode::kProtocolError) << len;
    EXPECT_NE(s.message().find("exactly a u64 tag"), std::string::npos) << s.message();
  }
}

TEST(MessagesTest, SnapshotResponsesRoundTrip) {
  const std::string name = "snapshot-00000000000000000042-tag-00000000000000000007.tsnap";
  std::vector<uint8_t> p;
  EncodeSnapshotResponse(42, name, &p);
  ASSERT_EQ(p.size(), 8 + 2 + name.size());
  uint64_t version = 0;
  std::string got_name;
  ASSERT_TRUE(DecodeSnapshotResponse(p, &version, &got_name).ok());
  EXPECT_EQ(version, 42u);
  EXPECT_EQ(got_name, name);
  for (size_t len = 0; len < p.size(); ++len) {
    std::vector<uint8_t> cut(p.begin(), p.begin() + len);
    EXPECT_EQ(DecodeSnapshotResponse(cut, &version, &got_name).code(), StatusCode::kProtocolError);
  }
  std::vector<uint8_t> empty_name;
  EncodeSnapshotResponse(1, "", &empty_name);
  EXPECT_EQ(DecodeSnapshotResponse(empty_name, &version, &got_name).code(),
            StatusCode::kProtocolError);

  const std::vector<SnapshotInfo> files = {{7, 42, name}, {0, 40, "snapshot-40.tsnap"}};
  std::vector<uint8_t> list;
  EncodeSnapshotsResponse(files, &list);
  std::vector<SnapshotInfo> got;
  ASSERT_TRUE(DecodeSnapshotsResponse(list, &got).ok());
  ASSERT_EQ(got.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(got[i].tag, files[i].tag);
    EXPECT_EQ(got[i].version, files[i].version);
    EXPECT_EQ(got[i].name, files[i].name);
  }
  for (size_t len = 0; len < list.size(); ++len) {
    std::vector<uint8_t> cut(list.begin(), list.begin() + len);
    EXPECT_EQ(DecodeSnapshotsResponse(cut, &got).code(), StatusCode::kProtocolError) << len;
  }
  std::vector<uint8_t> trailing = list;
  trailing.push_back(0);
  EXPECT_EQ(DecodeSnapshotsResponse(trailing, &got).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> huge = list;
  std::fill_n(huge.begin(), 4, uint8_t{0xFF});
  EXPECT_EQ(DecodeSnapshotsResponse(huge, &got).code(), StatusCode::kProtocolError);
  std::vector<uint8_t> none;
  EncodeSnapshotsResponse({}, &none);
  ASSERT_TRUE(DecodeSnapshotsResponse(none, &got).ok());
  EXPECT_TRUE(got.empty());
  EXPECT_STREQ(OpcodeName(static_cast<uint16_t>(Opcode::kRestore)), "RESTORE");
  EXPECT_STREQ(OpcodeName(static_cast<uint16_t>(Opcode::kPull)), "PULL");
}

}  // namespace
}  // namespace tensorspark::protocol
