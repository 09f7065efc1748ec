// nanobind bindings: the private module tensorspark._core.
//
// This file is the one place where a failed Status becomes a Python
// exception (ThrowIfError). Every call that does I/O releases the GIL; NumPy
// buffers are passed to the client as spans over their memory, never copied.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "tensorspark/client.h"
#include "tensorspark/server.h"
#include "tensorspark/sharded_client.h"
#include "tensorspark/status.h"
#include "tensorspark/tables.h"
#include "tensorspark/tls.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tensorspark::python {
namespace {

// A C-contiguous float32 array on the CPU, any number of dimensions.
using FloatArray = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
// A C-contiguous int64 vector on the CPU (row ids; Python checks dtypes).
using IdArray = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Python exception types, created once at import (see NB_MODULE below).
struct ErrorTypes {
  PyObject* base = nullptr;        // TensorSparkError
  PyObject* connection = nullptr;  // PSConnectionError (also ConnectionError)
  PyObject* auth = nullptr;        // AuthenticationError
  PyObject* address = nullptr;     // AddressInUseError
  PyObject* timeout = nullptr;     // PSTimeoutError (also TimeoutError)
  PyObject* protocol = nullptr;    // ProtocolError
  PyObject* value = nullptr;       // TensorSparkValueError (also ValueError)
  PyObject* shape = nullptr;       // ShapeMismatchError
  PyObject* not_found = nullptr;   // VariableNotFoundError (also KeyError)
  PyObject* fenced = nullptr;      // FencedError (also PermissionError)
};
ErrorTypes g_errors;

struct StatusError {
  Status status;
};

PyObject* ErrorTypeFor(StatusCode code) {
  switch (code) {
    case StatusCode::kInvalidArgument:
    case StatusCode::kLimitExceeded:
      return g_errors.value;
    case StatusCode::kShapeMismatch:
      return g_errors.shape;
    case StatusCode::kNotFound:
      return g_errors.not_found;
    case StatusCode::kAuthFailed:
      return g_errors.auth;
    case StatusCode::kAddressInUse:
      return g_errors.address;
    case StatusCode::kConnectionError:
    case StatusCode::kShuttingDown:
      return g_errors.connection;
    case StatusCode::kTimeout:
      return g_errors.timeout;
    case StatusCode::kFenced:
      return g_errors.fenced;
    case StatusCode::kProtocolError:
    case StatusCode::kUnsupportedVersion:
    case StatusCode::kFrameTooLarge:
    case StatusCode::kInternal:
    case StatusCode::kOk:
      break;
  }
  return g_errors.protocol;
}

void ThrowIfError(const Status& s) {
  if (!s.ok()) throw StatusError{s};
}

// Runs `call` (which does I/O and touches no Python object) without the GIL,
// then raises its failed Status as a Python exception.
template <typename F>
void Released(F&& call) {
  Status s;
  {
    nb::gil_scoped_release release;
    s = call();
  }
  ThrowIfError(s);
}

PyObject* NewError(nb::module_& m, const char* name, const char* doc, PyObject* bases) {
  std::string qualified = std::string("tensorspark.") + name;
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, bases, nullptr);
  if (type == nullptr) throw nb::python_error();
  m.attr(name) = nb::handle(type);
  return type;
}

PyObject* Bases(std::initializer_list<PyObject*> types) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(types.size()));
  Py_ssize_t i = 0;
  for (PyObject* t : types) {
    Py_INCREF(t);
    PyTuple_SET_ITEM(tuple, i++, t);
  }
  return tuple;
}

void RegisterErrors(nb::module_& m) {
  g_errors.base =
      NewError(m, "TensorSparkError", "Base class of every tensorspark error.", PyExc_Exception);
  g_errors.connection =
      NewError(m, "PSConnectionError", "The parameter server could not be reached or hung up.",
               Bases({g_errors.base, PyExc_ConnectionError}));
  g_errors.auth =
      NewError(m, "AuthenticationError", "The parameter server refused the run's secret.",
               Bases({g_errors.connection}));
  g_errors.address =
      NewError(m, "AddressInUseError", "The parameter server's port is already taken.",
               Bases({g_errors.connection}));
  g_errors.timeout = NewError(m, "PSTimeoutError", "A wait on the parameter server timed out.",
                              Bases({g_errors.base, PyExc_TimeoutError}));
  g_errors.protocol = NewError(m, "ProtocolError", "A malformed, oversized or incompatible frame.",
                               Bases({g_errors.base}));
  g_errors.value = NewError(m, "TensorSparkValueError", "An invalid argument or input.",
                            Bases({g_errors.base, PyExc_ValueError}));
  g_errors.shape =
      NewError(m, "ShapeMismatchError", "A tensor's shape differs from the registered one.",
               Bases({g_errors.value}));
  g_errors.not_found =
      NewError(m, "VariableNotFoundError", "The parameter server holds no variable of that name.",
               Bases({g_errors.value, PyExc_KeyError}));
  g_errors.fenced = NewError(m, "FencedError",
                             "A newer attempt of this worker's partition joined the run, so this "
                             "attempt's pushes and joins are refused.",
                             Bases({g_errors.base, PyExc_PermissionError}));

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const StatusError& e) {
      PyErr_SetString(ErrorTypeFor(e.status.code()), e.status.message().c_str());
    }
  });
}

std::vector<int64_t> ShapeOf(const FloatArray& a) {
  std::vector<int64_t> shape(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) shape[i] = static_cast<int64_t>(a.shape(i));
  return shape;
}

void CheckSameLength(size_t names, size_t arrays, const char* what) {
  if (names != arrays) {
    ThrowIfError(Status(StatusCode::kInvalidArgument,
                        std::string(what) + ": got " + std::to_string(names) + " names but " +
                            std::to_string(arrays) + " arrays; pass one array per name"));
  }
}

// Counters as int; a key whose name (before any labels) ends in "_f64"
// carries a double's bits and becomes a float.
nb::dict StatsToDict(const std::vector<StatEntry>& stats) {
  nb::dict d;
  for (const auto& [key, value] : stats) {
    const std::string_view base = std::string_view(key).substr(0, key.find('{'));
    if (base.ends_with("_f64")) {
      d[nb::str(key.c_str())] = std::bit_cast<double>(value);
    } else {
      d[nb::str(key.c_str())] = value;
    }
  }
  return d;
}

// Views over Python arrays for one call; `shapes` owns the shape storage the
// views point into.
struct ArrayViews {
  std::vector<std::vector<int64_t>> shapes;
  std::vector<TensorView> views;
};

