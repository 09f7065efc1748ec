#include "protocol/messages.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "protocol/frame.h"
#include "protocol/half.h"

namespace tensorspark::protocol {

static_assert(std::endian::native == std::endian::little,
              "float32 data travels as raw little-endian bytes");

namespace {

Status Malformed(const std::string& what) {
  return Status(StatusCode::kProtocolError, "malformed payload: " + what);
}

}  // namespace

// ---- Reader ---------------------------------------------------------------------

Status Reader::Need(size_t n, const char* what) {
  if (n > remaining()) {
    return Malformed(std::string("truncated ") + what + " at offset " + std::to_string(pos_) +
                     " (need " + std::to_string(n) + " bytes, " + std::to_string(remaining()) +
                     " left)");
  }
  return Status::OK();
}

Status Reader::ReadU8(uint8_t* v) {
  TS_RETURN_IF_ERROR(Need(1, "u8"));
  *v = data_[pos_++];
  return Status::OK();
}

Status Reader::ReadU16(uint16_t* v) {
  TS_RETURN_IF_ERROR(Need(2, "u16"));
  *v = LoadLE16(data_ + pos_);
  pos_ += 2;
  return Status::OK();
}

Status Reader::ReadU32(uint32_t* v) {
  TS_RETURN_IF_ERROR(Need(4, "u32"));
  *v = LoadLE32(data_ + pos_);
  pos_ += 4;
  return Status::OK();
}

Status Reader::ReadU64(uint64_t* v) {
  TS_RETURN_IF_ERROR(Need(8, "u64"));
  *v = LoadLE64(data_ + pos_);
  pos_ += 8;
  return Status::OK();
}

Status Reader::ReadI32(int32_t* v) {
  uint32_t u;
  TS_RETURN_IF_ERROR(ReadU32(&u));
  *v = static_cast<int32_t>(u);
  return Status::OK();
}

Status Reader::ReadI64(int64_t* v) {
  uint64_t u;
  TS_RETURN_IF_ERROR(ReadU64(&u));
  *v = static_cast<int64_t>(u);
  return Status::OK();
}

Status Reader::ReadF32(float* v) {
  uint32_t u;
  TS_RETURN_IF_ERROR(ReadU32(&u));
  *v = std::bit_cast<float>(u);
  return Status::OK();
}

Status Reader::ReadF64(double* v) {
  uint64_t u;
  TS_RETURN_IF_ERROR(ReadU64(&u));
  *v = std::bit_cast<double>(u);
  return Status::OK();
}

Status Reader::ReadBytes(size_t n, const uint8_t** out) {
  TS_RETURN_IF_ERROR(Need(n, "bytes"));
  *out = data_ + pos_;
  pos_ += n;
  return Status::OK();
}

Status Reader::ReadNonce(Nonce* out) {
  const uint8_t* p;
  TS_RETURN_IF_ERROR(Need(kNonceSize, "32-byte nonce/proof"));
  TS_RETURN_IF_ERROR(ReadBytes(kNonceSize, &p));
  std::memcpy(out->data(), p, kNonceSize);
  return Status::OK();
}

Status Reader::ReadStr(std::string_view* out) {
  uint16_t len;
  TS_RETURN_IF_ERROR(ReadU16(&len));
  TS_RETURN_IF_ERROR(Need(len, "string"));
  *out = std::string_view(reinterpret_cast<const char*>(data_ + pos_), len);
  pos_ += len;
  return Status::OK();
}

Status Reader::ReadLongStr(std::string_view* out) {
  uint32_t len;
  TS_RETURN_IF_ERROR(ReadU32(&len));
  TS_RETURN_IF_ERROR(Need(len, "string"));
  *out = std::string_view(reinterpret_cast<const char*>(data_ + pos_), len);
  pos_ += len;
  return Status::OK();
}

Status Reader::ReadMeta(VariableInfo* out, uint64_t* numel) {
  std::string_view name;
  TS_RETURN_IF_ERROR(ReadStr(&name));
  if (Status s = ValidateName(name); !s.ok()) return Malformed(s.message());
  uint8_t dtype, ndim;
  TS_RETURN_IF_ERROR(ReadU8(&dtype));
  TS_RETURN_IF_ERROR(ReadU8(&ndim));
  if (dtype != static_cast<uint8_t>(DType::kFloat32)) {
    return Malformed("variable '" + std::string(name) + "' has dtype " + std::to_string(dtype) +
                     "; protocol v1 supports float32 (1) only");
  }
  if (ndim > kMaxDims) {
    return Malformed("variable '" + std::string(name) + "' has " + std::to_string(ndim) +
                     " dimensions; at most " + std::to_string(kMaxDims) + " are supported");
  }
  out->name.assign(name);
  out->dtype = DType::kFloat32;
  out->shape.resize(ndim);
  for (uint8_t i = 0; i < ndim; ++i) TS_RETURN_IF_ERROR(ReadI64(&out->shape[i]));
  uint64_t n = 0;
  Status s = ValidateMeta(out->name, out->shape, &n);
  if (!s.ok()) return Malformed(s.message());
  if (numel != nullptr) *numel = n;
  return Status::OK();
}

Status Reader::ReadCount(size_t min_item_size, uint32_t* count) {
  TS_RETURN_IF_ERROR(ReadU32(count));
  if (min_item_size > 0 && *count > remaining() / min_item_size) {
    return Malformed("count " + std::to_string(*count) + " does not fit in the " +
                     std::to_string(remaining()) + " bytes left");
  }
  return Status::OK();
}

Status Reader::Finish() const {
  if (remaining() != 0) {
    return Malformed(std::to_string(remaining()) + " trailing bytes after offset " +
                     std::to_string(pos_));
  }
  return Status::OK();
}

// ---- Writer ---------------------------------------------------------------------

void Writer::U16(uint16_t v) {
  uint8_t b[2];
  StoreLE16(b, v);
  out_->insert(out_->end(), b, b + 2);
}

void Writer::U32(uint32_t v) {
  uint8_t b[4];
  StoreLE32(b, v);
  out_->insert(out_->end(), b, b + 4);
}

void Writer::U64(uint64_t v) {
  uint8_t b[8];
  StoreLE64(b, v);
  out_->insert(out_->end(), b, b + 8);
}

void Writer::F32(float v) { U32(std::bit_cast<uint32_t>(v)); }

void Writer::F64(double v) { U64(std::bit_cast<uint64_t>(v)); }

void Writer::Bytes(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out_->insert(out_->end(), b, b + n);
}

void Writer::Str(std::string_view s) {
  U16(static_cast<uint16_t>(s.size()));
  Bytes(s.data(), s.size());
}

void Writer::LongStr(std::string_view s) {
  U32(static_cast<uint32_t>(s.size()));
  Bytes(s.data(), s.size());
}

void Writer::Meta(std::string_view name, std::span<const int64_t> shape) {
  Str(name);
  U8(static_cast<uint8_t>(DType::kFloat32));
  U8(static_cast<uint8_t>(shape.size()));
  for (int64_t d : shape) I64(d);
}

// ---- validation -------------------------------------------------------------------

Status ValidateName(std::string_view name) {
  if (name.empty()) return Status(StatusCode::kInvalidArgument, "variable name is empty");
  if (name.size() > kMaxNameLen) {
    return Status(StatusCode::kInvalidArgument, "variable name of " + std::to_string(name.size()) +
                                                    " bytes ('" + std::string(name.substr(0, 32)) +
                                                    "...') is longer than the limit of " +
                                                    std::to_string(kMaxNameLen) + " bytes");
  }
  return Status::OK();
}

std::string ShapeToString(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Status ValidateMeta(std::string_view name, std::span<const int64_t> shape, uint64_t* numel) {
  TS_RETURN_IF_ERROR(ValidateName(name));
  if (shape.size() > kMaxDims) {
    return Status(StatusCode::kInvalidArgument,
                  "variable '" + std::string(name) + "' has " + std::to_string(shape.size()) +
                      " dimensions; at most " + std::to_string(kMaxDims) + " are supported");
  }
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return Status(StatusCode::kInvalidArgument, "variable '" + std::string(name) +
                                                      "' has a negative dimension in shape " +
                                                      ShapeToString(shape));
    }
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n) || n > kMaxElements) {
      return Status(StatusCode::kInvalidArgument, "variable '" + std::string(name) + "' shape " +
                                                      ShapeToString(shape) +
                                                      " has too many elements");
    }
  }
  *numel = n;
  return Status::OK();
}

