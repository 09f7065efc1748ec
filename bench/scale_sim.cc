// scale_sim: many lightweight simulated workers against real, in-process
// parameter servers, to see how the PS scales with the number of workers,
// shards, the consistency mode and the model size (no TensorFlow).
//
// Every worker is a thread with its own ShardedClient (one connection per
// shard; 1 server is a ShardedClient over one endpoint) that joins the run,
// then loops steps: a fixed "compute" time (sleep_for(step_ms)) and, every
// sync_every steps, a push (kDelta, zeros, the whole model) followed by a
// pull of the whole model. Each case starts fresh servers (bind 127.0.0.1,
// port 0, random secret); a driver client configures the mode and registers
// the model. Cases: workers x shards x mode (async, sync) x model:
//   cnn         4 variables of 105,000 floats (1.68 MB)
//   dense100mb  4 variables of 6,250,000 floats (100 MB)
//   ctr         4 variables of 25,000 floats (0.4 MB) and a sparse table of
//               16-float rows: every step also pulls 512 distinct rows
//               (Zipf-like over 1M ids) and pushes their gradients, as a
//               ParameterServerEmbedding's batch does (docs/sparse.md)
//
//   scale_sim [--workers 16,64,256] [--shards 1,2,4] [--modes async,sync]
//             [--models cnn,dense100mb,ctr] [--seconds 10] [--warmup 2]
//             [--step-ms 20] [--sync-every 10] [--timeout 60]
//             [--max-client-bytes 4294967296] [--out PATH] [--quick]
//
// --quick: 16 workers, 1 and 2 shards, async and sync, cnn, 2 s (1 s warm-up).
//
// Only the measured window (after the warm-up) counts. Per case: steps/s of
// all workers against the ideal N * 1000 / step_ms (compute only), push,
// pull and push+pull latency percentiles (in sync mode the pull waits for
// the round, so push+pull is the round latency), the CPU time of the server
// threads per push and per MB moved against a single-thread memcpy, the
// process RSS and the bytes of the client buffers. Writes JSON (default
// bench/results/scale_sim.json) and prints a table. A case whose estimated
// memory (the servers keep a receive buffer per connection as large as its
// share of a push, so about N x model bytes) is over 80% of MemAvailable is
// skipped and says so. Exits 1 naming the case when a worker fails or a
// case overruns its time limit.
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_output.h"
#include "tensorspark/client.h"
#include "tensorspark/server.h"
#include "tensorspark/sharded_client.h"
#include "tensorspark/status.h"
#include "tensorspark/types.h"

namespace {

using tensorspark::bench::Check;
using tensorspark::bench::CompilerName;
using tensorspark::bench::Die;
using tensorspark::bench::FirstError;
using tensorspark::bench::JsonEscape;
using tensorspark::bench::Num;
using tensorspark::bench::ParseDouble;
using tensorspark::bench::RandomSecret;
using tensorspark::bench::UtcTimestamp;

using Clock = std::chrono::steady_clock;
using tensorspark::Status;

// ---- configuration ----------------------------------------------------------

struct Config {
  std::vector<int> workers = {16, 64, 256};
  std::vector<int> shards = {1, 2, 4};
  std::vector<std::string> modes = {"async", "sync"};
  std::vector<std::string> models = {"cnn", "dense100mb", "ctr"};
  double seconds = 10;  // measured window per case
  double warmup_s = 2;
  double step_ms = 20;  // simulated compute per step
  int sync_every = 10;  // steps between push+pull
  // Bound of every blocking wait: client I/O, member waits, the run's
  // wait_timeout_s and the server's frame deadline.
  double timeout_s = 60;
  // Pull buffers of all workers together; above it workers share a pool.
  uint64_t max_client_bytes = uint64_t{4} << 30;
  bool quick = false;
  std::string out = "bench/results/scale_sim.json";
};

constexpr char kUsage[] =
    "usage: scale_sim [--workers 16,64,256] [--shards 1,2,4] [--modes async,sync]\n"
    "                 [--models cnn,dense100mb,ctr] [--seconds 10] [--warmup 2] [--step-ms 20]\n"
    "                 [--sync-every 10] [--timeout 60] [--max-client-bytes BYTES]\n"
    "                 [--out PATH] [--quick]\n";

// Worker threads get this name prefix (and ShardedClient's per-call helper
// threads inherit it), so the server's threads can be told apart in /proc.
constexpr char kWorkerThreadPrefix[] = "sim-w";
// Share of MemAvailable a case may plan to use; over it the case is skipped.
constexpr double kMemFraction = 0.8;
constexpr size_t kMemcpyBytes = size_t{64} << 20;
constexpr int kMemcpyReps = 5;

struct Model {
  std::string name;
  std::vector<std::string> var_names;
  std::vector<int64_t> var_floats;
  int64_t floats = 0;  // all variables
  uint64_t bytes() const { return static_cast<uint64_t>(floats) * sizeof(float); }
  // A sparse table's traffic per step (0 rows: none).
  std::string table;
  uint32_t row_dim = 0;
  int rows_per_step = 0;
  int64_t id_space = 0;
};

constexpr int kIdBatches = 64;  // distinct id batches each worker cycles through

Model MakeModel(const std::string& name) {
  Model m;
  m.name = name;
  const int64_t per_var = name == "cnn" ? 105'000 : name == "ctr" ? 25'000 : 6'250'000;
  if (name == "ctr") {
    m.table = "ctr/items";
    m.row_dim = 16;
    m.rows_per_step = 512;
    m.id_space = 1'000'000;
  }
  for (int v = 0; v < 4; ++v) {
    // Placement hashes the name (ShardedClient::ServerFor): pick each name
    // so that variable v starts on server v of 4, which spreads the model
    // evenly over 2 and 4 shards (plain "cnn/v0".."cnn/v3" leave 2 of 4
    // servers empty).
    std::string var = name + "/v" + std::to_string(v);
    for (int t = 0; tensorspark::ShardedClient::ServerFor(var, 0, 4) != static_cast<size_t>(v);
         ++t) {
      var = name + "/v" + std::to_string(v) + "_" + std::to_string(t);
    }
    m.var_names.push_back(var);
    m.var_floats.push_back(per_var);
    m.floats += per_var;
  }
  return m;
}

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

Clock::duration FromSeconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// Exits the program, naming the case, if it is not disarmed in time: the
// last resort should some wait turn out not to be bounded.
class Watchdog {
 public:
  Watchdog(std::string what, double limit_s)
      : what_(std::move(what)), limit_s_(limit_s), thread_([this] { Run(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::duration<double>(limit_s_), [this] { return done_; })) {
      Die(what_ + ": still running after " + std::to_string(static_cast<int>(limit_s_)) +
          " s, giving up");
    }
  }