ArrayViews MakeViews(const std::vector<std::string>& names, const std::vector<FloatArray>& arrays,
                     const char* what) {
  CheckSameLength(names.size(), arrays.size(), what);
  ArrayViews v;
  v.shapes.reserve(arrays.size());
  v.views.reserve(arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    v.shapes.push_back(ShapeOf(arrays[i]));
    v.views.push_back({names[i], v.shapes.back(), {arrays[i].data(), arrays[i].size()}});
  }
  return v;
}

std::vector<MutableTensorView> MakeMutableViews(const std::vector<std::string>& names,
                                                const std::vector<FloatArray>& outs) {
  CheckSameLength(names.size(), outs.size(), "pull_into");
  std::vector<MutableTensorView> views;
  views.reserve(outs.size());
  for (size_t i = 0; i < outs.size(); ++i)
    views.push_back({names[i], {outs[i].data(), outs[i].size()}});
  return views;
}

UpdateKind CheckedKind(int kind) {
  if (kind < 1 || kind > 3) {
    ThrowIfError(Status(StatusCode::kInvalidArgument,
                        "push: kind must be 1 (parameters), 2 (delta) or 3 (gradient), got " +
                            std::to_string(kind)));
  }
  return static_cast<UpdateKind>(kind);
}

// Register, pull and push over NumPy arrays for either client type (Client
// and ShardedClient share these signatures). `c` must be live.
template <typename C>
std::pair<std::vector<bool>, uint64_t> RegisterArrays(C* c, const std::vector<std::string>& names,
                                                      const std::vector<FloatArray>& arrays) {
  ArrayViews v = MakeViews(names, arrays, "register");
  std::vector<VariableSpec> specs;
  specs.reserve(v.views.size());
  for (const TensorView& t : v.views) specs.push_back({t.name, t.shape, t.data});
  std::vector<bool> created;
  uint64_t version = 0;
  Released([&] { return c->Register(specs, &created, &version); });
  return {created, version};
}

template <typename C>
uint64_t PullIntoArrays(C* c, const std::vector<std::string>& names,
                        const std::vector<FloatArray>& outs) {
  std::vector<MutableTensorView> views = MakeMutableViews(names, outs);
  uint64_t version = 0;
  Released([&] { return c->Pull(views, &version); });
  return version;
}

template <typename C>
uint64_t PushArrays(C* c, int kind, const std::vector<std::string>& names,
                    const std::vector<FloatArray>& arrays, float learning_rate,
                    uint32_t mean_window) {
  const UpdateKind k = CheckedKind(kind);
  ArrayViews v = MakeViews(names, arrays, "push");
  PushOptions opt;
  opt.learning_rate = learning_rate;
  opt.mean_window = mean_window;
  uint64_t version = 0;
  Released([&] { return c->Push(k, v.views, opt, &version); });
  return version;
}

// set_optimizer's arguments as an OptimizerConfig (the values themselves are
// checked by the client, before any I/O).
OptimizerConfig CheckedOptimizer(int kind, float learning_rate, float beta1, float beta2,
                                 float epsilon, float weight_decay, float initial_accumulator) {
  if (kind < 1 || kind > 7) {
    ThrowIfError(
        Status(StatusCode::kInvalidArgument,
               "set_optimizer: kind must be 1 (sgd) .. 7 (rmsprop), got " + std::to_string(kind)));
  }
  OptimizerConfig config;
  config.kind = static_cast<OptimizerKind>(kind);
  config.learning_rate = learning_rate;
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.epsilon = epsilon;
  config.weight_decay = weight_decay;
  config.initial_accumulator = initial_accumulator;
  return config;
}

// configure's arguments as a RunConfig.
RunConfig CheckedRunConfig(int mode, int64_t staleness, float heartbeat_timeout_s,
                           float wait_timeout_s) {
  if (mode < 0 || mode > 2 || staleness < 0 || staleness > UINT32_MAX) {
    ThrowIfError(Status(StatusCode::kInvalidArgument,
                        "configure: mode must be 0 (async), 1 (sync) or 2 (bounded staleness) "
                        "and staleness in [0, 2^32), got mode " +
                            std::to_string(mode) + ", staleness " + std::to_string(staleness)));
  }
  RunConfig config;
  config.mode = static_cast<ConsistencyMode>(mode);
  config.staleness = static_cast<uint32_t>(staleness);
  config.heartbeat_timeout_s = heartbeat_timeout_s;
  config.wait_timeout_s = wait_timeout_s;
  return config;
}

// Dicts with ages in seconds (report_age_s None without a report) and the
// text decoded leniently: a dump may hold invalid UTF-8.
std::vector<nb::dict> ReportDicts(const std::vector<WorkerReport>& reports) {
  std::vector<nb::dict> out;
  out.reserve(reports.size());
  for (const WorkerReport& r : reports) {
    PyObject* text =
        PyUnicode_DecodeUTF8(r.text.data(), static_cast<Py_ssize_t>(r.text.size()), "replace");
    if (text == nullptr) throw nb::python_error();
    nb::dict d;
    d["partition"] = r.partition;
    d["attempt"] = r.attempt;
    d["clock"] = r.clock;
    d["steps"] = r.steps;
    d["progress_age_s"] = static_cast<double>(r.progress_age_ms) / 1000.0;
    if (r.report_age_ms == WorkerReport::kNoReport) {
      d["report_age_s"] = nb::none();
    } else {
      d["report_age_s"] = static_cast<double>(r.report_age_ms) / 1000.0;
    }
    d["text"] = nb::steal<nb::str>(text);
    out.push_back(std::move(d));
  }
  return out;
}

// Membership, modes, optimizers and reports for either client type (Client
// and ShardedClient share these signatures). `c` must be live.
template <typename C>
uint64_t SetOptimizerOn(C* c, const OptimizerConfig& config,
                        const std::vector<std::string>& names) {
  std::vector<std::string_view> views(names.begin(), names.end());
  uint64_t version = 0;
  Released([&] { return c->SetOptimizer(config, views, &version); });
  return version;
}

template <typename C>
uint64_t JoinOn(C* c) {
  uint64_t clock = 0;
  Released([&] { return c->Join(&clock); });
  return clock;
}

template <typename C>
std::vector<nb::dict> ReportsOf(C* c) {
  std::vector<WorkerReport> reports;
  Released([&] { return c->Reports(&reports); });
  return ReportDicts(reports);
}