// ---- error frames -------------------------------------------------------------------

void EncodeError(const Status& status, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(status.code()));
  w.LongStr(status.message());
}

Status DecodeError(std::span<const uint8_t> payload, Status* remote) {
  Reader r(payload);
  uint32_t code;
  std::string_view msg;
  TS_RETURN_IF_ERROR(r.ReadU32(&code));
  TS_RETURN_IF_ERROR(r.ReadLongStr(&msg));
  TS_RETURN_IF_ERROR(r.Finish());
  if (code == 0) {
    *remote = Status(StatusCode::kProtocolError,
                     "peer sent an error frame with code Ok: " + std::string(msg));
  } else {
    *remote = Status(static_cast<StatusCode>(code), std::string(msg));
  }
  return Status::OK();
}

// ---- handshake ---------------------------------------------------------------------

void EncodeHello(const HelloRequest& req, std::vector<uint8_t>* out) {
  Writer w(out);
  w.Bytes(req.client_nonce.data(), kNonceSize);
  w.I32(req.partition_id);
  w.I32(req.attempt);
  w.Str(std::string_view(req.client_name).substr(0, kMaxNameLen));
  if (req.has_options) w.U32(req.options);
}

Status DecodeHello(std::span<const uint8_t> payload, HelloRequest* req) {
  Reader r(payload);
  std::string_view name;
  TS_RETURN_IF_ERROR(r.ReadNonce(&req->client_nonce));
  TS_RETURN_IF_ERROR(r.ReadI32(&req->partition_id));
  TS_RETURN_IF_ERROR(r.ReadI32(&req->attempt));
  TS_RETURN_IF_ERROR(r.ReadStr(&name));
  req->has_options = r.remaining() > 0;
  req->options = 0;
  if (req->has_options) TS_RETURN_IF_ERROR(r.ReadU32(&req->options));
  TS_RETURN_IF_ERROR(r.Finish());
  if (name.size() > kMaxNameLen) return Malformed("client name longer than 1024 bytes");
  req->client_name.assign(name);
  return Status::OK();
}

