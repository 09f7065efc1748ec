// ShardedClient: one Client per server; calls split by the placement rule and
// run on all servers in parallel (one thread per extra server per call).
#include "tensorspark/sharded_client.h"

#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <thread>
#include <utility>

#include "protocol/crc32c.h"

namespace tensorspark {
namespace {

// Longest variable name the protocol carries (docs/protocol.md).
constexpr size_t kMaxNameLen = 1024;

int64_t NumElements(std::span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// One contiguous piece of a caller's tensor, as stored on one server.
struct Piece {
  size_t tensor = 0;    // index into the caller's span
  std::string name;     // name on the server
  uint64_t offset = 0;  // first element within the tensor
  uint64_t count = 0;   // elements
  bool whole = false;   // single-chunk variable: keeps its own shape
};

// Views of one server's pieces: a single-chunk variable keeps its shape, a
// chunk is 1-D (its length stored in `shapes`, which must outlive the views).
std::vector<TensorView> PieceViews(const std::vector<Piece>& pieces,
                                   std::span<const TensorView> tensors,
                                   std::vector<int64_t>* shapes) {
  shapes->resize(pieces.size());
  std::vector<TensorView> views;
  views.reserve(pieces.size());
  for (size_t j = 0; j < pieces.size(); ++j) {
    const Piece& p = pieces[j];
    const TensorView& t = tensors[p.tensor];
    (*shapes)[j] = static_cast<int64_t>(p.count);
    std::span<const int64_t> shape = p.whole ? t.shape : std::span<const int64_t>(&(*shapes)[j], 1);
    views.push_back({p.name, shape, t.data.subspan(p.offset, p.count)});
  }
  return views;
}

}  // namespace

struct ShardedClient::Impl {
  std::vector<Endpoint> endpoints;
  std::vector<std::unique_ptr<Client>> clients;
  std::vector<uint64_t> versions;  // last version seen from each server
  uint64_t chunk_elems = 1;

  uint64_t VersionSum() const {
    return std::accumulate(versions.begin(), versions.end(), uint64_t{0});
  }

  // Cuts tensor `i` (name, element count) into pieces and files each under
  // its server.
  Status Plan(size_t i, std::string_view name, uint64_t numel,
              std::vector<std::vector<Piece>>* by_server) const {
    const uint64_t chunks = numel == 0 ? 1 : (numel + chunk_elems - 1) / chunk_elems;
    for (uint64_t k = 0; k < chunks; ++k) {
      Piece p;
      p.tensor = i;
      p.name = ChunkName(name, k, chunks);
      if (p.name.size() > kMaxNameLen) {
        return Status(StatusCode::kInvalidArgument,
                      "variable name '" + std::string(name.substr(0, 64)) +
                          "...' is too long to shard; use names under 1000 bytes");
      }
      p.offset = k * chunk_elems;
      p.count = std::min(chunk_elems, numel - std::min(numel, p.offset));
      p.whole = chunks == 1;
      (*by_server)[ServerFor(name, k, clients.size())].push_back(std::move(p));
    }
    return Status::OK();
  }

  std::vector<bool> All() const { return std::vector<bool>(clients.size(), true); }

  std::string ServerName(size_t s) const {
    return "server " + endpoints[s].host + ":" + std::to_string(endpoints[s].port);
  }

  // Runs fn(server) for every server with work, in parallel; returns the
  // first failure, naming its server. A kFenced wins over other failures:
  // it tells the caller to stop, where the others might be retried.
  Status ForEach(const std::vector<bool>& busy, const std::function<Status(size_t)>& fn) {
    std::vector<Status> results(clients.size());
    std::vector<std::thread> threads;
    size_t inline_server = clients.size();
    for (size_t s = 0; s < clients.size(); ++s) {
      if (!busy[s]) continue;
      if (inline_server == clients.size()) {
        inline_server = s;  // the calling thread takes one server itself
        continue;
      }
      threads.emplace_back([&, s] { results[s] = fn(s); });
    }
    if (inline_server < clients.size()) results[inline_server] = fn(inline_server);
    for (auto& t : threads) t.join();
    for (size_t s = 0; s < clients.size(); ++s) {
      if (results[s].code() == StatusCode::kFenced) return results[s].WithContext(ServerName(s));
    }
    for (size_t s = 0; s < clients.size(); ++s) {
      if (!results[s].ok()) return results[s].WithContext(ServerName(s));
    }
    return Status::OK();
  }