  const std::string what_;
  const double limit_s_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts after the fields above
};

// ---- measurement helpers ----------------------------------------------------

double ProcessCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// CPU time of a live thread, read from another thread; 0 if it is gone.
double ThreadCpuSeconds(pthread_t t) {
  clockid_t cid;
  timespec ts{};
  if (pthread_getcpuclockid(t, &cid) != 0 || clock_gettime(cid, &ts) != 0) return 0.0;
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

std::string ReadSmallFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// CPU seconds of every thread of this process except `skip_tid` (the main
// thread) and the worker threads (by name): the servers' connection,
// acceptor, update-pool and membership threads, which all inherit the main
// thread's name. Uses schedstat (ns) where the kernel has it, else
// utime+stime (clock ticks). A server thread lives through the whole
// window, so the difference of two calls is its CPU in the window.
double ServerThreadsCpuSeconds(pid_t skip_tid) {
  static const double kTick = static_cast<double>(sysconf(_SC_CLK_TCK));
  double total = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    const std::string tid = e.path().filename().string();
    if (tid == std::to_string(skip_tid)) continue;
    const std::string dir = e.path().string();
    if (ReadSmallFile(dir + "/comm").rfind(kWorkerThreadPrefix, 0) == 0) continue;
    const std::string sched = ReadSmallFile(dir + "/schedstat");
    if (!sched.empty()) {
      total += 1e-9 * std::strtod(sched.c_str(), nullptr);
      continue;
    }
    // stat: "tid (comm) state ..." with utime, stime as fields 14 and 15.
    const std::string stat = ReadSmallFile(dir + "/stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream fields(stat.substr(close + 2));
    std::string f;
    double ticks = 0;
    for (int k = 3; k <= 15 && fields >> f; ++k) {
      if (k >= 14) ticks += std::strtod(f.c_str(), nullptr);
    }
    total += ticks / kTick;
  }
  return total;
}

// A "Key:   123 kB" line of a /proc file, in bytes; -1 if missing.
int64_t ProcKb(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) {
      return std::strtoll(line.c_str() + key.size() + 1, nullptr, 10) * 1024;
    }
  }
  return -1;
}

// GB/s of one thread copying a 64 MB buffer (best of a few, pages touched).
double MemcpyGbps() {
  std::vector<char> src(kMemcpyBytes, 1), dst(kMemcpyBytes, 0);
  double best = 1e30;
  for (int r = 0; r < kMemcpyReps; ++r) {
    src[static_cast<size_t>(r)] = static_cast<char>(r);
    Clock::time_point t0 = Clock::now();
    std::memcpy(dst.data(), src.data(), kMemcpyBytes);
    best = std::min(best, Seconds(Clock::now() - t0));
    if (dst[static_cast<size_t>(r)] != static_cast<char>(r)) Die("memcpy check failed");
  }
  return static_cast<double>(kMemcpyBytes) / best / 1e9;
}

// 256 workers x 4 shards need about 2 x 1024 descriptors in this process.
void RaiseFileLimit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  rl.rlim_cur = rl.rlim_max;
  (void)setrlimit(RLIMIT_NOFILE, &rl);
}

double Percentile(const std::vector<float>& sorted, double p) {
  if (sorted.empty()) return 0.0;
  size_t idx = static_cast<size_t>(p * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(idx, sorted.size() - 1)];
}

// ---- one case ---------------------------------------------------------------

struct CaseSpec {
  std::string model;
  int workers = 0;
  int shards = 0;
  std::string mode;
  std::string Label() const {
    return model + " workers=" + std::to_string(workers) + " shards=" + std::to_string(shards) +
           " mode=" + mode;
  }
};