void EncodeHelloResponse(const Nonce& server_nonce, bool has_options, uint32_t accepted,
                         std::vector<uint8_t>* out) {
  Writer w(out);
  w.Bytes(server_nonce.data(), server_nonce.size());
  if (has_options) w.U32(accepted);
}

Status DecodeHelloResponse(std::span<const uint8_t> payload, bool expect_options,
                           Nonce* server_nonce, uint32_t* accepted) {
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadNonce(server_nonce));
  *accepted = 0;
  if (expect_options) TS_RETURN_IF_ERROR(r.ReadU32(accepted));
  TS_RETURN_IF_ERROR(r.Finish());
  if ((*accepted & ~kKnownOptions) != 0) {
    return Malformed("HELLO response accepts connection options unknown to this version");
  }
  return Status::OK();
}

void EncodeNonce(const Nonce& v, std::vector<uint8_t>* out) {
  Writer(out).Bytes(v.data(), v.size());
}

Status DecodeNonce(std::span<const uint8_t> payload, Nonce* v) {
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadNonce(v));
  return r.Finish();
}

void EncodeElements(uint32_t flags, const float* in, uint16_t* out, size_t n) {
  if ((flags & kFlagBf16) != 0) {
    FloatToBFloat16(in, out, n);
  } else {
    FloatToHalf(in, out, n);
  }
}

void DecodeElements(uint32_t flags, const uint16_t* in, float* out, size_t n) {
  if ((flags & kFlagBf16) != 0) {
    BFloat16ToFloat(in, out, n);
  } else {
    HalfToFloat(in, out, n);
  }
}

// ---- REGISTER / PUSH ------------------------------------------------------------------

namespace {

Status ReadTensorSection(Reader& r, TensorSection* t, size_t elem_size) {
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinMetaSize, &count));
  t->metas.clear();
  t->numels.clear();
  t->metas.resize(count);
  t->numels.resize(count);
  uint64_t total = 0;
  for (uint32_t i = 0; i < count; ++i) {
    TS_RETURN_IF_ERROR(r.ReadMeta(&t->metas[i], &t->numels[i]));
    // Saturate: 2^16 metas of 2^48 elements would wrap a plain sum to 0 and
    // pass the size check below with an empty data section.
    if (__builtin_add_overflow(total, t->numels[i], &total)) total = UINT64_MAX;
  }
  t->data_offset = r.offset();
  if (total > r.remaining() / elem_size || total * elem_size != r.remaining()) {
    return Malformed("data section has " + std::to_string(r.remaining()) +
                     " bytes but the metas describe " + std::to_string(total) + " elements of " +
                     std::to_string(elem_size) + " bytes (" +
                     (total > (uint64_t{1} << 61) ? std::string("too many")
                                                  : std::to_string(total * elem_size)) +
                     " bytes)");
  }
  t->data_len = r.remaining();
  const uint8_t* unused;
  TS_RETURN_IF_ERROR(r.ReadBytes(t->data_len, &unused));
  return r.Finish();
}

}  // namespace

