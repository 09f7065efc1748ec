#include "net/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

namespace tensorspark::net {
namespace {

std::string Errno(int err) { return std::strerror(err); }

Status IoError(const char* op, int err) {
  return Status(StatusCode::kConnectionError, std::string(op) + " failed: " + Errno(err));
}

Status TimedOut(const char* what) {
  return Status(StatusCode::kTimeout, std::string("timed out ") + what);
}

void SetNonBlocking(int fd) {
  int flags = fcntl(fd, F_GETFL, 0);
  if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// A Unix socket's default buffer (about 208 KB) makes a large push stall
// the sender while the receiver checksums and applies it. The kernel caps
// the request at net.core.wmem_max / rmem_max; failure is harmless.
constexpr int kUnixBufferBytes = 4 << 20;

void SetUnixBuffers(int fd) {
  int bytes = kUnixBufferBytes;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

std::string AddrToString(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  uint16_t port = 0;
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    port = ntohs(in->sin_port);
  } else if (sa->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    port = ntohs(in6->sin6_port);
    std::string out(1, '[');  // (not "[" + string: GCC 12 -Wrestrict false positive)
    out += host;
    out += "]:";
    out += std::to_string(port);
    return out;
  }
  if (sa->sa_family == AF_UNIX) return "unix-socket peer";
  return std::string(host) + ":" + std::to_string(port);
}

// Fills a sockaddr_un for `path`; kInvalidArgument when it does not fit.
Status UnixAddr(const std::string& path, sockaddr_un* addr) {
  *addr = sockaddr_un{};
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr->sun_path)) {
    return Status(StatusCode::kInvalidArgument,
                  "Unix socket path '" + path + "' is " + std::to_string(path.size()) +
                      " bytes; it must be 1.." + std::to_string(sizeof(addr->sun_path) - 1) +
                      " bytes (the kernel's sun_path limit): choose a shorter path");
  }
  std::memcpy(addr->sun_path, path.data(), path.size());
  return Status::OK();
}

}  // namespace

Status PollFor(int fd, short events, Deadline deadline, const char* what) {
  for (;;) {
    struct pollfd p = {fd, events, 0};
    int rc = poll(&p, 1, deadline.PollTimeoutMs());
    if (rc > 0) return Status::OK();
    if (rc == 0) {
      if (deadline.Expired()) return TimedOut(what);
      continue;  // woke early from rounding; wait again
    }
    if (errno == EINTR) continue;
    return IoError("poll", errno);
  }
}

Status ListenUnix(const std::string& path, Socket* out) {
  sockaddr_un addr;
  TS_RETURN_IF_ERROR(UnixAddr(path, &addr));
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status(StatusCode::kInvalidArgument,
                    "cannot listen on Unix socket '" + path +
                        "': a file that is not a socket is in the way; remove it or choose "
                        "another path");
    }
    // Only a socket nobody answers on is stale; never steal a live server's.
    Socket probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (probe.valid() &&
        ::connect(probe.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      return Status(StatusCode::kAddressInUse,
                    "cannot listen on Unix socket '" + path +
                        "': another server is serving on it; stop it or choose another path");
    }
    ::unlink(path.c_str());
  }
  Socket s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) return IoError("socket", errno);
  // 0600 from the start: on Linux bind() creates the file with the socket
  // inode's mode (minus umask), which fchmod sets beforehand. (Changing the
  // process-wide umask instead would race with other threads' files.)
  ::fchmod(s.fd(), 0600);
  if (::bind(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    const int err = errno;
    return Status(err == EADDRINUSE                                  ? StatusCode::kAddressInUse
                  : err == EACCES || err == ENOENT || err == ENOTDIR ? StatusCode::kInvalidArgument
                                                                     : StatusCode::kConnectionError,
                  "cannot bind Unix socket '" + path + "': " + Errno(err));
  }
  ::chmod(path.c_str(), 0600);
  if (::listen(s.fd(), SOMAXCONN) != 0) {
    const int lerr = errno;
    ::unlink(path.c_str());
    return IoError("listen", lerr);
  }
  SetNonBlocking(s.fd());
  *out = std::move(s);
  return Status::OK();
}

