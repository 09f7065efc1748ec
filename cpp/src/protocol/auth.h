// Handshake cryptography of wire protocol v1: SHA-256, HMAC-SHA256 (both
// OpenSSL's), random nonces and the client/server proofs (docs/protocol.md,
// "Handshake").
#pragma once

#include <openssl/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "protocol/messages.h"
#include "tensorspark/status.h"

namespace tensorspark::protocol {

using Digest = std::array<uint8_t, 32>;

// Incremental SHA-256 (FIPS 180-4), computed by OpenSSL's libcrypto.
// Not copyable; one thread at a time.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(const void* data, size_t n);
  Digest Finish();  // the object must not be used afterwards

 private:
  EVP_MD_CTX* ctx_;
  bool ok_ = false;  // every libcrypto call so far succeeded
};

Digest Sha256Digest(const void* data, size_t n);

// Incremental HMAC-SHA256 (RFC 2104), computed by OpenSSL's libcrypto.
// Not copyable; one thread at a time.
class HmacSha256 {
 public:
  explicit HmacSha256(std::string_view key);
  ~HmacSha256();
  HmacSha256(const HmacSha256&) = delete;
  HmacSha256& operator=(const HmacSha256&) = delete;
  void Update(const void* data, size_t n);
  Digest Finish();

 private:
  EVP_MAC_CTX* ctx_;
  bool ok_ = false;  // every libcrypto call so far succeeded
};

Digest HmacSha256Digest(std::string_view key, const void* data, size_t n);

// Fills `out` from the kernel's CSPRNG (getrandom).
[[nodiscard]] Status RandomBytes(void* out, size_t n);
[[nodiscard]] Status RandomNonce(Nonce* out);

// Compares without an early exit, so timing reveals nothing about where
// the inputs differ.
bool ConstantTimeEqual(const uint8_t* a, const uint8_t* b, size_t n);

// HMAC(secret, "tensorspark-v1-client" ‖ server_nonce ‖ client_nonce ‖
//      i32 partition_id ‖ i32 attempt), integers little-endian.
Digest ClientProof(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
                   int32_t partition_id, int32_t attempt);
// HMAC(secret, "tensorspark-v1-server" ‖ client_nonce ‖ server_nonce).
Digest ServerProof(std::string_view secret, const Nonce& client_nonce, const Nonce& server_nonce);

}  // namespace tensorspark::protocol