Status DecodeRegister(std::span<const uint8_t> payload, TensorSection* req, size_t elem_size) {
  Reader r(payload);
  return ReadTensorSection(r, req, elem_size);
}

void EncodePushHead(const PushHead& head, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U8(head.kind);
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.U32(head.mean_window);
  w.F32(head.learning_rate);
}

Status DecodePush(std::span<const uint8_t> payload, PushHead* head, TensorSection* tensors,
                  size_t elem_size) {
  Reader r(payload);
  uint8_t pad[3];
  TS_RETURN_IF_ERROR(r.ReadU8(&head->kind));
  for (uint8_t& b : pad) TS_RETURN_IF_ERROR(r.ReadU8(&b));
  if (pad[0] != 0 || pad[1] != 0 || pad[2] != 0) {
    return Malformed("reserved bytes after the push kind must be 0");
  }
  TS_RETURN_IF_ERROR(r.ReadU32(&head->mean_window));
  TS_RETURN_IF_ERROR(r.ReadF32(&head->learning_rate));
  return ReadTensorSection(r, tensors, elem_size);
}

void EncodeRegisterResponse(const RegisterResponse& resp, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U64(resp.version);
  w.U32(static_cast<uint32_t>(resp.created.size()));
  w.Bytes(resp.created.data(), resp.created.size());
}

Status DecodeRegisterResponse(std::span<const uint8_t> payload, RegisterResponse* resp) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadU64(&resp->version));
  TS_RETURN_IF_ERROR(r.ReadCount(1, &count));
  const uint8_t* p;
  TS_RETURN_IF_ERROR(r.ReadBytes(count, &p));
  resp->created.assign(p, p + count);
  return r.Finish();
}

void EncodeVersion(uint64_t version, std::vector<uint8_t>* out) { Writer(out).U64(version); }

Status DecodeVersion(std::span<const uint8_t> payload, uint64_t* version) {
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  return r.Finish();
}

// ---- LIST / PULL --------------------------------------------------------------------------

void EncodeListResponse(uint64_t version, std::span<const VariableInfo> vars,
                        std::vector<uint8_t>* out) {
  Writer w(out);
  w.U64(version);
  w.U32(static_cast<uint32_t>(vars.size()));
  for (const VariableInfo& v : vars) w.Meta(v.name, v.shape);
}

Status DecodeListResponse(std::span<const uint8_t> payload, uint64_t* version,
                          std::vector<VariableInfo>* vars) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  TS_RETURN_IF_ERROR(r.ReadCount(kMinMetaSize, &count));
  vars->clear();
  vars->resize(count);
  for (uint32_t i = 0; i < count; ++i) TS_RETURN_IF_ERROR(r.ReadMeta(&(*vars)[i], nullptr));
  return r.Finish();
}

void EncodePullRequest(std::span<const std::string_view> names, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(names.size()));
  for (std::string_view n : names) w.Str(n);
}

Status DecodePullRequest(std::span<const uint8_t> payload, std::vector<std::string_view>* names) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(3, &count));
  names->clear();
  names->reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    std::string_view n;
    TS_RETURN_IF_ERROR(r.ReadStr(&n));
    Status s = ValidateName(n);
    if (!s.ok()) return Malformed(s.message());
    names->push_back(n);
  }
  return r.Finish();
}