// Snapshot files as dicts: tag, version, name.
std::vector<nb::dict> SnapshotDicts(const std::vector<SnapshotInfo>& files) {
  std::vector<nb::dict> out;
  out.reserve(files.size());
  for (const SnapshotInfo& f : files) {
    nb::dict d;
    d["tag"] = f.tag;
    d["version"] = f.version;
    d["name"] = f.name;
    out.push_back(std::move(d));
  }
  return out;
}

template <typename C>
uint64_t RestoreOn(C* c, uint64_t tag) {
  uint64_t version = 0;
  Released([&] { return c->Restore(tag, &version); });
  return version;
}

// ---- sparse tables ---------------------------------------------------------------

// A NumPy array owning `v` (moved to the heap, freed with the array).
template <typename T>
nb::ndarray<nb::numpy, T> OwnedArray(std::vector<T>&& v, std::initializer_list<size_t> shape) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(heap->data(), shape, owner);
}

// A table config from the dict tensorspark.tables.TableSpec builds (already
// validated there; the client validates again).
TableConfig ConfigFromDict(const nb::dict& d) {
  auto get = [&](const char* key) { return d[key]; };
  TableConfig c;
  c.name = nb::cast<std::string>(get("name"));
  c.dim = nb::cast<uint32_t>(get("dim"));
  c.vocab = nb::cast<uint64_t>(get("vocab"));
  c.seed = nb::cast<uint64_t>(get("seed"));
  c.initializer = static_cast<RowInitializer>(nb::cast<uint8_t>(get("initializer")));
  c.init_scale = nb::cast<float>(get("init_scale"));
  c.capacity = nb::cast<uint64_t>(get("capacity"));
  c.eviction = static_cast<EvictionPolicy>(nb::cast<uint8_t>(get("eviction")));
  c.admit_after = nb::cast<uint32_t>(get("admit_after"));
  c.ttl_s = nb::cast<uint32_t>(get("ttl_s"));
  RowOptimizerConfig& o = c.optimizer;
  o.kind = static_cast<RowOptimizerKind>(nb::cast<uint8_t>(get("optimizer")));
  o.learning_rate = nb::cast<float>(get("learning_rate"));
  o.beta1 = nb::cast<float>(get("beta1"));
  o.beta2 = nb::cast<float>(get("beta2"));
  o.epsilon = nb::cast<float>(get("epsilon"));
  o.initial_accumulator = nb::cast<float>(get("initial_accumulator"));
  o.l1 = nb::cast<float>(get("l1"));
  o.l2 = nb::cast<float>(get("l2"));
  o.lr_power = nb::cast<float>(get("lr_power"));
  o.beta = nb::cast<float>(get("beta"));
  return c;
}

nb::dict ConfigToDict(const TableConfig& c) {
  nb::dict d;
  d["name"] = c.name;
  d["dim"] = c.dim;
  d["vocab"] = c.vocab;
  d["seed"] = c.seed;
  d["initializer"] = static_cast<int>(c.initializer);
  d["init_scale"] = c.init_scale;
  d["capacity"] = c.capacity;
  d["eviction"] = static_cast<int>(c.eviction);
  d["admit_after"] = c.admit_after;
  d["ttl_s"] = c.ttl_s;
  const RowOptimizerConfig& o = c.optimizer;
  d["optimizer"] = static_cast<int>(o.kind);
  d["learning_rate"] = o.learning_rate;
  d["beta1"] = o.beta1;
  d["beta2"] = o.beta2;
  d["epsilon"] = o.epsilon;
  d["initial_accumulator"] = o.initial_accumulator;
  d["l1"] = o.l1;
  d["l2"] = o.l2;
  d["lr_power"] = o.lr_power;
  d["beta"] = o.beta;
  return d;
}

template <typename C>
std::vector<bool> CreateTablesOn(C* c, const std::vector<nb::dict>& specs) {
  std::vector<TableConfig> configs;
  configs.reserve(specs.size());
  for (const nb::dict& d : specs) configs.push_back(ConfigFromDict(d));
  std::vector<bool> created;
  Released([&] { return c->CreateTables(configs, &created); });
  return created;
}

template <typename C>
uint64_t PullRowsInto(C* c, const std::vector<std::string>& tables, const std::vector<IdArray>& ids,
                      const std::vector<FloatArray>& outs) {
  CheckSameLength(tables.size(), ids.size(), "pull_rows_into");
  CheckSameLength(tables.size(), outs.size(), "pull_rows_into");
  std::vector<RowsRequest> req;
  req.reserve(tables.size());
  for (size_t i = 0; i < tables.size(); ++i) {
    req.push_back({tables[i], {ids[i].data(), ids[i].size()}, {outs[i].data(), outs[i].size()}});
  }
  uint64_t version = 0;
  Released([&] { return c->PullRows(req, &version); });
  return version;
}

template <typename C>
uint64_t PushRowsFrom(C* c, int kind, float learning_rate, const std::vector<std::string>& tables,
                      const std::vector<IdArray>& ids, const std::vector<FloatArray>& values) {
  CheckSameLength(tables.size(), ids.size(), "push_rows");
  CheckSameLength(tables.size(), values.size(), "push_rows");
  std::vector<RowsUpdate> req;
  req.reserve(tables.size());
  for (size_t i = 0; i < tables.size(); ++i) {
    const FloatArray& v = values[i];
    if (v.ndim() != 2) {
      ThrowIfError(Status(StatusCode::kShapeMismatch,
                          "table '" + tables[i] + "': values must be 2-D [n, dim], got " +
                              std::to_string(v.ndim()) + " dimensions"));
    }
    req.push_back({tables[i],
                   static_cast<uint32_t>(v.shape(1)),
                   {ids[i].data(), ids[i].size()},
                   {v.data(), v.size()}});
  }
  const UpdateKind k = CheckedKind(kind);
  uint64_t version = 0;
  Released([&] { return c->PushRows(k, learning_rate, req, &version); });
  return version;
}

// (ids int64 [n], values float32 [n, dim], next cursor).
template <typename C>
nb::tuple ExportRowsOf(C* c, const std::string& table, uint64_t cursor, uint32_t max_rows) {
  std::vector<int64_t> ids;
  std::vector<float> values;
  uint32_t dim = 0;
  uint64_t next = 0;
  Released([&] { return c->ExportRows(table, cursor, max_rows, &ids, &values, &dim, &next); });
  const size_t n = ids.size();
  return nb::make_tuple(OwnedArray(std::move(ids), {n}), OwnedArray(std::move(values), {n, dim}),
                        next);
}