  // Files the names under which the servers store variable `name` (itself,
  // or its chunks "name#k/K") into (*stored)[server]. K is read from chunk
  // 0's stored name, so it does not depend on this client's chunk_bytes.
  Status ChunksOf(std::string_view name, const std::vector<std::vector<VariableInfo>>& listed,
                  std::vector<std::vector<std::string>>* stored) const {
    const size_t first = ServerFor(name, 0, clients.size());
    const std::string prefix = std::string(name) + "#0/";
    for (const VariableInfo& info : listed[first]) {
      if (info.name == name) {
        (*stored)[first].emplace_back(name);
        return Status::OK();
      }
      if (!info.name.starts_with(prefix)) continue;
      const std::string_view count = std::string_view(info.name).substr(prefix.size());
      uint64_t chunks = 0;
      bool digits = !count.empty() && count.size() <= 19;
      for (char ch : count) {
        digits = digits && ch >= '0' && ch <= '9';
        if (digits) chunks = chunks * 10 + static_cast<uint64_t>(ch - '0');
      }
      if (!digits || chunks < 2) continue;
      for (uint64_t k = 0; k < chunks; ++k) {
        (*stored)[ServerFor(name, k, clients.size())].push_back(ChunkName(name, k, chunks));
      }
      return Status::OK();
    }
    return Status(StatusCode::kNotFound, "no variable named '" + std::string(name) + "' (" +
                                             ServerName(first) +
                                             " holds neither it nor its first chunk)");
  }