Status DecodePullResponse(std::span<const uint8_t> payload, uint64_t* version,
                          std::vector<Tensor>* tensors, uint32_t flags) {
  const size_t elem = WireElementSize(flags);
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  TS_RETURN_IF_ERROR(r.ReadCount(kMinMetaSize, &count));
  tensors->clear();
  tensors->resize(count);
  std::vector<uint64_t> numels(count);
  uint64_t total = 0;
  for (uint32_t i = 0; i < count; ++i) {
    TS_RETURN_IF_ERROR(r.ReadMeta(&(*tensors)[i].info, &numels[i]));
    total += numels[i];
  }
  if (total > r.remaining() / elem || total * elem != r.remaining()) {
    return Malformed("data section size does not match the metas");
  }
  std::vector<uint16_t> enc;
  for (uint32_t i = 0; i < count; ++i) {
    const uint8_t* p;
    TS_RETURN_IF_ERROR(r.ReadBytes(numels[i] * elem, &p));
    auto& values = (*tensors)[i].values;
    values.resize(numels[i]);
    if (numels[i] == 0) continue;
    if (elem == sizeof(float)) {
      std::memcpy(values.data(), p, numels[i] * sizeof(float));
    } else {
      enc.resize(numels[i]);  // p may be unaligned
      std::memcpy(enc.data(), p, numels[i] * 2);
      DecodeElements(flags, enc.data(), values.data(), numels[i]);
    }
  }
  return r.Finish();
}

// ---- SET_OPTIMIZER -------------------------------------------------------------------------

void EncodeSetOptimizer(const OptimizerConfig& config, std::span<const std::string_view> names,
                        std::vector<uint8_t>* out) {
  Writer w(out);
  w.U8(static_cast<uint8_t>(config.kind));
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.F32(config.learning_rate);
  w.F32(config.beta1);
  w.F32(config.beta2);
  w.F32(config.epsilon);
  w.F32(config.weight_decay);
  w.F32(config.initial_accumulator);
  w.U32(static_cast<uint32_t>(names.size()));
  for (std::string_view n : names) w.Str(n);
}

Status DecodeSetOptimizer(std::span<const uint8_t> payload, OptimizerConfig* config,
                          std::vector<std::string_view>* names) {
  Reader r(payload);
  uint8_t kind;
  uint8_t pad[3];
  TS_RETURN_IF_ERROR(r.ReadU8(&kind));
  for (uint8_t& b : pad) TS_RETURN_IF_ERROR(r.ReadU8(&b));
  if (pad[0] != 0 || pad[1] != 0 || pad[2] != 0) {
    return Malformed("reserved bytes after the optimizer kind must be 0");
  }
  config->kind = static_cast<OptimizerKind>(kind);  // range checked by the server
  TS_RETURN_IF_ERROR(r.ReadF32(&config->learning_rate));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->beta1));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->beta2));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->epsilon));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->weight_decay));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->initial_accumulator));
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(3, &count));  // a str is at least 3 bytes
  names->clear();
  names->reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    std::string_view n;
    TS_RETURN_IF_ERROR(r.ReadStr(&n));
    if (Status s = ValidateName(n); !s.ok()) return Malformed(s.message());
    names->push_back(n);
  }
  return r.Finish();
}

// ---- JOIN / CONFIGURE ----------------------------------------------------------------------

void EncodeJoinResponse(uint64_t version, uint64_t clock, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U64(version);
  w.U64(clock);
}

Status DecodeJoinResponse(std::span<const uint8_t> payload, uint64_t* version, uint64_t* clock) {
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  TS_RETURN_IF_ERROR(r.ReadU64(clock));
  return r.Finish();
}

void EncodeHeartbeat(const ProgressReport* report, std::vector<uint8_t>* out) {
  if (report == nullptr) return;
  Writer w(out);
  w.U64(report->steps);
  w.U64(report->samples);
  w.F64(report->loss);
}

Status DecodeHeartbeat(std::span<const uint8_t> payload, bool* has_report, ProgressReport* report) {
  *has_report = false;
  if (payload.empty()) return Status::OK();
  // Checked up front so the message names both accepted sizes.
  if (payload.size() != kProgressReportSize) {
    return Malformed(
        "HEARTBEAT takes an empty payload or a 24-byte progress report (u64 steps, "
        "u64 samples, f64 loss), got " +
        std::to_string(payload.size()) + " bytes");
  }
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadU64(&report->steps));
  TS_RETURN_IF_ERROR(r.ReadU64(&report->samples));
  TS_RETURN_IF_ERROR(r.ReadF64(&report->loss));
  *has_report = true;
  return r.Finish();
}

void EncodeConfigure(const RunConfig& config, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U8(static_cast<uint8_t>(config.mode));
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.U32(config.staleness);
  w.F32(config.heartbeat_timeout_s);
  w.F32(config.wait_timeout_s);
}

