#include "protocol/frame.h"

#include <gtest/gtest.h>

#include <cstring>

namespace tensorspark::protocol {
namespace {

TEST(FrameTest, HeaderRoundTripAndByteLayout) {
  FrameHeader h;
  h.opcode = static_cast<uint16_t>(Opcode::kPush);
  h.flags = kFlagResponse | kFlagError;
  h.checksum = 0xdeadbeef;
  h.request_id = 0x0102030405060708ull;
  h.payload_len = 0x1122334455ull;
  uint8_t raw[kHeaderSize];
  EncodeHeader(h, raw);
  EXPECT_EQ(0, std::memcmp(raw, "TSPS", 4));  // magic bytes on the wire
  EXPECT_EQ(raw[4], 1);                       // version, little-endian
  EXPECT_EQ(raw[5], 0);
  EXPECT_EQ(raw[6], 6);  // opcode
  EXPECT_EQ(raw[8], 3);  // flags
  EXPECT_EQ(raw[12], 0xef);
  EXPECT_EQ(raw[16], 0x08);
  EXPECT_EQ(raw[23], 0x01);
  EXPECT_EQ(raw[24], 0x55);
  EXPECT_EQ(raw[28], 0x11);
  FrameHeader d = DecodeHeader(raw);
  EXPECT_EQ(d.magic, kMagic);
  EXPECT_EQ(d.version, kVersion);
  EXPECT_EQ(d.opcode, h.opcode);
  EXPECT_EQ(d.flags, h.flags);
  EXPECT_EQ(d.checksum, h.checksum);
  EXPECT_EQ(d.request_id, h.request_id);
  EXPECT_EQ(d.payload_len, h.payload_len);
  EXPECT_TRUE(ValidateHeader(d, 1ull << 40).ok());
}

TEST(FrameTest, ValidateRejectsBadMagic) {
  FrameHeader h;
  h.magic = 0x50545448;  // "HTTP"
  Status s = ValidateHeader(h, 1024);
  EXPECT_EQ(s.code(), StatusCode::kProtocolError);
}

TEST(FrameTest, ValidateRejectsWrongVersion) {
  FrameHeader h;
  h.version = 2;
  Status s = ValidateHeader(h, 1024);
  EXPECT_EQ(s.code(), StatusCode::kUnsupportedVersion);
  EXPECT_NE(s.message().find("version 1"), std::string::npos) << s.message();
}

TEST(FrameTest, ValidateRejectsOversizedLength) {
  FrameHeader h;
  h.payload_len = 1025;
  EXPECT_EQ(ValidateHeader(h, 1024).code(), StatusCode::kFrameTooLarge);
  h.payload_len = 1024;
  EXPECT_TRUE(ValidateHeader(h, 1024).ok());
}

TEST(FrameTest, ChecksOrderMagicThenVersionThenLength) {
  FrameHeader h;
  h.magic = 1;
  h.version = 9;
  h.payload_len = ~0ull;
  EXPECT_EQ(ValidateHeader(h, 10).code(), StatusCode::kProtocolError);
  h.magic = kMagic;
  EXPECT_EQ(ValidateHeader(h, 10).code(), StatusCode::kUnsupportedVersion);
}

TEST(FrameTest, UnknownFlagsAreProtocolErrors) {
  FrameHeader h;
  h.flags = kFlagResponse;
  EXPECT_TRUE(CheckFlags(h).ok());
  h.flags = 16;
  EXPECT_EQ(CheckFlags(h).code(), StatusCode::kProtocolError);
  // The encoding flags are known, but only one at a time.
  h.flags = kFlagFp16;
  EXPECT_TRUE(CheckFlags(h).ok());
  h.flags = kFlagResponse | kFlagBf16;
  EXPECT_TRUE(CheckFlags(h).ok());
  h.flags = kFlagFp16 | kFlagBf16;
  EXPECT_EQ(CheckFlags(h).code(), StatusCode::kProtocolError);
  EXPECT_EQ(WireElementSize(0), 4u);
  EXPECT_EQ(WireElementSize(kFlagFp16), 2u);
  EXPECT_EQ(WireElementSize(kFlagBf16 | kFlagResponse), 2u);
}

TEST(StatusTest, NamesAndContext) {
  EXPECT_STREQ(StatusCodeName(StatusCode::kShapeMismatch), "ShapeMismatch");
  EXPECT_STREQ(StatusCodeName(StatusCode::kAddressInUse), "AddressInUse");
  Status s(StatusCode::kNotFound, "variable 'W' is not registered");
  EXPECT_EQ(s.ToString(), "NotFound: variable 'W' is not registered");
  EXPECT_EQ(s.WithContext("pull").message(), "pull: variable 'W' is not registered");
  EXPECT_EQ(s.WithContext("pull").code(), StatusCode::kNotFound);
  EXPECT_EQ(Status::OK().ToString(), "Ok");
  EXPECT_TRUE(Status::OK().WithContext("x").ok());
}

}  // namespace
}  // namespace tensorspark::protocol