template <typename C>
std::vector<nb::dict> ListTablesOf(C* c) {
  std::vector<TableInfo> infos;
  Released([&] { return c->ListTables(&infos); });
  std::vector<nb::dict> out;
  out.reserve(infos.size());
  for (const TableInfo& t : infos) {
    nb::dict d = ConfigToDict(t.config);
    d["rows"] = t.rows;
    out.push_back(std::move(d));
  }
  return out;
}

// A model sharded over several servers (ShardedClient); the same calls as
// PyClient, each going to every server that takes part (membership, modes
// and heartbeats to all of them).
class PyShardedClient {
 public:
  PyShardedClient(const std::vector<std::pair<std::string, uint16_t>>& servers, nb::bytes secret,
                  int32_t partition_id, int32_t attempt, double connect_timeout_s,
                  double io_timeout_s, uint64_t chunk_bytes, double heartbeat_interval_s,
                  const std::vector<std::string>& tls_fingerprints) {
    ClientOptions opt;
    opt.secret = std::string(secret.c_str(), secret.size());
    opt.tls_fingerprints = tls_fingerprints;
    opt.partition_id = partition_id;
    opt.attempt = attempt;
    opt.connect_timeout_s = connect_timeout_s;
    opt.io_timeout_s = io_timeout_s;
    opt.heartbeat_interval_s = heartbeat_interval_s;  // one heartbeat thread per server
    std::vector<Endpoint> endpoints;
    for (const auto& [host, port] : servers) endpoints.push_back({host, port});
    Released([&] { return ShardedClient::Connect(opt, endpoints, &client_, chunk_bytes); });
  }

  std::pair<std::vector<bool>, uint64_t> Register(const std::vector<std::string>& names,
                                                  const std::vector<FloatArray>& arrays) {
    return RegisterArrays(Live(), names, arrays);
  }

  uint64_t PullInto(const std::vector<std::string>& names, const std::vector<FloatArray>& outs) {
    return PullIntoArrays(Live(), names, outs);
  }

  uint64_t Push(int kind, const std::vector<std::string>& names,
                const std::vector<FloatArray>& arrays, float learning_rate, uint32_t mean_window) {
    return PushArrays(Live(), kind, names, arrays, learning_rate, mean_window);
  }

  std::vector<nb::dict> Stats() {
    std::vector<std::vector<StatEntry>> stats;
    ShardedClient* c = Live();
    Released([&] { return c->Stats(&stats); });
    std::vector<nb::dict> out;
    for (const auto& s : stats) out.push_back(StatsToDict(s));
    return out;
  }

  uint64_t SetOptimizer(int kind, float learning_rate, float beta1, float beta2, float epsilon,
                        float weight_decay, float initial_accumulator,
                        const std::vector<std::string>& names) {
    return SetOptimizerOn(Live(),
                          CheckedOptimizer(kind, learning_rate, beta1, beta2, epsilon, weight_decay,
                                           initial_accumulator),
                          names);
  }

  uint64_t Join() { return JoinOn(Live()); }

  void Leave() {
    ShardedClient* c = Live();
    Released([&] { return c->Leave(); });
  }

  void Heartbeat() {
    ShardedClient* c = Live();
    Released([&] { return c->Heartbeat(); });
  }

  // No I/O: stored for the next heartbeats, so the GIL is kept.
  void ReportProgress(uint64_t steps, uint64_t samples, double loss) {
    if (client_) client_->ReportProgress(steps, samples, loss);
  }

  void Report(const std::string& text) {
    ShardedClient* c = Live();
    Released([&] { return c->Report(text); });
  }

  std::vector<nb::dict> Reports() { return ReportsOf(Live()); }

  // No I/O: read by the first server's heartbeat thread, so the GIL is kept.
  void SetDumpFile(std::string path) {
    if (client_) client_->SetDumpFile(std::move(path));
  }

  void Configure(int mode, int64_t staleness, float heartbeat_timeout_s, float wait_timeout_s) {
    const RunConfig config = CheckedRunConfig(mode, staleness, heartbeat_timeout_s, wait_timeout_s);
    ShardedClient* c = Live();
    Released([&] { return c->Configure(config); });
  }

  std::vector<std::string> Snapshot(uint64_t tag) {
    std::vector<std::string> names;
    ShardedClient* c = Live();
    Released([&] { return c->Snapshot(tag, &names, nullptr); });
    return names;
  }

  std::vector<std::vector<nb::dict>> Snapshots() {
    std::vector<std::vector<SnapshotInfo>> per_server;
    ShardedClient* c = Live();
    Released([&] { return c->Snapshots(&per_server); });
    std::vector<std::vector<nb::dict>> out;
    for (const auto& files : per_server) out.push_back(SnapshotDicts(files));
    return out;
  }

  std::optional<uint64_t> NewestCommonTag() {
    uint64_t tag = 0;
    bool found = false;
    ShardedClient* c = Live();
    Released([&] { return c->NewestCommonTag(&tag, &found); });
    return found ? std::optional<uint64_t>(tag) : std::nullopt;
  }

  uint64_t Restore(uint64_t tag) { return RestoreOn(Live(), tag); }

  std::vector<bool> CreateTables(const std::vector<nb::dict>& specs) {
    return CreateTablesOn(Live(), specs);
  }
  uint64_t PullRowsIntoArrays(const std::vector<std::string>& tables,
                              const std::vector<IdArray>& ids,
                              const std::vector<FloatArray>& outs) {
    return PullRowsInto(Live(), tables, ids, outs);
  }
  uint64_t PushRows(int kind, float learning_rate, const std::vector<std::string>& tables,
                    const std::vector<IdArray>& ids, const std::vector<FloatArray>& values) {
    return PushRowsFrom(Live(), kind, learning_rate, tables, ids, values);
  }
  nb::tuple ExportRows(const std::string& table, uint64_t cursor, uint32_t max_rows) {
    return ExportRowsOf(Live(), table, cursor, max_rows);
  }
  std::vector<nb::dict> ListTables() { return ListTablesOf(Live()); }

  size_t num_servers() { return Live()->num_servers(); }

  bool connected() const { return client_ && client_->connected(); }

  void Close() {
    if (client_) client_->Close();
    client_.reset();
  }

 private:
  ShardedClient* Live() {
    if (!client_) {
      ThrowIfError(
          Status(StatusCode::kConnectionError, "the sharded client is closed; create a new one"));
    }
    return client_.get();
  }