Status DecodeConfigure(std::span<const uint8_t> payload, RunConfig* config) {
  Reader r(payload);
  uint8_t mode;
  uint8_t pad[3];
  TS_RETURN_IF_ERROR(r.ReadU8(&mode));
  for (uint8_t& b : pad) TS_RETURN_IF_ERROR(r.ReadU8(&b));
  if (pad[0] != 0 || pad[1] != 0 || pad[2] != 0) {
    return Malformed("reserved bytes after the consistency mode must be 0");
  }
  config->mode = static_cast<ConsistencyMode>(mode);  // range checked by ValidateRunConfig
  TS_RETURN_IF_ERROR(r.ReadU32(&config->staleness));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->heartbeat_timeout_s));
  TS_RETURN_IF_ERROR(r.ReadF32(&config->wait_timeout_s));
  return r.Finish();
}

Status ValidateRunConfig(const RunConfig& config) {
  if (static_cast<uint8_t>(config.mode) > 2) {
    return Status(StatusCode::kInvalidArgument,
                  "unknown consistency mode " + std::to_string(static_cast<int>(config.mode)) +
                      " (0 = async, 1 = sync rounds, 2 = bounded staleness)");
  }
  auto positive = [](float v) { return std::isfinite(v) && v > 0.0f; };
  if (!positive(config.heartbeat_timeout_s) || !positive(config.wait_timeout_s)) {
    return Status(StatusCode::kInvalidArgument,
                  "heartbeat_timeout_s and wait_timeout_s must be finite and > 0 (got " +
                      std::to_string(config.heartbeat_timeout_s) + " and " +
                      std::to_string(config.wait_timeout_s) + ")");
  }
  return Status::OK();
}

// ---- REPORT / REPORTS ----------------------------------------------------------------------

void EncodeReport(uint8_t kind, std::string_view text, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U8(kind);
  w.U8(0);
  w.U8(0);
  w.U8(0);
  w.LongStr(text);
}

Status DecodeReport(std::span<const uint8_t> payload, uint8_t* kind, std::string_view* text) {
  Reader r(payload);
  uint8_t pad[3];
  TS_RETURN_IF_ERROR(r.ReadU8(kind));
  for (uint8_t& b : pad) TS_RETURN_IF_ERROR(r.ReadU8(&b));
  if (*kind != kReportStackDump) {
    return Malformed("unknown REPORT kind " + std::to_string(*kind) + " (1 = stack dump)");
  }
  if (pad[0] != 0 || pad[1] != 0 || pad[2] != 0) {
    return Malformed("reserved bytes after the report kind must be 0");
  }
  uint32_t len;
  TS_RETURN_IF_ERROR(r.ReadU32(&len));
  // Checked before the bytes, so an oversize report gets this message.
  if (len > kMaxReportBytes) {
    return Malformed("REPORT text of " + std::to_string(len) + " bytes exceeds the limit of " +
                     std::to_string(kMaxReportBytes) + " bytes; send its last 64 KiB");
  }
  const uint8_t* p;
  TS_RETURN_IF_ERROR(r.ReadBytes(len, &p));
  *text = std::string_view(reinterpret_cast<const char*>(p), len);
  return r.Finish();
}

std::string_view ReportTail(std::string_view text) {
  if (text.size() <= kMaxReportBytes) return text;
  size_t start = text.size() - kMaxReportBytes;
  // Skip at most 3 continuation bytes (10xxxxxx) of a cut character.
  for (int i = 0; i < 3 && start < text.size() && (text[start] & 0xC0) == 0x80; ++i) ++start;
  return text.substr(start);
}

void EncodeReportsResponse(std::span<const WorkerReport> reports, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(reports.size()));
  for (const WorkerReport& r : reports) {
    w.I32(r.partition);
    w.I32(r.attempt);
    w.U64(r.clock);
    w.U64(r.steps);
    w.U64(r.progress_age_ms);
    w.U64(r.report_age_ms);
    w.LongStr(r.text);
  }
}