  static std::vector<bool> Busy(const std::vector<std::vector<Piece>>& by_server) {
    std::vector<bool> busy(by_server.size());
    for (size_t s = 0; s < by_server.size(); ++s) busy[s] = !by_server[s].empty();
    return busy;
  }
};

ShardedClient::ShardedClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ShardedClient::~ShardedClient() { Close(); }

size_t ShardedClient::ServerFor(std::string_view name, uint64_t chunk, size_t num_servers) {
  if (num_servers == 0) return 0;
  const uint64_t h = protocol::Crc32c(name.data(), name.size());
  return static_cast<size_t>((h + chunk) % num_servers);
}

uint64_t ShardedClient::ChunkElements(uint64_t chunk_bytes) {
  return std::max<uint64_t>(1, chunk_bytes / sizeof(float));
}

std::string ShardedClient::ChunkName(std::string_view name, uint64_t k, uint64_t num_chunks) {
  if (num_chunks <= 1) return std::string(name);
  return std::string(name) + "#" + std::to_string(k) + "/" + std::to_string(num_chunks);
}

size_t ShardedClient::num_servers() const { return impl_->clients.size(); }

Status ShardedClient::Connect(const ClientOptions& base, std::span<const Endpoint> servers,
                              std::unique_ptr<ShardedClient>* out, uint64_t chunk_bytes) {
  if (servers.empty()) {
    return Status(StatusCode::kInvalidArgument, "ShardedClient needs at least one server");
  }
  auto impl = std::make_unique<Impl>();
  impl->endpoints.assign(servers.begin(), servers.end());
  impl->clients.resize(servers.size());
  impl->versions.assign(servers.size(), 0);
  impl->chunk_elems = ChunkElements(chunk_bytes);
  Status s = impl->ForEach(impl->All(), [&](size_t i) {
    ClientOptions opt = base;
    opt.host = servers[i].host;
    opt.port = servers[i].port;
    return Client::Connect(opt, &impl->clients[i]);
  });
  if (!s.ok()) return s;
  out->reset(new ShardedClient(std::move(impl)));
  return Status::OK();
}

Status ShardedClient::Register(std::span<const VariableSpec> vars, std::vector<bool>* created,
                               uint64_t* version) {
  Impl& m = *impl_;
  std::vector<std::vector<Piece>> by_server(m.clients.size());
  for (size_t i = 0; i < vars.size(); ++i) {
    const int64_t numel = NumElements(vars[i].shape);
    if (numel < 0 || static_cast<uint64_t>(numel) != vars[i].initial.size()) {
      return Status(StatusCode::kInvalidArgument,
                    "register: variable '" + std::string(vars[i].name) + "' has " +
                        std::to_string(vars[i].initial.size()) +
                        " initial values but its shape holds " + std::to_string(numel));
    }
    TS_RETURN_IF_ERROR(m.Plan(i, vars[i].name, static_cast<uint64_t>(numel), &by_server));
  }
  std::vector<TensorView> tensors;
  tensors.reserve(vars.size());
  for (const VariableSpec& v : vars) tensors.push_back({v.name, v.shape, v.initial});
  std::vector<std::vector<bool>> server_created(m.clients.size());
  std::vector<std::vector<int64_t>> chunk_shapes(m.clients.size());
  Status s = m.ForEach(Impl::Busy(by_server), [&](size_t srv) {
    std::vector<VariableSpec> specs;
    for (const TensorView& t : PieceViews(by_server[srv], tensors, &chunk_shapes[srv])) {
      specs.push_back({t.name, t.shape, t.data});
    }
    return m.clients[srv]->Register(specs, &server_created[srv], &m.versions[srv]);
  });
  if (!s.ok()) return s;
  if (created != nullptr) {
    created->assign(vars.size(), false);
    for (size_t srv = 0; srv < by_server.size(); ++srv) {
      for (size_t j = 0; j < by_server[srv].size(); ++j) {
        const Piece& p = by_server[srv][j];
        if (p.offset == 0 && server_created[srv][j]) (*created)[p.tensor] = true;
      }
    }
  }
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::Pull(std::span<const MutableTensorView> out, uint64_t* version) {
  Impl& m = *impl_;
  std::vector<std::vector<Piece>> by_server(m.clients.size());
  for (size_t i = 0; i < out.size(); ++i) {
    TS_RETURN_IF_ERROR(m.Plan(i, out[i].name, out[i].data.size(), &by_server));
  }
  Status s = m.ForEach(Impl::Busy(by_server), [&](size_t srv) {
    std::vector<MutableTensorView> views;
    views.reserve(by_server[srv].size());
    for (const Piece& p : by_server[srv]) {
      views.push_back({p.name, out[p.tensor].data.subspan(p.offset, p.count)});
    }
    return m.clients[srv]->Pull(views, &m.versions[srv]);
  });
  if (!s.ok()) return s;
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::Push(UpdateKind kind, std::span<const TensorView> tensors,
                           const PushOptions& options, uint64_t* version) {
  Impl& m = *impl_;
  std::vector<std::vector<Piece>> by_server(m.clients.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TS_RETURN_IF_ERROR(m.Plan(i, tensors[i].name, tensors[i].data.size(), &by_server));
  }
  std::vector<std::vector<int64_t>> chunk_shapes(m.clients.size());
  Status s = m.ForEach(Impl::Busy(by_server), [&](size_t srv) {
    std::vector<TensorView> views = PieceViews(by_server[srv], tensors, &chunk_shapes[srv]);
    return m.clients[srv]->Push(kind, views, options, &m.versions[srv]);
  });
  if (!s.ok()) return s;
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::SetOptimizer(const OptimizerConfig& config,
                                   std::span<const std::string_view> names, uint64_t* version) {
  Impl& m = *impl_;
  std::vector<std::vector<std::string>> stored(m.clients.size());
  std::vector<bool> busy = m.All();  // no names: every variable of every server
  if (!names.empty()) {
    std::vector<std::vector<VariableInfo>> listed(m.clients.size());
    TS_RETURN_IF_ERROR(m.ForEach(m.All(), [&](size_t srv) {
      return m.clients[srv]->ListVariables(&listed[srv], &m.versions[srv]);
    }));
    for (std::string_view name : names) {
      TS_RETURN_IF_ERROR(m.ChunksOf(name, listed, &stored).WithContext("set_optimizer"));
    }
    for (size_t srv = 0; srv < stored.size(); ++srv) busy[srv] = !stored[srv].empty();
  }
  TS_RETURN_IF_ERROR(m.ForEach(busy, [&](size_t srv) {
    std::vector<std::string_view> views(stored[srv].begin(), stored[srv].end());
    return m.clients[srv]->SetOptimizer(config, views, &m.versions[srv]);
  }));
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::Join(uint64_t* clock) {
  Impl& m = *impl_;
  std::vector<uint64_t> clocks(m.clients.size(), 0);
  std::vector<char> joined(m.clients.size(), 0);  // not vector<bool>: written concurrently
  Status s = m.ForEach(m.All(), [&](size_t srv) {
    Status j = m.clients[srv]->Join(&clocks[srv]);
    joined[srv] = j.ok();
    return j;
  });
  if (!s.ok()) {
    // A half-joined worker would hold up the sync rounds of the servers it
    // joined until its connection closes; its Join failed, so leave them.
    (void)m.ForEach(std::vector<bool>(joined.begin(), joined.end()),
                    [&](size_t srv) { return m.clients[srv]->Leave(); });
    return s;
  }
  if (clock != nullptr) *clock = *std::max_element(clocks.begin(), clocks.end());
  return Status::OK();
}

Status ShardedClient::Leave() {
  Impl& m = *impl_;
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Leave(); });
}

Status ShardedClient::Heartbeat() {
  Impl& m = *impl_;
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Heartbeat(); });
}

void ShardedClient::ReportProgress(uint64_t steps, uint64_t samples, double loss) {
  // Each Client's ReportProgress is thread-safe and `clients` never changes
  // after Connect, so this is too.
  for (auto& c : impl_->clients) c->ReportProgress(steps, samples, loss);
}

Status ShardedClient::Report(std::string_view text) {
  return impl_->clients[0]->Report(text).WithContext(impl_->ServerName(0));
}

void ShardedClient::SetDumpFile(std::string path) {
  impl_->clients[0]->SetDumpFile(std::move(path));
}

Status ShardedClient::Configure(const RunConfig& config) {
  Impl& m = *impl_;
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Configure(config); });
}