  std::unique_ptr<ShardedClient> client_;
};

// "fp32" | "fp16" | "bf16" or 0 | 1 | 2 (WireEncoding) -> WireEncoding.
WireEncoding ParseEncoding(const std::variant<int, std::string>& e) {
  if (const int* i = std::get_if<int>(&e)) {
    if (*i >= 0 && *i <= 2) return static_cast<WireEncoding>(*i);
  } else {
    const std::string& s = std::get<std::string>(e);
    if (s == "fp32") return WireEncoding::kFloat32;
    if (s == "fp16") return WireEncoding::kFloat16;
    if (s == "bf16") return WireEncoding::kBFloat16;
  }
  ThrowIfError(Status(StatusCode::kInvalidArgument,
                      "encoding must be 'fp32', 'fp16' or 'bf16' (or 0, 1, 2)"));
  return WireEncoding::kFloat32;
}

// Thin owner of a Client; its methods hold no Python objects while the GIL
// is released.
class PyClient {
 public:
  PyClient(const std::string& host, uint16_t port, nb::bytes secret, int32_t partition_id,
           int32_t attempt, double connect_timeout_s, double io_timeout_s, int max_retries,
           const std::variant<int, std::string>& encoding, double heartbeat_interval_s,
           const std::vector<std::string>& tls_fingerprints, int checksums) {
    ClientOptions opt;
    opt.tls_fingerprints = tls_fingerprints;
    // 0 auto, 1 on, 2 off; ps.PSClient maps and validates the names.
    if (checksums < 0 || checksums > 2) {
      throw nb::value_error("checksums must be 0 (auto), 1 (on) or 2 (off)");
    }
    opt.checksums = static_cast<ChecksumMode>(checksums);
    opt.encoding = ParseEncoding(encoding);
    opt.host = host;
    opt.port = port;
    opt.secret = std::string(secret.c_str(), secret.size());
    opt.partition_id = partition_id;
    opt.attempt = attempt;
    opt.connect_timeout_s = connect_timeout_s;
    opt.io_timeout_s = io_timeout_s;
    opt.max_retries = max_retries;
    opt.heartbeat_interval_s = heartbeat_interval_s;
    Released([&] { return Client::Connect(opt, &client_); });
  }

  std::pair<std::vector<bool>, uint64_t> Register(const std::vector<std::string>& names,
                                                  const std::vector<FloatArray>& arrays) {
    return RegisterArrays(Live(), names, arrays);
  }

  bool Checksums() { return Live()->checksums(); }

  std::pair<std::vector<std::pair<std::string, std::vector<int64_t>>>, uint64_t> List() {
    std::vector<VariableInfo> infos;
    uint64_t version = 0;
    Client* c = Live();
    Released([&] { return c->ListVariables(&infos, &version); });
    std::vector<std::pair<std::string, std::vector<int64_t>>> out;
    out.reserve(infos.size());
    for (auto& info : infos) out.emplace_back(std::move(info.name), std::move(info.shape));
    return {std::move(out), version};
  }

  uint64_t PullInto(const std::vector<std::string>& names, const std::vector<FloatArray>& outs) {
    return PullIntoArrays(Live(), names, outs);
  }

  uint64_t Push(int kind, const std::vector<std::string>& names,
                const std::vector<FloatArray>& arrays, float learning_rate, uint32_t mean_window) {
    return PushArrays(Live(), kind, names, arrays, learning_rate, mean_window);
  }

  uint64_t SetOptimizer(int kind, float learning_rate, float beta1, float beta2, float epsilon,
                        float weight_decay, float initial_accumulator,
                        const std::vector<std::string>& names) {
    return SetOptimizerOn(Live(),
                          CheckedOptimizer(kind, learning_rate, beta1, beta2, epsilon, weight_decay,
                                           initial_accumulator),
                          names);
  }

  nb::dict Stats() {
    std::vector<StatEntry> stats;
    Client* c = Live();
    Released([&] { return c->Stats(&stats); });
    return StatsToDict(stats);
  }

  uint64_t Join() { return JoinOn(Live()); }

  void Leave() {
    Client* c = Live();
    Released([&] { return c->Leave(); });
  }

  void Heartbeat() {
    Client* c = Live();
    Released([&] { return c->Heartbeat(); });
  }

  // No I/O: stored for the next heartbeat, so the GIL is kept.
  void ReportProgress(uint64_t steps, uint64_t samples, double loss) {
    if (client_) client_->ReportProgress(steps, samples, loss);
  }

  void Report(const std::string& text) {
    Client* c = Live();
    Released([&] { return c->Report(text); });
  }

  std::vector<nb::dict> Reports() { return ReportsOf(Live()); }

  // No I/O: read by the heartbeat thread, so the GIL is kept.
  void SetDumpFile(std::string path) {
    if (client_) client_->SetDumpFile(std::move(path));
  }

  void Configure(int mode, int64_t staleness, float heartbeat_timeout_s, float wait_timeout_s) {
    const RunConfig config = CheckedRunConfig(mode, staleness, heartbeat_timeout_s, wait_timeout_s);
    Client* c = Live();
    Released([&] { return c->Configure(config); });
  }

  std::string Snapshot(uint64_t tag) {
    std::string name;
    Client* c = Live();
    Released([&] { return c->Snapshot(tag, &name, nullptr); });
    return name;
  }

  std::vector<nb::dict> Snapshots() {
    std::vector<SnapshotInfo> files;
    Client* c = Live();
    Released([&] { return c->Snapshots(&files); });
    return SnapshotDicts(files);
  }

  uint64_t Restore(uint64_t tag) { return RestoreOn(Live(), tag); }

  std::vector<bool> CreateTables(const std::vector<nb::dict>& specs) {
    return CreateTablesOn(Live(), specs);
  }
  uint64_t PullRowsIntoArrays(const std::vector<std::string>& tables,
                              const std::vector<IdArray>& ids,
                              const std::vector<FloatArray>& outs) {
    return PullRowsInto(Live(), tables, ids, outs);
  }
  uint64_t PushRows(int kind, float learning_rate, const std::vector<std::string>& tables,
                    const std::vector<IdArray>& ids, const std::vector<FloatArray>& values) {
    return PushRowsFrom(Live(), kind, learning_rate, tables, ids, values);
  }
  nb::tuple ExportRows(const std::string& table, uint64_t cursor, uint32_t max_rows) {
    return ExportRowsOf(Live(), table, cursor, max_rows);
  }
  std::vector<nb::dict> ListTables() { return ListTablesOf(Live()); }