Status DecodeReportsResponse(std::span<const uint8_t> payload, std::vector<WorkerReport>* reports) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinReportsEntrySize, &count));
  reports->clear();
  reports->resize(count);
  for (WorkerReport& e : *reports) {
    TS_RETURN_IF_ERROR(r.ReadI32(&e.partition));
    TS_RETURN_IF_ERROR(r.ReadI32(&e.attempt));
    TS_RETURN_IF_ERROR(r.ReadU64(&e.clock));
    TS_RETURN_IF_ERROR(r.ReadU64(&e.steps));
    TS_RETURN_IF_ERROR(r.ReadU64(&e.progress_age_ms));
    TS_RETURN_IF_ERROR(r.ReadU64(&e.report_age_ms));
    std::string_view text;
    TS_RETURN_IF_ERROR(r.ReadLongStr(&text));
    if (text.size() > kMaxReportBytes) {
      return Malformed("REPORTS entry with " + std::to_string(text.size()) +
                       " bytes of text, over the limit of " + std::to_string(kMaxReportBytes));
    }
    e.text.assign(text);
  }
  return r.Finish();
}

// ---- SNAPSHOT / SNAPSHOTS / RESTORE ----------------------------------------------------------

void EncodeTagRequest(uint64_t tag, std::vector<uint8_t>* out) { Writer(out).U64(tag); }

Status DecodeTagRequest(std::span<const uint8_t> payload, uint64_t* tag) {
  if (payload.size() != kTagRequestSize) {
    return Malformed("SNAPSHOT and RESTORE take exactly a u64 tag (8 bytes), got " +
                     std::to_string(payload.size()) + " bytes");
  }
  Reader r(payload);
  TS_RETURN_IF_ERROR(r.ReadU64(tag));
  return r.Finish();
}

namespace {
Status ReadSnapshotName(Reader* r, std::string_view* name) {
  TS_RETURN_IF_ERROR(r->ReadStr(name));
  if (name->empty() || name->size() > kMaxSnapshotNameLen) {
    return Malformed("snapshot file name of " + std::to_string(name->size()) + " bytes (1.." +
                     std::to_string(kMaxSnapshotNameLen) + " allowed)");
  }
  return Status::OK();
}
}  // namespace

void EncodeSnapshotResponse(uint64_t version, std::string_view name, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U64(version);
  w.Str(name);
}

Status DecodeSnapshotResponse(std::span<const uint8_t> payload, uint64_t* version,
                              std::string* name) {
  Reader r(payload);
  std::string_view n;
  TS_RETURN_IF_ERROR(r.ReadU64(version));
  TS_RETURN_IF_ERROR(ReadSnapshotName(&r, &n));
  TS_RETURN_IF_ERROR(r.Finish());
  name->assign(n);
  return Status::OK();
}

void EncodeSnapshotsResponse(std::span<const SnapshotInfo> files, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(files.size()));
  for (const SnapshotInfo& f : files) {
    w.U64(f.tag);
    w.U64(f.version);
    w.Str(f.name);
  }
}

Status DecodeSnapshotsResponse(std::span<const uint8_t> payload, std::vector<SnapshotInfo>* files) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(kMinSnapshotsEntrySize, &count));
  if (count > kMaxListedSnapshots) {
    return Malformed("SNAPSHOTS lists " + std::to_string(count) + " files, over the limit of " +
                     std::to_string(kMaxListedSnapshots));
  }
  files->clear();
  files->resize(count);
  for (SnapshotInfo& f : *files) {
    std::string_view name;
    TS_RETURN_IF_ERROR(r.ReadU64(&f.tag));
    TS_RETURN_IF_ERROR(r.ReadU64(&f.version));
    TS_RETURN_IF_ERROR(ReadSnapshotName(&r, &name));
    f.name.assign(name);
  }
  return r.Finish();
}

// ---- STATS ---------------------------------------------------------------------------------

void EncodeStatsResponse(std::span<const StatEntry> stats, std::vector<uint8_t>* out) {
  Writer w(out);
  w.U32(static_cast<uint32_t>(stats.size()));
  for (const auto& [key, value] : stats) {
    w.Str(key);
    w.U64(value);
  }
}

Status DecodeStatsResponse(std::span<const uint8_t> payload, std::vector<StatEntry>* stats) {
  Reader r(payload);
  uint32_t count;
  TS_RETURN_IF_ERROR(r.ReadCount(10, &count));
  stats->clear();
  stats->reserve(count);
  for (uint32_t i = 0; i < count; ++i) {
    std::string_view key;
    uint64_t value;
    TS_RETURN_IF_ERROR(r.ReadStr(&key));
    TS_RETURN_IF_ERROR(r.ReadU64(&value));
    stats->emplace_back(std::string(key), value);
  }
  return r.Finish();
}

}  // namespace tensorspark::protocol