Status ShardedClient::Reports(std::vector<WorkerReport>* out) {
  Impl& m = *impl_;
  std::vector<std::vector<WorkerReport>> per_server(m.clients.size());
  TS_RETURN_IF_ERROR(
      m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Reports(&per_server[srv]); }));
  std::map<std::pair<int32_t, int32_t>, WorkerReport> merged;  // partition order
  for (std::vector<WorkerReport>& reports : per_server) {
    for (WorkerReport& r : reports) {
      auto [it, fresh] = merged.try_emplace({r.partition, r.attempt}, r);
      if (fresh) continue;
      WorkerReport& w = it->second;
      w.clock = std::max(w.clock, r.clock);
      w.steps = std::max(w.steps, r.steps);
      w.progress_age_ms = std::max(w.progress_age_ms, r.progress_age_ms);
      if (r.report_age_ms < w.report_age_ms) {
        w.report_age_ms = r.report_age_ms;
        w.text = std::move(r.text);
      }
    }
  }
  out->clear();
  out->reserve(merged.size());
  for (auto& [key, w] : merged) out->push_back(std::move(w));
  return Status::OK();
}

Status ShardedClient::Stats(std::vector<std::vector<StatEntry>>* out) {
  Impl& m = *impl_;
  out->assign(m.clients.size(), {});
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Stats(&(*out)[srv]); });
}