  void ShutdownServer() {
    Client* c = Live();
    Released([&] { return c->ShutdownServer(); });
  }

  void Close() {
    if (client_) client_->Close();
  }

  bool connected() const { return client_ && client_->connected(); }

 private:
  Client* Live() {
    if (!client_ || !client_->connected()) {
      ThrowIfError(Status(StatusCode::kConnectionError,
                          "the client is closed or its connection broke; create a new client"));
    }
    return client_.get();
  }

  std::unique_ptr<Client> client_;
};

class PyServer {
 public:
  PyServer(const std::string& bind, uint16_t port, nb::bytes secret, uint64_t max_frame_bytes,
           uint64_t max_variables, uint64_t max_connections, double io_timeout_s,
           double handshake_timeout_s, uint32_t update_threads, const std::string& unix_path,
           int metrics_port, const std::string& snapshot_dir, double snapshot_every_s,
           uint64_t snapshot_every_versions, uint64_t snapshot_keep, const std::string& resume_from,
           uint64_t max_pending_handshakes, uint64_t max_pending_per_peer,
           const std::string& tls_cert_pem, const std::string& tls_key_pem) {
    ServerOptions opt;
    opt.tls_cert_pem = tls_cert_pem;
    opt.tls_key_pem = tls_key_pem;
    opt.unix_path = unix_path;
    opt.bind_address = bind;
    opt.port = port;
    opt.secret = std::string(secret.c_str(), secret.size());
    opt.max_frame_bytes = max_frame_bytes;
    opt.max_variables = max_variables;
    opt.max_connections = max_connections;
    opt.max_pending_handshakes = max_pending_handshakes;
    opt.max_pending_per_peer = max_pending_per_peer;
    opt.io_timeout_s = io_timeout_s;
    opt.handshake_timeout_s = handshake_timeout_s;
    opt.update_threads = update_threads;
    opt.metrics_port = metrics_port;
    opt.snapshot_dir = snapshot_dir;
    opt.snapshot_every_s = snapshot_every_s;
    opt.snapshot_every_versions = snapshot_every_versions;
    opt.snapshot_keep = snapshot_keep;
    opt.resume_from = resume_from;
    Released([&] { return Server::Start(opt, &server_); });
  }

  uint16_t port() const { return server_ ? server_->port() : 0; }
  int metrics_port() const { return server_ ? server_->metrics_port() : -1; }
  uint64_t version() const { return server_ ? server_->version() : 0; }
  nb::dict Stats() const { return server_ ? StatsToDict(server_->Stats()) : nb::dict(); }
  bool running() const { return server_ != nullptr; }

  std::string Snapshot() {
    if (!server_) {
      ThrowIfError(Status(StatusCode::kInvalidArgument,
                          "snapshot: the server is stopped (its final snapshot, if any, was "
                          "written on stop)"));
    }
    std::string path;
    Server* s = server_.get();
    Released([&] { return s->Snapshot(&path); });
    return path;
  }

  void Stop() {
    if (!server_) return;
    nb::gil_scoped_release release;
    server_->Stop();
    server_.reset();
  }

  bool WaitUntilStopped(double timeout_s) {
    if (!server_) return true;
    nb::gil_scoped_release release;
    return server_->WaitUntilStopped(timeout_s);
  }

 private:
  std::unique_ptr<Server> server_;
};

}  // namespace
}  // namespace tensorspark::python