struct CaseResult {
  CaseSpec spec;
  std::string skipped;  // why the case did not run; empty when it did
  uint64_t model_bytes = 0;
  std::vector<int64_t> shard_floats;  // model floats held by each server
  double seconds = 0;                 // measured window, actual
  int64_t steps = 0, syncs = 0;
  double steps_per_s = 0, ideal_steps_per_s = 0, efficiency = 0;
  double sync_p50_us = 0, sync_p99_us = 0;  // push start to pull return
  int64_t row_steps = 0;                    // steps that pulled and pushed rows
  double rows_p50_us = 0, rows_p99_us = 0;  // a step's row pull + push
  double row_bytes_moved = 0;               // ids and row floats, both ways
  double push_p50_us = 0, push_p99_us = 0, pull_p50_us = 0, pull_p99_us = 0;
  uint64_t server_versions = 0;  // largest version growth of a server in the window
  double bytes_moved = 0;        // float32 payload, pushed + pulled
  double process_cpu_s = 0, server_cpu_s = 0, worker_threads_cpu_s = 0;
  double server_cpu_s_per_push = 0, server_cpu_s_per_mb = 0, memcpy_s_per_mb = 0;
  int64_t vmrss_bytes = 0;
  uint64_t client_buffer_bytes = 0;
  std::string pull_buffers;  // "per_worker" or "pool"
  int pull_buffer_count = 0;
  double mem_estimate_bytes = 0;
  double case_wall_s = 0;
};

// What a worker thread measured in the window.
struct WorkerStats {
  int64_t steps = 0;
  std::vector<float> sync_us, push_us, pull_us;
  std::vector<float> rows_us;  // a step's row pull + push
};

// Distinct ids, Zipf-like (s = 1) over [0, space): a few hot rows, a long tail.
std::vector<std::vector<int64_t>> IdBatches(const Model& m, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const double log_space = std::log(static_cast<double>(m.id_space));
  std::vector<std::vector<int64_t>> out(kIdBatches);
  for (auto& ids : out) {
    while (static_cast<int>(ids.size()) < m.rows_per_step) {
      // Inverse CDF of a 1/x density on [1, space]: exp(u log space).
      const auto id = static_cast<int64_t>(std::exp(u(rng) * log_space)) - 1;
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    }
  }
  return out;
}

// State shared by the workers of one case. Fields are written before the
// threads start or before a latch releases them.
struct CaseState {
  const Config* cfg = nullptr;
  const Model* model = nullptr;
  std::string label;
  std::vector<tensorspark::Endpoint> endpoints;
  std::string secret;
  std::vector<int64_t> shapes;  // one dimension per variable
  std::vector<int64_t> offsets;
  std::vector<float> zeros;                   // every push reads this, never written
  std::vector<std::vector<float>> pull_bufs;  // one per worker, or a pool
  std::vector<WorkerStats> stats;
  FirstError err;
  std::unique_ptr<std::latch> connected, joined;
  std::latch go_join{1}, go_run{1};
  Clock::time_point t_start, t_end;  // set before go_run
  // Set once the window's end was sampled: workers (and so their server
  // connections) keep running until then, so no thread's CPU clock is gone
  // from the end sample.
  std::atomic<bool> stop{false};
};

tensorspark::ClientOptions BaseOptions(const CaseState& st, int32_t partition) {
  tensorspark::ClientOptions opt;
  opt.secret = st.secret;
  opt.partition_id = partition;
  opt.attempt = 0;
  opt.connect_timeout_s = st.cfg->timeout_s;
  opt.io_timeout_s = st.cfg->timeout_s;
  opt.member_wait_s = st.cfg->timeout_s;  // >= the run's wait_timeout_s
  opt.heartbeat_interval_s = 0;           // each sync is heard from; no extra threads
  return opt;
}