Status ConnectUnix(const std::string& path, Deadline deadline, Socket* out) {
  sockaddr_un addr;
  TS_RETURN_IF_ERROR(UnixAddr(path, &addr));
  Socket s(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!s.valid()) return IoError("socket", errno);
  SetUnixBuffers(s.fd());
  int rc;
  do {
    rc = ::connect(s.fd(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0 && errno != EINPROGRESS && errno != EAGAIN) {
    return Status(StatusCode::kConnectionError, "connect to unix:" + path + ": " + Errno(errno));
  }
  if (rc != 0) {
    TS_RETURN_IF_ERROR(PollFor(s.fd(), POLLOUT, deadline, "connecting"));
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return Status(StatusCode::kConnectionError, "connect to unix:" + path + ": " + Errno(err));
    }
  }
  *out = std::move(s);
  return Status::OK();
}

Deadline Deadline::In(double seconds) {
  if (!(seconds < 1e9)) return Never();  // also catches NaN and inf
  if (seconds < 0) seconds = 0;
  return Deadline(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(seconds)));
}

int Deadline::PollTimeoutMs() const {
  if (never()) return -1;
  auto left = at_ - Clock::now();
  if (left <= Clock::duration::zero()) return 0;
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(left).count() + 1;
  return static_cast<int>(std::min<int64_t>(ms, INT_MAX));
}

double Deadline::SecondsLeft() const {
  if (never()) return INFINITY;
  return std::chrono::duration<double>(at_ - Clock::now()).count();
}

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    Close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void Socket::Close() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void Socket::Shutdown() {
  if (fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
}

Status Listen(const std::string& bind_address, uint16_t port, Socket* out, uint16_t* bound_port) {
  const std::string where = bind_address + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(port);
  int gai = getaddrinfo(bind_address.empty() ? nullptr : bind_address.c_str(), port_str.c_str(),
                        &hints, &res);
  if (gai != 0) {
    return Status(StatusCode::kInvalidArgument,
                  "cannot resolve bind address '" + bind_address + "': " + gai_strerror(gai));
  }
  Status last(StatusCode::kConnectionError, "no usable address for " + where);
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    Socket s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
    if (!s.valid()) {
      last = IoError("socket", errno);
      continue;
    }
    int one = 1;
    setsockopt(s.fd(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(s.fd(), ai->ai_addr, ai->ai_addrlen) != 0) {
      int err = errno;
      if (err == EADDRINUSE) {
        last = Status(StatusCode::kAddressInUse,
                      "cannot listen on " + where +
                          ": address already in use (another process, perhaps an earlier "
                          "tensorspark-ps, holds this port); choose another port, or port 0 to "
                          "pick a free one");
      } else {
        last = Status(err == EACCES || err == EADDRNOTAVAIL ? StatusCode::kInvalidArgument
                                                            : StatusCode::kConnectionError,
                      "cannot bind " + where + ": " + Errno(err));
      }
      continue;
    }
    if (::listen(s.fd(), SOMAXCONN) != 0) {
      int err = errno;
      last = err == EADDRINUSE
                 ? Status(StatusCode::kAddressInUse,
                          "cannot listen on " + where +
                              ": address already in use; choose another port, or port 0 to pick "
                              "a free one")
                 : IoError("listen", err);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (getsockname(s.fd(), reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
      last = IoError("getsockname", errno);
      continue;
    }
    *bound_port = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                           : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    SetNonBlocking(s.fd());
    *out = std::move(s);
    freeaddrinfo(res);
    return Status::OK();
  }
  freeaddrinfo(res);
  return last;
}

Status Accept(const Socket& listener, Deadline deadline, Socket* out, std::string* peer) {
  for (;;) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    int fd = ::accept4(listener.fd(), reinterpret_cast<sockaddr*>(&ss), &len,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      if (ss.ss_family == AF_UNIX) {
        SetUnixBuffers(fd);
      } else {
        SetNoDelay(fd);
      }
      if (peer != nullptr) *peer = AddrToString(reinterpret_cast<sockaddr*>(&ss));
      *out = Socket(fd);
      return Status::OK();
    }
    int err = errno;
    if (err == EINTR || err == ECONNABORTED) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      // A shut-down Unix listener polls readable (POLLHUP) yet accepts
      // nothing: the deadline bounds that loop.
      if (deadline.Expired()) return TimedOut("waiting for a connection");
      TS_RETURN_IF_ERROR(PollFor(listener.fd(), POLLIN, deadline, "waiting for a connection"));
      continue;
    }
    return IoError("accept", err);
  }
}

Status ConnectWithTimeout(const std::string& host, uint16_t port, Deadline deadline, Socket* out) {
  const std::string where = host + ":" + std::to_string(port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(port);
  int gai = getaddrinfo(host.c_str(), port_str.c_str(), &hints, &res);
  if (gai != 0) {
    return Status(StatusCode::kConnectionError,
                  "cannot resolve host '" + host + "': " + gai_strerror(gai));
  }
  Status last(StatusCode::kConnectionError, "no address for " + where);
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    Socket s(
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!s.valid()) {
      last = IoError("socket", errno);
      continue;
    }
    int rc;
    do {
      rc = ::connect(s.fd(), ai->ai_addr, ai->ai_addrlen);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0 && errno != EINPROGRESS) {
      last = Status(StatusCode::kConnectionError, "connect to " + where + ": " + Errno(errno));
      continue;
    }
    if (rc != 0) {
      Status w = PollFor(s.fd(), POLLOUT, deadline, "connecting");
      if (!w.ok()) {
        last = Status(w.code(), "connect to " + where + ": " + w.message());
        if (w.code() == StatusCode::kTimeout) break;
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last = Status(StatusCode::kConnectionError, "connect to " + where + ": " + Errno(err));
        continue;
      }
    }
    SetNoDelay(s.fd());
    *out = std::move(s);
    freeaddrinfo(res);
    return Status::OK();
  }
  freeaddrinfo(res);
  return last;
}

Status WaitReadable(int fd, Deadline deadline) {
  return PollFor(fd, POLLIN, deadline, "waiting for data");
}

Status ReadSome(int fd, void* buf, size_t max, Deadline deadline, size_t* got) {
  for (;;) {
    ssize_t r = ::recv(fd, buf, max, 0);
    if (r > 0) {
      *got = static_cast<size_t>(r);
      return Status::OK();
    }
    if (r == 0) return Status(StatusCode::kConnectionError, "connection closed by peer");
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      TS_RETURN_IF_ERROR(PollFor(fd, POLLIN, deadline, "waiting for data from the peer"));
      continue;
    }
    return IoError("recv", err);
  }
}

