// TLS identities for the parameter server (OpenSSL).
//
// A run encrypts its frames with TLS 1.3 when the server has a key and
// certificate (ServerOptions::tls_cert_pem / tls_key_pem) and its clients
// pin that certificate's SHA-256 fingerprint (ClientOptions::
// tls_fingerprints). No CA is involved: the fingerprint travels with the
// run's secret, so a per-run self-signed certificate is all a run needs.
//
//   tensorspark::TlsIdentity id;
//   TS_RETURN_IF_ERROR(tensorspark::MakeTlsIdentity(&id));
//   server_options.tls_cert_pem = id.cert_pem;
//   server_options.tls_key_pem = id.key_pem;
//   client_options.tls_fingerprints = {id.fingerprint};
#pragma once

#include <string>
#include <string_view>

#include "tensorspark/status.h"

namespace tensorspark {

struct TlsIdentity {
  std::string cert_pem;     // self-signed X.509 certificate
  std::string key_pem;      // its private key (PKCS#8), unencrypted
  std::string fingerprint;  // "sha256:" + 64 lowercase hex digits of the DER certificate
};

// A new ECDSA P-256 key and a self-signed certificate for it, valid from
// one hour ago for `valid_days`. Thread-safe.
[[nodiscard]] Status MakeTlsIdentity(TlsIdentity* out, int valid_days = 30);

// The fingerprint ("sha256:<hex>") of the first certificate in `cert_pem`;
// kInvalidArgument when it holds none. Thread-safe.
[[nodiscard]] Status TlsFingerprint(std::string_view cert_pem, std::string* out);

// `fingerprint` in the canonical form "sha256:<64 lowercase hex>": an
// optional "sha256:" prefix, colons between bytes and upper case are
// accepted; anything else is kInvalidArgument, naming the value.
[[nodiscard]] Status NormalizeTlsFingerprint(std::string_view fingerprint, std::string* out);

}  // namespace tensorspark