void WorkerMain(int i, CaseState* st) {
  const std::string name = kWorkerThreadPrefix + std::to_string(i);
  pthread_setname_np(pthread_self(), name.c_str());
  const std::string who = st->label + ": worker " + std::to_string(i);
  const Config& cfg = *st->cfg;
  const Model& m = *st->model;
  WorkerStats& ws = st->stats[static_cast<size_t>(i)];

  std::unique_ptr<tensorspark::ShardedClient> c;
  Status s = tensorspark::ShardedClient::Connect(BaseOptions(*st, i), st->endpoints, &c);
  if (!s.ok()) st->err.Set(who + ": connect: " + s.ToString());
  st->connected->count_down();
  st->go_join.wait();
  if (!st->err.failed()) {
    s = c->Join(nullptr);
    if (!s.ok()) st->err.Set(who + ": join: " + s.ToString());
  }
  st->joined->count_down();
  st->go_run.wait();
  if (st->err.failed()) return;  // ~ShardedClient closes: the servers drop this member

  std::vector<float>& pull = st->pull_bufs[static_cast<size_t>(i) % st->pull_bufs.size()];
  const std::vector<std::vector<int64_t>> id_batches =
      m.rows_per_step ? IdBatches(m, 1000 + static_cast<uint64_t>(i))
                      : std::vector<std::vector<int64_t>>{};
  std::vector<float> rows(static_cast<size_t>(m.rows_per_step) * m.row_dim);
  const std::vector<float> grads(rows.size(), 1e-3f);
  std::vector<tensorspark::TensorView> push_views;
  std::vector<tensorspark::MutableTensorView> pull_views;
  for (size_t v = 0; v < m.var_names.size(); ++v) {
    const size_t off = static_cast<size_t>(st->offsets[v]);
    const size_t n = static_cast<size_t>(m.var_floats[v]);
    push_views.push_back({m.var_names[v], {&st->shapes[v], 1}, {st->zeros.data() + off, n}});
    pull_views.push_back({m.var_names[v], {pull.data() + off, n}});
  }
  const tensorspark::PushOptions push_opt;
  uint64_t version = 0;
  const auto step = FromSeconds(cfg.step_ms / 1000.0);
  auto in_window = [&](Clock::time_point t) { return t >= st->t_start && t < st->t_end; };
  for (int64_t k = 1; !st->stop.load(std::memory_order_acquire) && !st->err.failed(); ++k) {
    std::this_thread::sleep_for(step);
    if (m.rows_per_step) {  // the batch's rows in, their gradients out
      const std::vector<int64_t>& ids = id_batches[static_cast<size_t>(k) % id_batches.size()];
      const Clock::time_point r0 = Clock::now();
      const tensorspark::RowsRequest req{m.table, ids, rows};
      s = c->PullRows({&req, 1}, nullptr);
      if (s.ok()) {
        const tensorspark::RowsUpdate up{m.table, m.row_dim, ids, grads};
        s = c->PushRows(tensorspark::UpdateKind::kGradient, 0.01f, {&up, 1}, nullptr);
      }
      if (!s.ok()) {
        st->err.Set(who + ": rows: " + s.ToString());
        return;
      }
      if (in_window(Clock::now())) {
        ws.rows_us.push_back(static_cast<float>(Seconds(Clock::now() - r0) * 1e6));
      }
    }
    if (k % cfg.sync_every == 0) {
      const Clock::time_point t0 = Clock::now();
      s = c->Push(tensorspark::UpdateKind::kDelta, push_views, push_opt, &version);
      if (!s.ok()) {
        st->err.Set(who + ": push: " + s.ToString());
        return;
      }
      const Clock::time_point t1 = Clock::now();
      s = c->Pull(pull_views, &version);
      if (!s.ok()) {
        st->err.Set(who + ": pull: " + s.ToString());
        return;
      }
      const Clock::time_point t2 = Clock::now();
      if (in_window(t2)) {
        ws.push_us.push_back(static_cast<float>(Seconds(t1 - t0) * 1e6));
        ws.pull_us.push_back(static_cast<float>(Seconds(t2 - t1) * 1e6));
        ws.sync_us.push_back(static_cast<float>(Seconds(t2 - t0) * 1e6));
      }
    }
    if (in_window(Clock::now())) ++ws.steps;
  }
  // In sync mode the open round stops waiting for a worker once it left.
  s = c->Leave();
  if (!s.ok()) st->err.Set(who + ": leave: " + s.ToString());
}

// The floats of the model that each of `shards` servers holds, by the
// ShardedClient's placement rule.
std::vector<int64_t> ShardFloats(const Model& m, int shards) {
  std::vector<int64_t> out(static_cast<size_t>(shards), 0);
  const int64_t chunk = static_cast<int64_t>(
      tensorspark::ShardedClient::ChunkElements(tensorspark::ShardedClient::kDefaultChunkBytes));
  for (size_t v = 0; v < m.var_names.size(); ++v) {
    for (int64_t k = 0; k * chunk < m.var_floats[v]; ++k) {
      const size_t srv = tensorspark::ShardedClient::ServerFor(
          m.var_names[v], static_cast<uint64_t>(k), static_cast<size_t>(shards));
      out[srv] += std::min(chunk, m.var_floats[v] - k * chunk);
    }
  }
  return out;
}