NB_MODULE(_core, m) {
  using namespace tensorspark;
  using namespace tensorspark::python;
  m.doc() = "tensorspark C++ core: parameter server and client (private; use tensorspark).";
  RegisterErrors(m);

  m.attr("PROTOCOL_VERSION") = 1;
  m.attr("KIND_PARAMETERS") = 1;
  m.attr("KIND_DELTA") = 2;
  m.attr("KIND_GRADIENT") = 3;
  m.attr("MODE_ASYNC") = 0;
  m.attr("MODE_SYNC") = 1;
  m.attr("MODE_BOUNDED_STALENESS") = 2;
  m.attr("OPTIMIZER_SGD") = 1;
  m.attr("OPTIMIZER_MOMENTUM") = 2;
  m.attr("OPTIMIZER_NESTEROV") = 3;
  m.attr("OPTIMIZER_ADAGRAD") = 4;
  m.attr("OPTIMIZER_ADAM") = 5;
  m.attr("OPTIMIZER_ADAMW") = 6;
  m.attr("OPTIMIZER_RMSPROP") = 7;
  m.attr("EXPORT_DONE") = UINT64_MAX;

  m.def(
      "make_tls_identity",
      []() {
        tensorspark::TlsIdentity id;
        ThrowIfError(tensorspark::MakeTlsIdentity(&id));
        return std::make_tuple(id.cert_pem, id.key_pem, id.fingerprint);
      },
      "A new per-run TLS key and self-signed certificate: (cert_pem, key_pem, fingerprint).");
  m.def(
      "tls_fingerprint",
      [](const std::string& cert_pem) {
        std::string fp;
        ThrowIfError(tensorspark::TlsFingerprint(cert_pem, &fp));
        return fp;
      },
      "cert_pem"_a, "The 'sha256:<hex>' fingerprint of a PEM certificate.");
  m.def(
      "normalize_tls_fingerprint",
      [](const std::string& fingerprint) {
        std::string fp;
        ThrowIfError(tensorspark::NormalizeTlsFingerprint(fingerprint, &fp));
        return fp;
      },
      "fingerprint"_a, "A fingerprint in the canonical 'sha256:<64 hex>' form, or an error.");
  m.def(
      "initial_rows",
      [](const std::string& table, IdArray ids, uint32_t dim, uint64_t seed, int initializer,
         float scale) {
        if (dim == 0 || dim > tensorspark::kMaxTableDim || initializer < 0 || initializer > 2) {
          ThrowIfError(Status(StatusCode::kInvalidArgument,
                              "initial_rows: dim must be in 1..65536 and initializer 0..2, got " +
                                  std::to_string(dim) + " and " + std::to_string(initializer)));
        }
        const size_t n = ids.size();
        std::vector<float> out(n * dim);
        tensorspark::RowInitialValues(table, seed,
                                      static_cast<tensorspark::RowInitializer>(initializer), scale,
                                      dim, {ids.data(), n}, out.data());
        return OwnedArray(std::move(out), {n, dim});
      },
      "table"_a, "ids"_a, "dim"_a, "seed"_a, "initializer"_a, "scale"_a,
      "Initial values of rows never written (float32 [n, dim]), as any server computes them.");
  m.def(
      "server_of_ids",
      [](IdArray ids, uint32_t num_servers) {
        if (num_servers == 0) {
          ThrowIfError(
              Status(StatusCode::kInvalidArgument, "server_of_ids: num_servers must be >= 1"));
        }
        std::vector<int64_t> out(ids.size());
        for (size_t i = 0; i < ids.size(); ++i)
          out[i] = tensorspark::ServerOfId(ids.data()[i], num_servers);
        return OwnedArray(std::move(out), {ids.size()});
      },
      "ids"_a, "num_servers"_a, "The server (0..num_servers-1) holding each id's rows.");
  m.def(
      "hash_strings",
      [](const std::vector<std::string>& values) {
        std::vector<int64_t> out(values.size());
        for (size_t i = 0; i < values.size(); ++i) out[i] = tensorspark::HashStringId(values[i]);
        return OwnedArray(std::move(out), {values.size()});
      },
      "values"_a, "64-bit FNV-1a of each string's UTF-8 bytes, then MixId, masked to 63 bits.");

  nb::class_<PyServer>(m, "Server", "A parameter server running on threads of this process.")
      .def(nb::init<const std::string&, uint16_t, nb::bytes, uint64_t, uint64_t, uint64_t, double,
                    double, uint32_t, const std::string&, int, const std::string&, double, uint64_t,
                    uint64_t, const std::string&, uint64_t, uint64_t, const std::string&,
                    const std::string&>(),
           "bind"_a, "port"_a, "secret"_a, "max_frame_bytes"_a = uint64_t{1} << 31,
           "max_variables"_a = 1 << 16, "max_connections"_a = 1024, "io_timeout_s"_a = 120.0,
           "handshake_timeout_s"_a = 10.0, "update_threads"_a = 0u, "unix_path"_a = "",
           "metrics_port"_a = -1, "snapshot_dir"_a = "", "snapshot_every_s"_a = 0.0,
           "snapshot_every_versions"_a = uint64_t{0}, "snapshot_keep"_a = uint64_t{3},
           "resume_from"_a = "", "max_pending_handshakes"_a = uint64_t{128},
           "max_pending_per_peer"_a = uint64_t{32}, "tls_cert_pem"_a = "", "tls_key_pem"_a = "")
      .def_prop_ro("port", &PyServer::port, "The bound port.")
      .def_prop_ro("metrics_port", &PyServer::metrics_port,
                   "Port of the Prometheus /metrics endpoint, -1 when off.")
      .def_prop_ro("version", &PyServer::version, "Number of pushes applied.")
      .def_prop_ro("running", &PyServer::running)
      .def("stats", &PyServer::Stats,
           "Counters as a dict of int (keys ending in _f64, before labels: float).")
      .def("snapshot", &PyServer::Snapshot,
           "Write a snapshot into snapshot_dir now; returns its path.")
      .def("stop", &PyServer::Stop,
           "Stop serving and join all server threads (writes the final snapshot, if any).")
      .def("wait_until_stopped", &PyServer::WaitUntilStopped, "timeout_s"_a,
           "Block until stopped or timeout_s passes (negative: forever); True if stopped.");

  nb::class_<PyClient>(m, "Client", "One authenticated connection to a parameter server.")
      .def(nb::init<const std::string&, uint16_t, nb::bytes, int32_t, int32_t, double, double, int,
                    const std::variant<int, std::string>&, double, const std::vector<std::string>&,
                    int>(),
           "host"_a, "port"_a, "secret"_a, "partition_id"_a = -1, "attempt"_a = 0,
           "connect_timeout_s"_a = 10.0, "io_timeout_s"_a = 120.0, "max_retries"_a = 8,
           "encoding"_a = 0, "heartbeat_interval_s"_a = 0.0,
           "tls_fingerprints"_a = std::vector<std::string>(), "checksums"_a = 0)
      .def_prop_ro("checksums", &PyClient::Checksums,
                   "True when this connection's frames carry CRC-32C checksums.")
      .def("register", &PyClient::Register, "names"_a, "arrays"_a,
           "Register variables (first registration wins). Returns (created, version).")
      .def("list_variables", &PyClient::List, "Returns ([(name, shape)], version).")
      .def("pull_into", &PyClient::PullInto, "names"_a, "outs"_a,
           "Fill the float32 C-contiguous arrays `outs` in place. Returns the version.")
      .def("push", &PyClient::Push, "kind"_a, "names"_a, "arrays"_a, "learning_rate"_a = 0.0f,
           "mean_window"_a = 1u, "Push float32 arrays of the given kind. Returns the version.")
      .def("set_optimizer", &PyClient::SetOptimizer, "kind"_a, "learning_rate"_a, "beta1"_a = 0.9,
           "beta2"_a = 0.999, "epsilon"_a = 1e-7, "weight_decay"_a = 0.0,
           "initial_accumulator"_a = 0.0, "names"_a = std::vector<std::string>(),
           "Set the server-side optimizer (OPTIMIZER_*) of the named variables, or of every "
           "variable (also later ones) when `names` is empty. Returns the version.")
      .def("stats", &PyClient::Stats,
           "The server's counters as a dict of int (keys ending in _f64, before labels: float).")
      .def("join", &PyClient::Join, "Join the run as a worker. Returns the starting clock.")
      .def("leave", &PyClient::Leave, "Leave the run (the server stops waiting for this worker).")
      .def("heartbeat", &PyClient::Heartbeat,
           "Tell the server this worker is alive, with the latest progress report if any.")
      .def("report_progress", &PyClient::ReportProgress, "steps"_a, "samples"_a, "loss"_a,
           "Store this worker's progress (no I/O); heartbeats carry it to the server's stats.")
      .def("report", &PyClient::Report, "text"_a,
           "Send a stack dump as this worker's latest report (the last 64 KiB of a longer one).")
      .def("reports", &PyClient::Reports,
           "Every live member's clock, steps, progress_age_s, report_age_s (None: none) and "
           "latest report text, as a list of dicts.")
      .def("set_dump_file", &PyClient::SetDumpFile, "path"_a,
           "Name a file the heartbeat thread ships as a report whenever it changes; '' stops.")
      .def("configure", &PyClient::Configure, "mode"_a, "staleness"_a = 0,
           "heartbeat_timeout_s"_a = 30.0f, "wait_timeout_s"_a = 600.0f,
           "Set the run's consistency mode (MODE_*), staleness and timeouts.")
      .def("snapshot", &PyClient::Snapshot, "tag"_a,
           "Have the server write a snapshot tagged `tag` (>= 1) now. Returns its file name.")
      .def("snapshots", &PyClient::Snapshots,
           "The valid snapshot files of the server's snapshot_dir, newest first, as dicts "
           "(tag, version, name).")
      .def("restore", &PyClient::Restore, "tag"_a,
           "Replace the server's whole state by its newest valid snapshot tagged `tag`. Returns "
           "the restored version.")
      .def("create_tables", &PyClient::CreateTables, "specs"_a,
           "Create or reconfigure tables (dicts from TableSpec). Returns created flags.")
      .def("pull_rows_into", &PyClient::PullRowsIntoArrays, "tables"_a, "ids"_a, "outs"_a,
           "Pull rows into float32 [n, dim] buffers. Returns the version.")
      .def("push_rows", &PyClient::PushRows, "kind"_a, "learning_rate"_a, "tables"_a, "ids"_a,
           "values"_a, "Push row gradients (3) or deltas (2). Returns the version.")
      .def("export_rows", &PyClient::ExportRows, "table"_a, "cursor"_a, "max_rows"_a,
           "One batch of stored rows: (ids, values, next_cursor); next_cursor 2**64-1 ends.")
      .def("list_tables", &PyClient::ListTables, "The tables, as dicts with their rows.")
      .def("shutdown_server", &PyClient::ShutdownServer, "Ask the server to stop.")
      .def("close", &PyClient::Close, "Close the connection.")
      .def_prop_ro("connected", &PyClient::connected);

  nb::class_<PyShardedClient>(m, "ShardedClient",
                              "One connection to each of several servers holding one model.")
      .def(nb::init<const std::vector<std::pair<std::string, uint16_t>>&, nb::bytes, int32_t,
                    int32_t, double, double, uint64_t, double, const std::vector<std::string>&>(),
           "servers"_a, "secret"_a, "partition_id"_a = -1, "attempt"_a = 0,
           "connect_timeout_s"_a = 10.0, "io_timeout_s"_a = 120.0,
           "chunk_bytes"_a = tensorspark::ShardedClient::kDefaultChunkBytes,
           "heartbeat_interval_s"_a = 0.0, "tls_fingerprints"_a = std::vector<std::string>())
      .def("register", &PyShardedClient::Register, "names"_a, "arrays"_a,
           "Register variables over the servers. Returns (created, version sum).")
      .def("pull_into", &PyShardedClient::PullInto, "names"_a, "outs"_a,
           "Fill the float32 C-contiguous arrays in place. Returns the version sum.")
      .def("push", &PyShardedClient::Push, "kind"_a, "names"_a, "arrays"_a,
           "learning_rate"_a = 0.0f, "mean_window"_a = 1u,
           "Push float32 arrays of the given kind. Returns the version sum.")
      .def("set_optimizer", &PyShardedClient::SetOptimizer, "kind"_a, "learning_rate"_a,
           "beta1"_a = 0.9, "beta2"_a = 0.999, "epsilon"_a = 1e-7, "weight_decay"_a = 0.0,
           "initial_accumulator"_a = 0.0, "names"_a = std::vector<std::string>(),
           "Set the server-side optimizer (OPTIMIZER_*) of the named variables (every chunk), "
           "or of every variable on every server when `names` is empty. Returns the version sum.")
      .def("stats", &PyShardedClient::Stats, "Each server's counters, in server order.")
      .def("join", &PyShardedClient::Join,
           "Join the run on every server. Returns the largest starting clock.")
      .def("leave", &PyShardedClient::Leave, "Leave the run on every server.")
      .def("heartbeat", &PyShardedClient::Heartbeat,
           "Tell every server this worker is alive, with the latest progress report if any.")
      .def("report_progress", &PyShardedClient::ReportProgress, "steps"_a, "samples"_a, "loss"_a,
           "Store this worker's progress (no I/O); every server's heartbeats carry it.")
      .def("report", &PyShardedClient::Report, "text"_a,
           "Send a stack dump as this worker's latest report (to the first server).")
      .def("reports", &PyShardedClient::Reports,
           "Every live member of any server, merged by (partition, attempt): the largest clock, "
           "steps and progress_age_s, and the newest report, as a list of dicts.")
      .def("set_dump_file", &PyShardedClient::SetDumpFile, "path"_a,
           "Name a file the first server's heartbeat thread ships as a report; '' stops.")
      .def("configure", &PyShardedClient::Configure, "mode"_a, "staleness"_a = 0,
           "heartbeat_timeout_s"_a = 30.0f, "wait_timeout_s"_a = 600.0f,
           "Set the run's consistency mode (MODE_*), staleness and timeouts on every server.")
      .def("snapshot", &PyShardedClient::Snapshot, "tag"_a,
           "Have every server write a snapshot tagged `tag` (>= 1). Returns the file names, in "
           "server order.")
      .def("snapshots", &PyShardedClient::Snapshots,
           "Each server's valid snapshot files (dicts: tag, version, name), newest first.")
      .def("newest_common_tag", &PyShardedClient::NewestCommonTag,
           "The largest tag every server holds a valid snapshot of, or None.")
      .def("restore", &PyShardedClient::Restore, "tag"_a,
           "Restore every server from its newest valid snapshot tagged `tag` (none changes when "
           "one lacks it). Returns the version sum.")
      .def_prop_ro("num_servers", &PyShardedClient::num_servers)
      .def_prop_ro("connected", &PyShardedClient::connected, "Every server's connection is up.")
      .def("create_tables", &PyShardedClient::CreateTables, "specs"_a,
           "Create or reconfigure tables (dicts from TableSpec). Returns created flags.")
      .def("pull_rows_into", &PyShardedClient::PullRowsIntoArrays, "tables"_a, "ids"_a, "outs"_a,
           "Pull rows into float32 [n, dim] buffers. Returns the version.")
      .def("push_rows", &PyShardedClient::PushRows, "kind"_a, "learning_rate"_a, "tables"_a,
           "ids"_a, "values"_a, "Push row gradients (3) or deltas (2). Returns the version.")
      .def("export_rows", &PyShardedClient::ExportRows, "table"_a, "cursor"_a, "max_rows"_a,
           "One batch of stored rows: (ids, values, next_cursor); next_cursor 2**64-1 ends.")
      .def("list_tables", &PyShardedClient::ListTables, "The tables, as dicts with their rows.")
      .def("close", &PyShardedClient::Close, "Close every connection.");
}