Status ReadFull(int fd, void* buf, size_t n, Deadline deadline, bool* clean_eof) {
  auto* p = static_cast<uint8_t*>(buf);
  size_t done = 0;
  if (clean_eof != nullptr) *clean_eof = false;
  while (done < n) {
    ssize_t r = ::recv(fd, p + done, n - done, 0);
    if (r > 0) {
      done += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) {
      if (done == 0 && clean_eof != nullptr) *clean_eof = true;
      return Status(StatusCode::kConnectionError,
                    done == 0 ? "connection closed by peer"
                              : "connection closed by peer in the middle of a frame (" +
                                    std::to_string(done) + " of " + std::to_string(n) +
                                    " bytes received)");
    }
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      TS_RETURN_IF_ERROR(PollFor(fd, POLLIN, deadline, "waiting for data from the peer"));
      continue;
    }
    return IoError("recv", err);
  }
  return Status::OK();
}

Status WriteFull(int fd, const void* buf, size_t n, Deadline deadline) {
  struct iovec iov = {const_cast<void*>(buf), n};
  return WriteV(fd, &iov, 1, deadline);
}

Status WriteV(int fd, struct iovec* iov, size_t iovcnt, Deadline deadline) {
  // Skip empty leading entries so progress tracking stays simple.
  while (iovcnt > 0 && iov->iov_len == 0) {
    ++iov;
    --iovcnt;
  }
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min<size_t>(iovcnt, IOV_MAX);
    ssize_t w = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        TS_RETURN_IF_ERROR(PollFor(fd, POLLOUT, deadline, "waiting to send to the peer"));
        continue;
      }
      return IoError("send", err);
    }
    auto left = static_cast<size_t>(w);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (left > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::OK();
}

}  // namespace tensorspark::net
