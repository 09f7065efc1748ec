// Thin POSIX TCP layer: an RAII socket and blocking-style I/O with
// deadlines built on non-blocking fds + poll(). Never throws, never raises
// SIGPIPE (MSG_NOSIGNAL). Errors are kConnectionError or kTimeout.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "tensorspark/status.h"

namespace tensorspark::net {

using Clock = std::chrono::steady_clock;

// An absolute point in time after which I/O gives up; Never() waits forever.
class Deadline {
 public:
  static Deadline Never() { return Deadline(Clock::time_point::max()); }
  static Deadline In(double seconds);
  static Deadline At(Clock::time_point t) { return Deadline(t); }

  bool never() const { return at_ == Clock::time_point::max(); }
  bool Expired() const { return !never() && Clock::now() >= at_; }
  // Milliseconds left for poll(): -1 for never, rounded up, >= 0.
  int PollTimeoutMs() const;
  double SecondsLeft() const;
  Clock::time_point at() const { return at_; }

 private:
  explicit Deadline(Clock::time_point at) : at_(at) {}
  Clock::time_point at_;
};

// Owns a file descriptor; closes it on destruction.
class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { Close(); }
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Close();
  // shutdown(SHUT_RDWR): wakes threads blocked on this fd; the fd stays open.
  void Shutdown();

 private:
  int fd_ = -1;
};

// Binds and listens (SO_REUSEADDR, non-blocking fd). A taken port fails with
// kAddressInUse; `bound_port` receives the actual port (useful for port 0).
[[nodiscard]] Status Listen(const std::string& bind_address, uint16_t port, Socket* out,
                            uint16_t* bound_port);

// Binds and listens on a Unix-domain socket at `path` (mode 0600,
// non-blocking fd). A socket file already there is replaced only when
// nothing answers on it (a stale one from a crashed server); a live one
// fails with kAddressInUse, any other file with kInvalidArgument, as does a
// path longer than sun_path allows.
[[nodiscard]] Status ListenUnix(const std::string& path, Socket* out);

// One connection attempt to the Unix-domain socket at `path`, until
// `deadline`. The fd is non-blocking.
[[nodiscard]] Status ConnectUnix(const std::string& path, Deadline deadline, Socket* out);

// Accepts one pending connection on a listening socket, waiting up to
// `deadline`. The new fd is non-blocking with TCP_NODELAY. kTimeout when
// nothing arrived; `peer` receives "host:port".
[[nodiscard]] Status Accept(const Socket& listener, Deadline deadline, Socket* out,
                            std::string* peer);

// One connection attempt to host:port (each resolved address in turn), until
// `deadline`. The fd is non-blocking with TCP_NODELAY.
[[nodiscard]] Status ConnectWithTimeout(const std::string& host, uint16_t port, Deadline deadline,
                                        Socket* out);

// Reads exactly n bytes. A peer that closes before the first byte sets
// *clean_eof (if given) and returns kConnectionError.
[[nodiscard]] Status ReadFull(int fd, void* buf, size_t n, Deadline deadline,
                              bool* clean_eof = nullptr);
// Reads 1..max bytes (whatever is available once readable).
[[nodiscard]] Status ReadSome(int fd, void* buf, size_t max, Deadline deadline, size_t* got);
// Waits for poll `events` on fd; OK when ready (or on error/hangup, which
// the next read/write reports), kTimeout naming `what` past the deadline.
[[nodiscard]] Status PollFor(int fd, short events, Deadline deadline, const char* what);
// Waits until the fd is readable (data, EOF or error).
[[nodiscard]] Status WaitReadable(int fd, Deadline deadline);
[[nodiscard]] Status WriteFull(int fd, const void* buf, size_t n, Deadline deadline);
// Writes every byte of the iovecs (any count; split at IOV_MAX). The array
// is modified to track progress.
[[nodiscard]] Status WriteV(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline);

}  // namespace tensorspark::net