CaseResult RunCase(const CaseSpec& spec, const Config& cfg, double memcpy_gbps) {
  const Clock::time_point case_start = Clock::now();
  const Model m = MakeModel(spec.model);
  const int n = spec.workers;
  CaseResult res;
  res.spec = spec;
  res.model_bytes = m.bytes();
  res.shard_floats = ShardFloats(m, spec.shards);

  // Pull buffers: one per worker when they fit the budget, else a pool that
  // several workers pull into at once (the bytes they write are ignored).
  const uint64_t per_worker = static_cast<uint64_t>(n) * m.bytes();
  const int buf_count = per_worker <= cfg.max_client_bytes
                            ? n
                            : static_cast<int>(std::max<uint64_t>(
                                  1, std::min<uint64_t>(n, cfg.max_client_bytes / m.bytes())));
  res.pull_buffers = buf_count == n ? "per_worker" : "pool";
  res.pull_buffer_count = buf_count;
  res.client_buffer_bytes = static_cast<uint64_t>(buf_count + 1) * m.bytes();
  // Each server connection (the driver's too, for its register) keeps a
  // receive buffer as large as its share of a push, growing to it by
  // doubling (so up to 1.5x while it grows), plus the model and, in sync
  // mode, the round's accumulator.
  res.mem_estimate_bytes = 1.5 * static_cast<double>(per_worker + m.bytes()) +
                           static_cast<double>(m.bytes()) * (spec.mode == "sync" ? 2 : 1) +
                           static_cast<double>(res.client_buffer_bytes);
  const int64_t avail = ProcKb("/proc/meminfo", "MemAvailable");
  if (avail > 0 && res.mem_estimate_bytes > kMemFraction * static_cast<double>(avail)) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "needs about %.1f GB, over %.0f%% of MemAvailable (%.1f GB)",
                  res.mem_estimate_bytes / 1e9, kMemFraction * 100,
                  static_cast<double>(avail) / 1e9);
    res.skipped = buf;
    return res;
  }

  const std::string label = spec.Label();
  // Setup and teardown of 256 workers plus a few bounded waits; past this
  // something is stuck.
  Watchdog watchdog(label, cfg.warmup_s + cfg.seconds + 4 * cfg.timeout_s + 60);

  CaseState st;
  st.cfg = &cfg;
  st.model = &m;
  st.label = label;
  st.secret = RandomSecret();
  std::vector<std::unique_ptr<tensorspark::Server>> servers;
  for (int k = 0; k < spec.shards; ++k) {
    tensorspark::ServerOptions sopt;
    sopt.bind_address = "127.0.0.1";
    sopt.port = 0;
    sopt.secret = st.secret;
    sopt.io_timeout_s = cfg.timeout_s;
    // All workers connect at once from one address: no handshake may be
    // evicted for being one too many.
    sopt.max_connections = 4096;
    sopt.max_pending_handshakes = 4096;
    sopt.max_pending_per_peer = 4096;
    servers.emplace_back();
    Check(tensorspark::Server::Start(sopt, &servers.back()), label + ": server start");
    st.endpoints.push_back({"127.0.0.1", servers.back()->port()});
  }

  int64_t off = 0;
  for (int64_t f : m.var_floats) {
    st.shapes.push_back(f);
    st.offsets.push_back(off);
    off += f;
  }
  st.zeros.assign(static_cast<size_t>(m.floats), 0.0f);
  // 1.0f, so the final check sees that a pull really wrote the zeros.
  st.pull_bufs.assign(static_cast<size_t>(buf_count),
                      std::vector<float>(static_cast<size_t>(m.floats), 1.0f));
  st.stats.resize(static_cast<size_t>(n));

  // The driver: sets the mode (before any worker joins) and registers zeros.
  std::unique_ptr<tensorspark::ShardedClient> driver;
  Check(tensorspark::ShardedClient::Connect(BaseOptions(st, -1), st.endpoints, &driver),
        label + ": driver connect");
  tensorspark::RunConfig run;
  run.mode = spec.mode == "sync" ? tensorspark::ConsistencyMode::kSync
                                 : tensorspark::ConsistencyMode::kAsync;
  run.heartbeat_timeout_s = static_cast<float>(cfg.timeout_s);
  run.wait_timeout_s = static_cast<float>(cfg.timeout_s);
  Check(driver->Configure(run), label + ": configure");
  std::vector<tensorspark::VariableSpec> specs;
  for (size_t v = 0; v < m.var_names.size(); ++v) {
    specs.push_back({m.var_names[v],
                     {&st.shapes[v], 1},
                     {st.zeros.data() + st.offsets[v], static_cast<size_t>(m.var_floats[v])}});
  }
  std::vector<bool> created;
  uint64_t version = 0;
  Check(driver->Register(specs, &created, &version), label + ": register");
  if (m.rows_per_step) {
    tensorspark::TableConfig table;
    table.name = m.table;
    table.dim = m.row_dim;
    Check(driver->CreateTables({&table, 1}, nullptr), label + ": create table");
  }

  st.connected = std::make_unique<std::latch>(n);
  st.joined = std::make_unique<std::latch>(n);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) threads.emplace_back(WorkerMain, i, &st);
  // Everyone connects, then joins, then starts together, so the warm-up
  // does not include a stream of late joiners.
  st.connected->wait();
  st.go_join.count_down();
  st.joined->wait();
  if (st.err.failed()) {
    st.go_run.count_down();  // the workers see the failure and return
    for (auto& t : threads) t.join();
    Die(st.err.message());
  }
  const Clock::time_point now = Clock::now();
  st.t_start = now + FromSeconds(cfg.warmup_s);
  st.t_end = st.t_start + FromSeconds(cfg.seconds);
  st.go_run.count_down();

  const pid_t main_tid = static_cast<pid_t>(syscall(SYS_gettid));
  auto worker_cpu = [&] {
    double sum = 0;
    for (auto& t : threads) sum += ThreadCpuSeconds(t.native_handle());
    return sum;
  };
  auto server_versions = [&] {
    std::vector<uint64_t> v;
    for (auto& srv : servers) v.push_back(srv->version());
    return v;
  };
  std::this_thread::sleep_until(st.t_start);
  const Clock::time_point w0 = Clock::now();
  const double proc0 = ProcessCpuSeconds();
  const double srv0 = ServerThreadsCpuSeconds(main_tid);
  const double wrk0 = worker_cpu();
  const std::vector<uint64_t> ver0 = server_versions();
  std::this_thread::sleep_until(st.t_end);
  const Clock::time_point w1 = Clock::now();
  const double proc1 = ProcessCpuSeconds();
  const double srv1 = ServerThreadsCpuSeconds(main_tid);
  const double wrk1 = worker_cpu();
  const std::vector<uint64_t> ver1 = server_versions();
  res.vmrss_bytes = ProcKb("/proc/self/status", "VmRSS");
  st.stop.store(true, std::memory_order_release);

  for (auto& t : threads) t.join();
  if (st.err.failed()) Die(st.err.message());

  // Sanity: worker 0's buffer holds the registered zeros after its pulls.
  if (!st.stats[0].sync_us.empty() && std::any_of(st.pull_bufs[0].begin(), st.pull_bufs[0].end(),
                                                  [](float v) { return v != 0.0f; })) {
    Die(label + ": a pull returned wrong values");
  }
  driver->Close();
  for (auto& srv : servers) srv->Stop();

  res.seconds = Seconds(w1 - w0);
  std::vector<float> sync_us, push_us, pull_us, rows_us;
  for (const WorkerStats& ws : st.stats) {
    res.steps += ws.steps;
    rows_us.insert(rows_us.end(), ws.rows_us.begin(), ws.rows_us.end());
    sync_us.insert(sync_us.end(), ws.sync_us.begin(), ws.sync_us.end());
    push_us.insert(push_us.end(), ws.push_us.begin(), ws.push_us.end());
    pull_us.insert(pull_us.end(), ws.pull_us.begin(), ws.pull_us.end());
  }
  res.syncs = static_cast<int64_t>(sync_us.size());
  std::sort(sync_us.begin(), sync_us.end());
  std::sort(push_us.begin(), push_us.end());
  std::sort(pull_us.begin(), pull_us.end());
  std::sort(rows_us.begin(), rows_us.end());
  res.row_steps = static_cast<int64_t>(rows_us.size());
  res.rows_p50_us = Percentile(rows_us, 0.50);
  res.rows_p99_us = Percentile(rows_us, 0.99);
  // Per step: the ids twice (pull, push) and the rows twice (pulled, pushed).
  res.row_bytes_moved = static_cast<double>(res.row_steps) * m.rows_per_step * 2.0 *
                        (sizeof(int64_t) + m.row_dim * sizeof(float));
  res.sync_p50_us = Percentile(sync_us, 0.50);
  res.sync_p99_us = Percentile(sync_us, 0.99);
  res.push_p50_us = Percentile(push_us, 0.50);
  res.push_p99_us = Percentile(push_us, 0.99);
  res.pull_p50_us = Percentile(pull_us, 0.50);
  res.pull_p99_us = Percentile(pull_us, 0.99);
  res.steps_per_s = static_cast<double>(res.steps) / cfg.seconds;
  res.ideal_steps_per_s = n * 1000.0 / cfg.step_ms;
  res.efficiency = res.steps_per_s / res.ideal_steps_per_s;
  for (size_t k = 0; k < ver0.size(); ++k) {
    res.server_versions = std::max(res.server_versions, ver1[k] - ver0[k]);
  }
  res.bytes_moved =
      2.0 * static_cast<double>(res.syncs) * static_cast<double>(m.bytes()) + res.row_bytes_moved;
  res.process_cpu_s = proc1 - proc0;
  res.server_cpu_s = srv1 - srv0;
  res.worker_threads_cpu_s = wrk1 - wrk0;
  if (res.syncs > 0) {
    res.server_cpu_s_per_push = res.server_cpu_s / static_cast<double>(res.syncs);
    res.server_cpu_s_per_mb = res.server_cpu_s / (res.bytes_moved / 1e6);
  }
  res.memcpy_s_per_mb = 1e6 / (memcpy_gbps * 1e9);
  res.case_wall_s = Seconds(Clock::now() - case_start);
  return res;
}

