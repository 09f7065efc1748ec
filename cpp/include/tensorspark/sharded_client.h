// A client of a model spread over several parameter servers.
//
// Each variable is cut into chunks of about `chunk_bytes` (4 MB by default)
// and chunk k of variable `name` lives on server ServerFor(name, k, S). The
// rule is deterministic, so every worker of a run, and a later run, finds the
// same chunk on the same server without asking anyone. A call sends one
// request to each server that holds a part of it, all in parallel, straight
// from (or into) the caller's buffers.
//
// Like Client, a ShardedClient is not thread-safe: one per thread.
//
//   std::vector<tensorspark::Endpoint> servers = {{"10.0.0.5", 10080}, {"10.0.0.6", 10080}};
//   std::unique_ptr<tensorspark::ShardedClient> c;
//   TS_RETURN_IF_ERROR(tensorspark::ShardedClient::Connect(opt, servers, &c));
//   TS_RETURN_IF_ERROR(c->Pull(views, &version));
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorspark/client.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace tensorspark {

struct Endpoint {
  std::string host;
  uint16_t port = 0;
};

class ShardedClient {
 public:
  static constexpr uint64_t kDefaultChunkBytes = uint64_t{4} << 20;

  // Connects to every server in parallel (host and port of `base` are
  // ignored; the rest of it applies to each connection).
  static Status Connect(const ClientOptions& base, std::span<const Endpoint> servers,
                        std::unique_ptr<ShardedClient>* out,
                        uint64_t chunk_bytes = kDefaultChunkBytes);

  ~ShardedClient();
  ShardedClient(const ShardedClient&) = delete;
  ShardedClient& operator=(const ShardedClient&) = delete;

  // The placement rule: (CRC-32C(name) + chunk) mod num_servers.
  static size_t ServerFor(std::string_view name, uint64_t chunk, size_t num_servers);
  // Elements per chunk for a chunk size in bytes (float32).
  static uint64_t ChunkElements(uint64_t chunk_bytes);
  // Name under which a server stores chunk `k` of `num_chunks` of `name`:
  // the name itself when the variable is a single chunk, else "name#k/num".
  static std::string ChunkName(std::string_view name, uint64_t k, uint64_t num_chunks);

  size_t num_servers() const;

  // As Client::Register; `created[i]` is true when the variable's first chunk
  // was created by this call. Each server registers its chunks atomically.
  Status Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                  uint64_t* version);

  // As Client::Pull: each server writes its chunks straight into the views.
  Status Pull(std::span<const MutableTensorView> out, uint64_t* version);

  // As Client::Push. Each server checks and applies its own chunks
  // atomically; a push rejected by one server may have been applied by
  // another (reported through the returned Status).
  Status Push(UpdateKind kind, std::span<const TensorView> tensors, const PushOptions& options,
              uint64_t* version);

  // Counters of each server, in the order of `servers`.
  Status Stats(std::vector<std::vector<StatEntry>>* out);

  // Asks every server to stop.
  Status ShutdownServers();

  void Close();

  // `version` outputs of the calls above are the sum of the servers' model
  // versions, which grows by the number of servers a push touched.

 private:
  struct Impl;
  explicit ShardedClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorspark
