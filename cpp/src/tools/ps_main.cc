// tensorspark-ps: the standalone parameter server.
//
//   tensorspark-ps --secret-file /path/to/secret [--port 10080] [--bind 0.0.0.0] [--threads N]
//                  [--snapshot-dir DIR --snapshot-every-s S] [--resume-from DIR]
//
// Runs until SIGINT/SIGTERM or a client's SHUTDOWN request, then stops
// cleanly (writing a final snapshot when --snapshot-dir is set) and exits 0.
// Bad arguments exit 2, a failed start exits 1.
#include <malloc.h>
#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>

#include "tensorspark/server.h"
#include "tensorspark/tls.h"

namespace {

constexpr char kUsage[] =
    "usage: tensorspark-ps --secret-file PATH [--port N] [--bind ADDR] [--max-frame-bytes N]\n"
    "                      [--max-connections N] [--max-pending-handshakes N]\n"
    "                      [--max-pending-per-peer N]\n"
    "                      [--threads N] [--unix-socket PATH] [--metrics-port N]\n"
    "                      [--snapshot-dir DIR] [--snapshot-every-s S] [--snapshot-every-versions "
    "N]\n"
    "                      [--snapshot-keep N] [--resume-from PATH]\n"
    "                      [--tls [--tls-cert PEM --tls-key PEM] [--tls-fingerprint-file PATH]]\n"
    "\n"
    "Parameter server of tensorspark (wire protocol v1).\n"
    "\n"
    "  --secret-file PATH    file holding the run secret (raw bytes, >= 16; one trailing\n"
    "                        newline is ignored). Required.\n"
    "  --port N              TCP port to listen on (default 10080; 0 picks a free one)\n"
    "  --bind ADDR           address to listen on (default 0.0.0.0, every interface)\n"
    "  --max-frame-bytes N   largest request payload accepted (default 2147483648)\n"
    "  --threads N           threads that apply one large update together, in chunks\n"
    "                        (default 0: one per core; 1: no extra threads; at most 1024)\n"
    "  --max-connections N   authenticated connections served at once (default 1024)\n"
    "  --max-pending-handshakes N, --max-pending-per-peer N\n"
    "                        connections still authenticating, in all (default 128) and\n"
    "                        from one IP (default 32); past either a newer one evicts an\n"
    "                        idle pending one, so strangers cannot lock members out\n"
    "  --unix-socket PATH    also listen on this Unix-domain socket (mode 0600; clients on\n"
    "                        this host connect to host \"unix:PATH\"); a stale socket file\n"
    "                        is replaced, and the file is removed on exit\n"
    "  --metrics-port N      serve Prometheus metrics at http://ADDR:N/metrics (0 picks a\n"
    "                        free port; default: off)\n"
    "\n"
    "TLS (docs/protocol.md, \"TLS\"):\n"
    "  --tls                 TLS 1.3 on every connection (plain clients are refused), with a\n"
    "                        new self-signed certificate unless --tls-cert is given; its\n"
    "                        fingerprint is printed for clients to pin (tls=\"sha256:...\")\n"
    "  --tls-cert PEM, --tls-key PEM\n"
    "                        the certificate and its unencrypted private key (imply --tls);\n"
    "                        e.g. one pair shared by all servers of a run\n"
    "  --tls-fingerprint-file PATH\n"
    "                        also write the fingerprint (one line) to PATH\n"
    "\n"
    "Snapshots (docs/snapshots.md):\n"
    "  --snapshot-dir DIR    write snapshots of the variables, optimizer state and version\n"
    "                        into DIR (created if missing); also one on exit if the model\n"
    "                        changed since the last one\n"
    "  --snapshot-every-s S  write one when the model changed and S seconds passed since\n"
    "                        the last (decimal, default 0: off)\n"
    "  --snapshot-every-versions N\n"
    "                        write one when N more pushes were applied (default 0: off)\n"
    "  --snapshot-keep N     snapshots kept in DIR, older ones are deleted (default 3;\n"
    "                        0 keeps all)\n"
    "  --resume-from PATH    start from a snapshot file, or from the newest valid snapshot\n"
    "                        in a directory (corrupt ones are skipped and logged)\n"
    "\n"
    "  --help                show this text\n"
    "\n"
    "Stops on SIGINT, SIGTERM or a client's shutdown request.\n";

int BadArgs(const std::string& msg, bool show_usage = true) {
  std::fprintf(stderr, "tensorspark-ps: %s\n%s%s", msg.c_str(), show_usage ? "\n" : "",
               show_usage ? kUsage : "");
  return 2;
}

bool ParseUint(std::string_view s, uint64_t max, uint64_t* out) {
  if (s.empty() || s.size() > 20) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (max - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

// Seconds as a plain decimal (no sign, no exponent, no inf/nan).
bool ParseSeconds(const std::string& s, double* out) {
  if (s.empty() || s.find_first_not_of("0123456789.") != std::string::npos) return false;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (errno != 0 || end != s.c_str() + s.size() || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

// The whole file at `path`, as bytes; false (errno set) when it cannot be read.
bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  tensorspark::ServerOptions opt;
  opt.port = 10080;
  std::string secret_file;
  bool tls = false;
  std::string tls_cert_file, tls_key_file, tls_fingerprint_file;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    if (auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    auto take_value = [&](std::string* out) {
      if (has_value) {
        *out = value;
        return true;
      }
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "--port") {
      uint64_t port;
      if (!take_value(&value) || !ParseUint(value, 65535, &port)) {
        return BadArgs("--port needs a number from 0 to 65535");
      }
      opt.port = static_cast<uint16_t>(port);
    } else if (arg == "--metrics-port") {
      uint64_t port;
      if (!take_value(&value) || !ParseUint(value, 65535, &port)) {
        return BadArgs("--metrics-port needs a number from 0 to 65535");
      }
      opt.metrics_port = static_cast<int>(port);
    } else if (arg == "--bind") {
      if (!take_value(&opt.bind_address) || opt.bind_address.empty()) {
        return BadArgs("--bind needs an address, e.g. 0.0.0.0 or 127.0.0.1");
      }
    } else if (arg == "--secret-file") {
      if (!take_value(&secret_file) || secret_file.empty()) {
        return BadArgs("--secret-file needs a path");
      }
    } else if (arg == "--max-frame-bytes") {
      uint64_t n;
      if (!take_value(&value) || !ParseUint(value, UINT64_MAX, &n) || n < 64) {
        return BadArgs("--max-frame-bytes needs a number >= 64");
      }
      opt.max_frame_bytes = n;
    } else if (arg == "--max-connections" || arg == "--max-pending-handshakes" ||
               arg == "--max-pending-per-peer") {
      uint64_t n;
      if (!take_value(&value) || !ParseUint(value, UINT64_MAX, &n) || n < 1) {
        return BadArgs(arg + " needs a number >= 1");
      }
      (arg == "--max-connections"          ? opt.max_connections
       : arg == "--max-pending-handshakes" ? opt.max_pending_handshakes
                                           : opt.max_pending_per_peer) = n;
    } else if (arg == "--unix-socket") {
      if (!take_value(&opt.unix_path) || opt.unix_path.empty()) {
        return BadArgs("--unix-socket needs a path, e.g. /tmp/tensorspark-ps.sock");
      }
    } else if (arg == "--threads") {
      uint64_t n;
      if (!take_value(&value) || !ParseUint(value, 1024, &n)) {
        return BadArgs("--threads needs a number from 0 (one per core) to 1024");
      }
      opt.update_threads = static_cast<uint32_t>(n);
    } else if (arg == "--snapshot-dir") {
      if (!take_value(&opt.snapshot_dir) || opt.snapshot_dir.empty()) {
        return BadArgs("--snapshot-dir needs a directory");
      }
    } else if (arg == "--snapshot-every-s") {
      if (!take_value(&value) || !ParseSeconds(value, &opt.snapshot_every_s)) {
        return BadArgs("--snapshot-every-s needs a number of seconds >= 0, e.g. 300 or 0.5");
      }
    } else if (arg == "--snapshot-every-versions") {
      if (!take_value(&value) || !ParseUint(value, UINT64_MAX, &opt.snapshot_every_versions)) {
        return BadArgs("--snapshot-every-versions needs a number >= 0");
      }
    } else if (arg == "--snapshot-keep") {
      if (!take_value(&value) || !ParseUint(value, UINT64_MAX, &opt.snapshot_keep)) {
        return BadArgs("--snapshot-keep needs a number >= 0 (0 keeps every snapshot)");
      }
    } else if (arg == "--tls") {
      tls = true;
    } else if (arg == "--tls-cert" || arg == "--tls-key" || arg == "--tls-fingerprint-file") {
      std::string* out = arg == "--tls-cert"  ? &tls_cert_file
                         : arg == "--tls-key" ? &tls_key_file
                                              : &tls_fingerprint_file;
      if (!take_value(out) || out->empty()) return BadArgs(arg + " needs a path");
      tls = true;
    } else if (arg == "--resume-from") {
      if (!take_value(&opt.resume_from) || opt.resume_from.empty()) {
        return BadArgs("--resume-from needs a snapshot file or directory");
      }
    } else {
      return BadArgs("unknown argument '" + std::string(argv[i]) + "'");
    }
  }
  if (secret_file.empty()) return BadArgs("--secret-file is required");
  if (tls_cert_file.empty() != tls_key_file.empty()) {
    return BadArgs("--tls-cert and --tls-key go together (or give neither for a new identity)");
  }
  if ((opt.snapshot_every_s > 0 || opt.snapshot_every_versions > 0) && opt.snapshot_dir.empty()) {
    return BadArgs("--snapshot-every-s and --snapshot-every-versions need --snapshot-dir");
  }

  if (!ReadFile(secret_file, &opt.secret)) {
    return BadArgs("cannot read the secret file '" + secret_file + "': " + std::strerror(errno),
                   false);
  }
  if (!opt.secret.empty() && opt.secret.back() == '\n') opt.secret.pop_back();
  if (!opt.secret.empty() && opt.secret.back() == '\r') opt.secret.pop_back();
  if (opt.secret.size() < 16) {
    return BadArgs("the secret in '" + secret_file + "' has " + std::to_string(opt.secret.size()) +
                       " bytes; at least 16 are required",
                   false);
  }

  std::string fingerprint;
  if (!tls_cert_file.empty()) {
    for (auto [path, out] : {std::pair{&tls_cert_file, &opt.tls_cert_pem},
                             std::pair{&tls_key_file, &opt.tls_key_pem}}) {
      if (!ReadFile(*path, out)) {
        return BadArgs("cannot read '" + *path + "': " + std::strerror(errno), false);
      }
    }
    if (auto st = tensorspark::TlsFingerprint(opt.tls_cert_pem, &fingerprint); !st.ok()) {
      return BadArgs("--tls-cert '" + tls_cert_file + "': " + st.message(), false);
    }
  } else if (tls) {
    tensorspark::TlsIdentity id;
    if (auto st = tensorspark::MakeTlsIdentity(&id); !st.ok()) {
      std::fprintf(stderr, "tensorspark-ps: cannot start: %s\n", st.ToString().c_str());
      return 1;
    }
    opt.tls_cert_pem = std::move(id.cert_pem);
    opt.tls_key_pem = std::move(id.key_pem);
    fingerprint = id.fingerprint;
  }

  // Signals are taken synchronously by this thread (sigtimedwait); block
  // them before any server thread starts so those inherit the mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);  // sends use MSG_NOSIGNAL; this is belt and braces
#if defined(__GLIBC__)
  // One malloc arena, not glibc's 8 per core: each connection thread would
  // otherwise get an arena of its own, whose freed pages stay resident and
  // fragmented. bench/soak.py, 60 s, idle RSS: 94 MB with glibc's default,
  // 12 to 16 MB with one arena per core plus trimming when idle, 12.2 MB
  // with one arena, at the same request rate (about 6,300/s). The hot path
  // does not allocate per byte, so the shared arena costs no throughput.
  // MALLOC_ARENA_MAX in the environment still wins.
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, 1);
#endif

  std::unique_ptr<tensorspark::Server> server;
  tensorspark::Status s = tensorspark::Server::Start(opt, &server);
  if (!s.ok()) {
    std::fprintf(stderr, "tensorspark-ps: cannot start: %s\n", s.ToString().c_str());
    return s.code() == tensorspark::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::fprintf(stderr, "tensorspark-ps listening on %s:%u\n", opt.bind_address.c_str(),
               static_cast<unsigned>(server->port()));
  if (!opt.unix_path.empty()) {
    std::fprintf(stderr, "tensorspark-ps listening on unix:%s\n", opt.unix_path.c_str());
  }
  if (tls) {
    std::fprintf(stderr, "tensorspark-ps TLS certificate fingerprint %s\n", fingerprint.c_str());
    if (!tls_fingerprint_file.empty()) {
      std::ofstream f(tls_fingerprint_file, std::ios::trunc);
      f << fingerprint << "\n";
      if (!f.flush()) {
        std::fprintf(stderr, "tensorspark-ps: cannot write '%s': %s\n",
                     tls_fingerprint_file.c_str(), std::strerror(errno));
        return 1;
      }
    }
  }
  if (server->metrics_port() >= 0) {
    std::fprintf(stderr, "tensorspark-ps metrics at http://%s:%d/metrics\n",
                 opt.bind_address.c_str(), server->metrics_port());
  }
  if (!opt.snapshot_dir.empty()) {
    std::fprintf(stderr,
                 "tensorspark-ps snapshots in %s (every %g s, every %llu versions, keep %llu)\n",
                 opt.snapshot_dir.c_str(), opt.snapshot_every_s,
                 static_cast<unsigned long long>(opt.snapshot_every_versions),
                 static_cast<unsigned long long>(opt.snapshot_keep));
  }
  std::fflush(stderr);

  const char* reason = nullptr;
  while (reason == nullptr) {
    if (server->WaitUntilStopped(0)) {
      reason = "a client's shutdown request";
      break;
    }
    timespec wait = {0, 200 * 1000 * 1000};
    int sig = sigtimedwait(&stop_signals, nullptr, &wait);
    if (sig == SIGINT) reason = "SIGINT";
    if (sig == SIGTERM) reason = "SIGTERM";
  }
  std::fprintf(stderr, "tensorspark-ps stopping (%s)\n", reason);
  server->Stop();
  return 0;
}
