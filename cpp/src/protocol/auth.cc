#include "protocol/auth.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include "protocol/frame.h"

namespace tensorspark::protocol {

namespace {
// libcrypto fails only when out of memory or misbuilt. A failed digest is
// then random, not zeros: a proof computed that way matches nothing a peer
// can send.
Digest Failed() {
  Digest out{};
  (void)RandomBytes(out.data(), out.size());
  return out;
}
}  // namespace

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  ok_ = ctx_ != nullptr && EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr) == 1;
}

Sha256::~Sha256() { EVP_MD_CTX_free(ctx_); }

void Sha256::Update(const void* data, size_t n) {
  if (ok_ && n > 0) ok_ = EVP_DigestUpdate(ctx_, data, n) == 1;
}

Digest Sha256::Finish() {
  Digest out{};
  unsigned int len = 0;
  if (!ok_ || EVP_DigestFinal_ex(ctx_, out.data(), &len) != 1 || len != out.size()) {
    return Failed();
  }
  return out;
}

Digest Sha256Digest(const void* data, size_t n) {
  Sha256 h;
  h.Update(data, n);
  return h.Finish();
}

namespace {
// The HMAC algorithm, fetched once (thread-safe static init) and kept.
EVP_MAC* HmacAlgorithm() {
  static EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  return mac;
}
}  // namespace

HmacSha256::HmacSha256(std::string_view key)
    : ctx_(HmacAlgorithm() ? EVP_MAC_CTX_new(HmacAlgorithm()) : nullptr) {
  if (ctx_ == nullptr) return;
  char digest[] = "SHA256";
  OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                         OSSL_PARAM_construct_end()};
  // An empty key is valid HMAC; OpenSSL wants a non-null pointer for it.
  static const unsigned char kEmpty = 0;
  const auto* k = key.empty() ? &kEmpty : reinterpret_cast<const unsigned char*>(key.data());
  ok_ = EVP_MAC_init(ctx_, k, key.size(), params) == 1;
}

HmacSha256::~HmacSha256() { EVP_MAC_CTX_free(ctx_); }

void HmacSha256::Update(const void* data, size_t n) {
  if (ok_ && n > 0) ok_ = EVP_MAC_update(ctx_, static_cast<const uint8_t*>(data), n) == 1;
}

Digest HmacSha256::Finish() {
  Digest out{};
  size_t len = 0;
  if (!ok_ || EVP_MAC_final(ctx_, out.data(), &len, out.size()) != 1 || len != out.size()) {
    return Failed();
  }
  return out;
}

Digest HmacSha256Digest(std::string_view key, const void* data, size_t n) {
  HmacSha256 h(key);
  h.Update(data, n);
  return h.Finish();
}

Status RandomBytes(void* out, size_t n) {
  auto* p = static_cast<uint8_t*>(out);
  while (n > 0) {
    ssize_t got = getrandom(p, n, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      return Status(StatusCode::kInternal,
                    std::string("getrandom failed: ") + std::strerror(errno));
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
  return Status::OK();
}

Status RandomNonce(Nonce* out) { return RandomBytes(out->data(), out->size()); }

bool ConstantTimeEqual(const uint8_t* a, const uint8_t* b, size_t n) {
  volatile uint8_t diff = 0;
  for (size_t i = 0; i < n; ++i) diff = diff | (a[i] ^ b[i]);
  return diff == 0;
}

Digest ClientProof(std::string_view secret, const Nonce& server_nonce, const Nonce& client_nonce,
                   int32_t partition_id, int32_t attempt) {
  static constexpr std::string_view kLabel = "tensorspark-v1-client";
  HmacSha256 h(secret);
  h.Update(kLabel.data(), kLabel.size());
  h.Update(server_nonce.data(), server_nonce.size());
  h.Update(client_nonce.data(), client_nonce.size());
  uint8_t ints[8];
  StoreLE32(ints, static_cast<uint32_t>(partition_id));
  StoreLE32(ints + 4, static_cast<uint32_t>(attempt));
  h.Update(ints, sizeof(ints));
  return h.Finish();
}

Digest ServerProof(std::string_view secret, const Nonce& client_nonce, const Nonce& server_nonce) {
  static constexpr std::string_view kLabel = "tensorspark-v1-server";
  HmacSha256 h(secret);
  h.Update(kLabel.data(), kLabel.size());
  h.Update(client_nonce.data(), client_nonce.size());
  h.Update(server_nonce.data(), server_nonce.size());
  return h.Finish();
}

}  // namespace tensorspark::protocol