// ---- output -----------------------------------------------------------------

template <typename T>
std::string List(const std::vector<T>& v, bool quoted) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    std::ostringstream one;
    one << v[i];
    s += (i ? ", " : "") + (quoted ? "\"" + JsonEscape(one.str()) + "\"" : one.str());
  }
  return s + "]";
}

void WriteJson(const std::vector<CaseResult>& results, const Config& cfg, double memcpy_gbps,
               double total_s, const std::string& path) {
  std::string j = "{\n  \"cases\": [\n";
  for (size_t k = 0; k < results.size(); ++k) {
    const CaseResult& r = results[k];
    j += "    {\"model\": \"" + r.spec.model +
         "\", \"model_bytes\": " + std::to_string(r.model_bytes) +
         ", \"workers\": " + std::to_string(r.spec.workers) +
         ", \"shards\": " + std::to_string(r.spec.shards) + ", \"mode\": \"" + r.spec.mode +
         "\", \"shard_floats\": " + List(r.shard_floats, false) +
         ", \"mem_estimate_bytes\": " + Num(r.mem_estimate_bytes);
    if (!r.skipped.empty()) {
      j += ", \"skipped\": \"" + JsonEscape(r.skipped) + "\"";
    } else {
      j += ", \"seconds\": " + Num(r.seconds) + ", \"steps\": " + std::to_string(r.steps) +
           ", \"steps_per_s\": " + Num(r.steps_per_s) +
           ", \"ideal_steps_per_s\": " + Num(r.ideal_steps_per_s) +
           ", \"efficiency\": " + Num(r.efficiency) + ", \"syncs\": " + std::to_string(r.syncs) +
           ", \"sync_p50_us\": " + Num(r.sync_p50_us) + ", \"sync_p99_us\": " + Num(r.sync_p99_us) +
           ", \"row_steps\": " + std::to_string(r.row_steps) +
           ", \"rows_p50_us\": " + Num(r.rows_p50_us) + ", \"rows_p99_us\": " + Num(r.rows_p99_us) +
           ", \"row_bytes_moved\": " + Num(r.row_bytes_moved) +
           ", \"push_p50_us\": " + Num(r.push_p50_us) + ", \"push_p99_us\": " + Num(r.push_p99_us) +
           ", \"pull_p50_us\": " + Num(r.pull_p50_us) + ", \"pull_p99_us\": " + Num(r.pull_p99_us) +
           ", \"server_versions\": " + std::to_string(r.server_versions) +
           ", \"bytes_moved\": " + Num(r.bytes_moved) +
           ", \"process_cpu_s\": " + Num(r.process_cpu_s) +
           ", \"server_cpu_s\": " + Num(r.server_cpu_s) +
           ", \"worker_threads_cpu_s\": " + Num(r.worker_threads_cpu_s) +
           ", \"server_cpu_s_per_push\": " + Num(r.server_cpu_s_per_push) +
           ", \"server_cpu_s_per_mb\": " + Num(r.server_cpu_s_per_mb) +
           ", \"memcpy_s_per_mb\": " + Num(r.memcpy_s_per_mb) + ", \"server_cpu_vs_memcpy\": " +
           Num(r.memcpy_s_per_mb > 0 ? r.server_cpu_s_per_mb / r.memcpy_s_per_mb : 0.0) +
           ", \"vmrss_bytes\": " + std::to_string(r.vmrss_bytes) +
           ", \"client_buffer_bytes\": " + std::to_string(r.client_buffer_bytes) +
           ", \"pull_buffers\": \"" + r.pull_buffers +
           "\", \"pull_buffer_count\": " + std::to_string(r.pull_buffer_count) +
           ", \"case_wall_s\": " + Num(r.case_wall_s);
    }
    j += std::string("}") + (k + 1 < results.size() ? "," : "") + "\n";
  }
  j += "  ],\n";
  j += "  \"units\": \"latencies in microseconds (sync = push start to pull return, which in sync "
       "mode includes waiting for the round); bytes_moved counts float32 payload pushed + "
       "pulled; CPU in seconds over the measured window; MB = 1e6 bytes\",\n";
  j += "  \"model_variables\": {";
  for (size_t k = 0; k < cfg.models.size(); ++k) {
    const Model m = MakeModel(cfg.models[k]);
    j += std::string(k ? ", " : "") + "\"" + m.name +
         "\": {\"variables\": " + List(m.var_names, true) +
         ", \"floats\": " + List(m.var_floats, false) + "}";
  }
  j += "},\n";
  j += "  \"config\": {\"workers\": " + List(cfg.workers, false) +
       ", \"shards\": " + List(cfg.shards, false) + ", \"modes\": " + List(cfg.modes, true) +
       ", \"models\": " + List(cfg.models, true) + ", \"seconds\": " + Num(cfg.seconds) +
       ", \"warmup_s\": " + Num(cfg.warmup_s) + ", \"step_ms\": " + Num(cfg.step_ms) +
       ", \"sync_every\": " + std::to_string(cfg.sync_every) +
       ", \"timeout_s\": " + Num(cfg.timeout_s) +
       ", \"max_client_bytes\": " + std::to_string(cfg.max_client_bytes) +
       ", \"quick\": " + (cfg.quick ? "true" : "false") + "},\n";
  j += "  \"machine\": {\"cores\": " + std::to_string(std::thread::hardware_concurrency()) +
       ", \"mem_total_bytes\": " + std::to_string(ProcKb("/proc/meminfo", "MemTotal")) +
       ", \"compiler\": \"" + JsonEscape(CompilerName()) + "\"},\n";
  j += "  \"memcpy_gbps\": " + Num(memcpy_gbps) + ",\n";
  j += "  \"total_s\": " + Num(total_s) + ",\n";
  j += "  \"timestamp\": \"" + UtcTimestamp() + "\"\n}\n";

  std::filesystem::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) Die("open " + path + ": " + std::strerror(errno));
  bool ok = std::fwrite(j.data(), 1, j.size(), f) == j.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) Die("write " + path + " failed");
}