Status ShardedClient::Snapshot(uint64_t tag, std::vector<std::string>* names, uint64_t* version) {
  Impl& m = *impl_;
  std::vector<std::string> written(m.clients.size());
  TS_RETURN_IF_ERROR(m.ForEach(m.All(), [&](size_t srv) {
    return m.clients[srv]->Snapshot(tag, &written[srv], &m.versions[srv]);
  }));
  if (names != nullptr) *names = std::move(written);
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::Snapshots(std::vector<std::vector<SnapshotInfo>>* out) {
  Impl& m = *impl_;
  out->assign(m.clients.size(), {});
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->Snapshots(&(*out)[srv]); });
}

Status ShardedClient::NewestCommonTag(uint64_t* tag, bool* found) {
  std::vector<std::vector<SnapshotInfo>> listed;
  TS_RETURN_IF_ERROR(Snapshots(&listed));
  // Tags of the first server, narrowed to those every other one has too.
  std::set<uint64_t> common;
  for (const SnapshotInfo& f : listed[0]) {
    if (f.tag != 0) common.insert(f.tag);
  }
  for (size_t srv = 1; srv < listed.size(); ++srv) {
    std::set<uint64_t> here;
    for (const SnapshotInfo& f : listed[srv]) {
      if (common.count(f.tag) != 0) here.insert(f.tag);
    }
    common.swap(here);
  }
  *found = !common.empty();
  *tag = common.empty() ? 0 : *common.rbegin();
  return Status::OK();
}

Status ShardedClient::Restore(uint64_t tag, uint64_t* version) {
  Impl& m = *impl_;
  // Every server must list the tag before any is changed: a restore that
  // only some servers could do would leave the model inconsistent.
  std::vector<std::vector<SnapshotInfo>> listed;
  TS_RETURN_IF_ERROR(Snapshots(&listed));
  std::string lacking;
  for (size_t srv = 0; srv < listed.size(); ++srv) {
    const bool has = std::any_of(listed[srv].begin(), listed[srv].end(),
                                 [tag](const SnapshotInfo& f) { return f.tag == tag; });
    if (!has) lacking += (lacking.empty() ? "" : ", ") + m.ServerName(srv);
  }
  if (!lacking.empty()) {
    return Status(StatusCode::kNotFound, "restore: no valid snapshot with tag " +
                                             std::to_string(tag) + " on " + lacking +
                                             "; no server was changed (see NewestCommonTag)");
  }
  TS_RETURN_IF_ERROR(m.ForEach(
      m.All(), [&](size_t srv) { return m.clients[srv]->Restore(tag, &m.versions[srv]); }));
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::ShutdownServers() {
  Impl& m = *impl_;
  return m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->ShutdownServer(); });
}

void ShardedClient::Close() {
  if (!impl_) return;
  for (auto& c : impl_->clients) {
    if (c) c->Close();
  }
}

bool ShardedClient::connected() const {
  return std::all_of(impl_->clients.begin(), impl_->clients.end(),
                     [](const std::unique_ptr<Client>& c) { return c && c->connected(); });
}

}  // namespace tensorspark

// ---- sparse tables ------------------------------------------------------------------

