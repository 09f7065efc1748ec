// Handshake cryptography of wire protocol v1: SHA-256, HMAC-SHA256, random
// nonces and the client/server proofs (docs/protocol.md, "Handshake").
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "protocol/messages.h"
#include "tensorspark/status.h"

namespace tensorspark::protocol {

using Digest = std::array<uint8_t, 32>;

// Incremental SHA-256 (FIPS 180-4).
class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t n);
  Digest Finish();  // the object must not be used afterwards

 private:
  void Block(const uint8_t* p);

  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_len_ = 0;
};

Digest Sha256Digest(const void* data, size_t n);

// Incremental HMAC-SHA256 (RFC 2104).
class HmacSha256 {
 public:
  explicit HmacSha256(std::string_view key);
  void Update(const void* data, size_t n);
  Digest Finish();

 private:
  Sha256 inner_;
  uint8_t opad_key_[64];
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
