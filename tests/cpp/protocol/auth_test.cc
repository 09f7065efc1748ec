#include "protocol/auth.h"

#include <gtest/gtest.h>

#include <string>

namespace tensorspark::protocol {
namespace {

std::string Hex(const Digest& d) {
  static const char* kDigits = "0123456789abcdef";
  std::string s;
  for (uint8_t b : d) {
    s += kDigits[b >> 4];
    s += kDigits[b & 15];
  }
  return s;
}

std::string Sha(const std::string& m) { return Hex(Sha256Digest(m.data(), m.size())); }
std::string Hmac(const std::string& k, const std::string& m) {
  return Hex(HmacSha256Digest(k, m.data(), m.size()));
}

// FIPS 180-2 / NIST example messages.
TEST(Sha256Test, KnownAnswers) {
  EXPECT_EQ(Sha(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, IncrementalMatchesOneShotAcrossBlockBoundaries) {
  std::string m;
  for (int i = 0; i < 300; ++i) m += static_cast<char>(i * 7);
  for (size_t split : {0, 1, 55, 56, 63, 64, 65, 128, 299}) {
    Sha256 h;
    h.Update(m.data(), split);
    h.Update(m.data() + split, m.size() - split);
    EXPECT_EQ(Hex(h.Finish()), Sha(m)) << split;
  }
}

// RFC 4231 test cases 1, 2, 3, 4, 6 and 7.
TEST(HmacSha256Test, Rfc4231) {
  EXPECT_EQ(Hmac(std::string(20, '\x0b'), "Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  EXPECT_EQ(Hmac("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  EXPECT_EQ(Hmac(std::string(20, '\xaa'), std::string(50, '\xdd')),
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
  std::string key4;
  for (int i = 1; i <= 25; ++i) key4 += static_cast<char>(i);
  EXPECT_EQ(Hmac(key4, std::string(50, '\xcd')),
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
  EXPECT_EQ(
      Hmac(std::string(131, '\xaa'), "Test Using Larger Than Block-Size Key - Hash Key First"),
      "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
  EXPECT_EQ(Hmac(std::string(131, '\xaa'),
                 "This is a test using a larger than block-size key and a larger than block-size "
                 "data. The key needs to be hashed before being used by the HMAC algorithm."),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
}

// Proofs as defined in docs/protocol.md, checked against Python's hmac module.
TEST(AuthTest, ProofsMatchTheSpec) {
  Nonce server_nonce, client_nonce;
  for (int i = 0; i < 32; ++i) {
    server_nonce[i] = static_cast<uint8_t>(i);
    client_nonce[i] = static_cast<uint8_t>(32 + i);
  }
  const std::string secret = "0123456789abcdef";
  EXPECT_EQ(Hex(ClientProof(secret, server_nonce, client_nonce, 3, -1)),
            "0c0dd734befc6665b167c7672fa50bb70fa7534e1ac1a695f3f3f2a081619c8a");
  EXPECT_EQ(Hex(ServerProof(secret, client_nonce, server_nonce)),
            "1eadd744ed6ebafdbda51f9fd1bd7f0d167d02b97b17cc748a2bfe415cdf631f");
  // Any change of input changes the proof.
  EXPECT_NE(ClientProof(secret, server_nonce, client_nonce, 3, -1),
            ClientProof(secret, server_nonce, client_nonce, 4, -1));
  EXPECT_NE(ClientProof(secret, server_nonce, client_nonce, 3, -1),
            ClientProof("0123456789abcdeX", server_nonce, client_nonce, 3, -1));
}

TEST(AuthTest, NoncesAreRandomAndCompareIsExact) {
  Nonce a, b;
  ASSERT_TRUE(RandomNonce(&a).ok());
  ASSERT_TRUE(RandomNonce(&b).ok());
  EXPECT_NE(a, b);
  EXPECT_TRUE(ConstantTimeEqual(a.data(), a.data(), a.size()));
  Nonce c = a;
  c[31] ^= 1;
  EXPECT_FALSE(ConstantTimeEqual(a.data(), c.data(), a.size()));
}

}  // namespace
}  // namespace tensorspark::protocol