namespace tensorspark {
namespace {

// Server cursor bits of a sharded export cursor (the server's own cursor,
// stripe << 32 | position, stays far below 2^48).
constexpr uint32_t kExportServerShift = 48;

// One table's ids split by server: ids[s] and, for each, its index in the
// caller's list.
struct Split {
  std::vector<std::vector<int64_t>> ids;
  std::vector<std::vector<uint32_t>> where;
};

Split SplitIds(std::span<const int64_t> ids, size_t servers) {
  Split sp;
  sp.ids.resize(servers);
  sp.where.resize(servers);
  const auto n = static_cast<uint32_t>(servers);
  for (size_t j = 0; j < ids.size(); ++j) {
    const uint32_t s = ServerOfId(ids[j], n);
    sp.ids[s].push_back(ids[j]);
    sp.where[s].push_back(static_cast<uint32_t>(j));
  }
  return sp;
}

}  // namespace

Status ShardedClient::CreateTables(std::span<const TableConfig> tables,
                                   std::vector<bool>* created) {
  Impl& m = *impl_;
  std::vector<std::vector<bool>> per(m.clients.size());
  TS_RETURN_IF_ERROR(m.ForEach(
      m.All(), [&](size_t srv) { return m.clients[srv]->CreateTables(tables, &per[srv]); }));
  if (created != nullptr) {
    created->assign(tables.size(), false);
    for (const auto& flags : per) {
      for (size_t i = 0; i < flags.size() && i < tables.size(); ++i) {
        if (flags[i]) (*created)[i] = true;
      }
    }
  }
  return Status::OK();
}

Status ShardedClient::PullRows(std::span<const RowsRequest> req, uint64_t* version) {
  Impl& m = *impl_;
  const size_t servers = m.clients.size();
  std::vector<Split> splits(req.size());
  std::vector<uint32_t> dims(req.size(), 0);
  // Per server and table: rows received, scattered into the caller's order.
  std::vector<std::vector<std::vector<float>>> got(servers,
                                                   std::vector<std::vector<float>>(req.size()));
  std::vector<bool> busy(servers, false);
  for (size_t i = 0; i < req.size(); ++i) {
    const RowsRequest& r = req[i];
    if (r.ids.empty()) continue;
    if (r.out.size() % r.ids.size() != 0) {
      return Status(StatusCode::kShapeMismatch,
                    "table '" + std::string(r.table) + "': the buffer for " +
                        std::to_string(r.ids.size()) + " ids holds " +
                        std::to_string(r.out.size()) + " floats, not a multiple of the id count");
    }
    dims[i] = static_cast<uint32_t>(r.out.size() / r.ids.size());
    splits[i] = SplitIds(r.ids, servers);
    for (size_t s = 0; s < servers; ++s) {
      if (splits[i].ids[s].empty()) continue;
      busy[s] = true;
      got[s][i].resize(splits[i].ids[s].size() * dims[i]);
    }
  }
  TS_RETURN_IF_ERROR(m.ForEach(busy, [&](size_t srv) {
    std::vector<RowsRequest> part;
    for (size_t i = 0; i < req.size(); ++i) {
      if (req[i].ids.empty() || splits[i].ids[srv].empty()) continue;
      part.push_back({req[i].table, splits[i].ids[srv], got[srv][i]});
    }
    uint64_t v = 0;
    Status st = m.clients[srv]->PullRows(part, &v);
    if (st.ok()) m.versions[srv] = v;
    return st;
  }));
  for (size_t i = 0; i < req.size(); ++i) {
    const uint32_t dim = dims[i];
    for (size_t s = 0; s < servers && !req[i].ids.empty(); ++s) {
      const std::vector<uint32_t>& where = splits[i].where[s];
      for (size_t k = 0; k < where.size(); ++k) {
        std::copy_n(got[s][i].data() + k * dim, dim, req[i].out.data() + size_t{where[k]} * dim);
      }
    }
  }
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::PushRows(UpdateKind kind, float learning_rate,
                               std::span<const RowsUpdate> req, uint64_t* version) {
  Impl& m = *impl_;
  const size_t servers = m.clients.size();
  std::vector<Split> splits(req.size());
  std::vector<std::vector<std::vector<float>>> vals(servers,
                                                    std::vector<std::vector<float>>(req.size()));
  std::vector<bool> busy(servers, false);
  for (size_t i = 0; i < req.size(); ++i) {
    const RowsUpdate& u = req[i];
    if (u.dim == 0 || u.values.size() != u.ids.size() * u.dim) {
      return Status(StatusCode::kShapeMismatch,
                    "table '" + std::string(u.table) + "': " + std::to_string(u.ids.size()) +
                        " ids of dim " + std::to_string(u.dim) + " need " +
                        std::to_string(u.ids.size() * u.dim) + " values, got " +
                        std::to_string(u.values.size()));
    }
    splits[i] = SplitIds(u.ids, servers);
    for (size_t s = 0; s < servers; ++s) {
      const std::vector<uint32_t>& where = splits[i].where[s];
      if (where.empty()) continue;
      busy[s] = true;
      std::vector<float>& v = vals[s][i];
      v.resize(where.size() * u.dim);
      for (size_t k = 0; k < where.size(); ++k) {
        std::copy_n(u.values.data() + size_t{where[k]} * u.dim, u.dim, v.data() + k * u.dim);
      }
    }
  }
  TS_RETURN_IF_ERROR(m.ForEach(busy, [&](size_t srv) {
    std::vector<RowsUpdate> part;
    for (size_t i = 0; i < req.size(); ++i) {
      if (splits[i].ids[srv].empty()) continue;
      part.push_back({req[i].table, req[i].dim, splits[i].ids[srv], vals[srv][i]});
    }
    uint64_t v = 0;
    Status st = m.clients[srv]->PushRows(kind, learning_rate, part, &v);
    if (st.ok()) m.versions[srv] = v;
    return st;
  }));
  if (version != nullptr) *version = m.VersionSum();
  return Status::OK();
}

Status ShardedClient::ExportRows(std::string_view table, uint64_t cursor, uint32_t max_rows,
                                 std::vector<int64_t>* ids, std::vector<float>* values,
                                 uint32_t* dim, uint64_t* next_cursor) {
  Impl& m = *impl_;
  if (cursor == UINT64_MAX) {
    return Status(StatusCode::kInvalidArgument, "export_rows: the cursor says the export is done");
  }
  size_t srv = static_cast<size_t>(cursor >> kExportServerShift);
  uint64_t local = cursor & ((uint64_t{1} << kExportServerShift) - 1);
  if (srv >= m.clients.size()) {
    return Status(StatusCode::kInvalidArgument, "export_rows: cursor " + std::to_string(cursor) +
                                                    " names server " + std::to_string(srv) +
                                                    " of " + std::to_string(m.clients.size()));
  }
  uint64_t next = 0;
  Status s = m.clients[srv]->ExportRows(table, local, max_rows, ids, values, dim, &next);
  if (!s.ok()) return s.WithContext(m.ServerName(srv));
  if (next != UINT64_MAX) {
    if (next >> kExportServerShift != 0) {
      return Status(StatusCode::kProtocolError, "export cursor of " + m.ServerName(srv) +
                                                    " is out of range: " + std::to_string(next));
    }
    *next_cursor = uint64_t{srv} << kExportServerShift | next;
  } else {
    *next_cursor =
        srv + 1 < m.clients.size() ? uint64_t{srv + 1} << kExportServerShift : UINT64_MAX;
  }
  return Status::OK();
}

Status ShardedClient::ListTables(std::vector<TableInfo>* out) {
  Impl& m = *impl_;
  std::vector<std::vector<TableInfo>> per(m.clients.size());
  TS_RETURN_IF_ERROR(
      m.ForEach(m.All(), [&](size_t srv) { return m.clients[srv]->ListTables(&per[srv]); }));
  out->clear();
  std::map<std::string, size_t> index;
  for (const auto& tables : per) {
    for (const TableInfo& t : tables) {
      auto [it, fresh] = index.emplace(t.config.name, out->size());
      if (fresh) {
        out->push_back(t);
      } else {
        (*out)[it->second].rows += t.rows;
      }
    }
  }
  return Status::OK();
}

}  // namespace tensorspark