void PrintHeader() {
  std::printf("%-10s %5s %6s %5s %9s %8s %5s %19s %9s %9s %11s %9s %8s %7s\n", "model", "N",
              "shards", "mode", "steps/s", "ideal", "eff", "sync_p50/p99_ms", "push_p50",
              "pull_p50", "srv_ms/push", "srv_s/GB", "xmemcpy", "RSS_MB");
}

void PrintRow(const CaseResult& r, double memcpy_s_per_mb) {
  std::printf("%-10s %5d %6d %5s ", r.spec.model.c_str(), r.spec.workers, r.spec.shards,
              r.spec.mode.c_str());
  if (!r.skipped.empty()) {
    std::printf("skipped: %s\n", r.skipped.c_str());
  } else {
    char lat[32];
    std::snprintf(lat, sizeof(lat), "%.2f/%.2f", r.sync_p50_us / 1e3, r.sync_p99_us / 1e3);
    std::printf("%9.1f %8.1f %5.3f %19s %9.2f %9.2f %11.3f %9.3f %8.2f %7.0f\n", r.steps_per_s,
                r.ideal_steps_per_s, r.efficiency, lat, r.push_p50_us / 1e3, r.pull_p50_us / 1e3,
                r.server_cpu_s_per_push * 1e3, r.server_cpu_s_per_mb * 1e3,
                memcpy_s_per_mb > 0 ? r.server_cpu_s_per_mb / memcpy_s_per_mb : 0.0,
                static_cast<double>(r.vmrss_bytes) / 1e6);
  }
  std::fflush(stdout);
}

// ---- arguments --------------------------------------------------------------

int BadArgs(const std::string& msg) {
  std::fprintf(stderr, "scale_sim: %s\n%s", msg.c_str(), kUsage);
  return 2;
}

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

bool ParseIntList(const std::string& s, int lo, int hi, std::vector<int>* out) {
  out->clear();
  for (const std::string& item : SplitComma(s)) {
    double d = 0;
    if (!ParseDouble(item, lo, hi, &d) || d != std::floor(d)) return false;
    out->push_back(static_cast<int>(d));
  }
  return !out->empty();
}

bool ParseNameList(const std::string& s, const std::vector<std::string>& allowed,
                   std::vector<std::string>* out) {
  out->clear();
  for (const std::string& item : SplitComma(s)) {
    if (std::find(allowed.begin(), allowed.end(), item) == allowed.end()) return false;
    out->push_back(item);
  }
  return !out->empty();
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  // --quick first, so that explicit flags override it wherever they stand.
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") {
      cfg.quick = true;
      cfg.workers = {16};
      cfg.shards = {1, 2};
      cfg.models = {"cnn"};
      cfg.seconds = 2;
      cfg.warmup_s = 1;
    }
  }
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string v;
    if (a == "--quick") continue;
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (auto eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else {
      if (i + 1 >= argc) return BadArgs(a + " needs a value");
      v = argv[++i];
    }
    double d = 0;
    if (a == "--workers") {
      if (!ParseIntList(v, 1, 4096, &cfg.workers)) return BadArgs("bad --workers");
    } else if (a == "--shards") {
      if (!ParseIntList(v, 1, 64, &cfg.shards)) return BadArgs("bad --shards");
    } else if (a == "--modes") {
      if (!ParseNameList(v, {"async", "sync"}, &cfg.modes)) return BadArgs("bad --modes");
    } else if (a == "--models") {
      if (!ParseNameList(v, {"cnn", "dense100mb", "ctr"}, &cfg.models))
        return BadArgs("bad --models");
    } else if (a == "--seconds") {
      if (!ParseDouble(v, 0.1, 86400, &cfg.seconds)) return BadArgs("bad --seconds");
    } else if (a == "--warmup") {
      if (!ParseDouble(v, 0, 3600, &cfg.warmup_s)) return BadArgs("bad --warmup");
    } else if (a == "--step-ms") {
      if (!ParseDouble(v, 0.001, 60000, &cfg.step_ms)) return BadArgs("bad --step-ms");
    } else if (a == "--sync-every") {
      if (!ParseDouble(v, 1, 1e6, &d) || d != std::floor(d)) return BadArgs("bad --sync-every");
      cfg.sync_every = static_cast<int>(d);
    } else if (a == "--timeout") {
      if (!ParseDouble(v, 1, 3600, &cfg.timeout_s)) return BadArgs("bad --timeout");
    } else if (a == "--max-client-bytes") {
      if (!ParseDouble(v, 0, 1e15, &d) || d != std::floor(d)) {
        return BadArgs("bad --max-client-bytes");
      }
      cfg.max_client_bytes = static_cast<uint64_t>(d);
    } else if (a == "--out") {
      cfg.out = v;
    } else {
      return BadArgs("unknown argument '" + a + "'");
    }
  }

  RaiseFileLimit();
  const Clock::time_point start = Clock::now();
  const double memcpy_gbps = MemcpyGbps();
  const double memcpy_s_per_mb = 1e6 / (memcpy_gbps * 1e9);
  std::printf(
      "tensorspark scale_sim: simulated workers (%.0f ms steps, push+pull every %d), %u cores, "
      "%.1f s per case after %.1f s warm-up%s; memcpy %.2f GB/s\n",
      cfg.step_ms, cfg.sync_every, std::thread::hardware_concurrency(), cfg.seconds, cfg.warmup_s,
      cfg.quick ? " (quick)" : "", memcpy_gbps);
  PrintHeader();
  std::vector<CaseResult> results;
  for (const std::string& model : cfg.models) {
    for (int w : cfg.workers) {
      for (int sh : cfg.shards) {
        for (const std::string& mode : cfg.modes) {
          results.push_back(RunCase({model, w, sh, mode}, cfg, memcpy_gbps));
          PrintRow(results.back(), memcpy_s_per_mb);
        }
      }
    }
  }
  const double total_s = Seconds(Clock::now() - start);
  WriteJson(results, cfg, memcpy_gbps, total_s, cfg.out);
  std::printf("total %.1f s; wrote %s\n", total_s, cfg.out.c_str());
  return 0;
}
