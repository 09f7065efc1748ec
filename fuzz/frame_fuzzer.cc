// libFuzzer target: the frame header codec and every payload decoder of
// protocol/messages.h, on each frame of the input (format: fuzz_input.h).
//
// Besides the sanitizers, each successful decode is checked by re-encoding:
// the wire formats are canonical, so the bytes must come back unchanged.
// The hardware CRC-32C is checked against the portable one and Combine.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_input.h"
#include "protocol/crc32c.h"
#include "protocol/frame.h"
#include "protocol/messages.h"
#include "protocol/table_messages.h"
#include "storage/sparse_table.h"

namespace tensorspark::fuzz {
namespace {

using Bytes = std::vector<uint8_t>;
using Span = std::span<const uint8_t>;

[[noreturn]] void Fail(const char* what) {
  std::fprintf(stderr, "frame_fuzzer: %s\n", what);
  std::abort();
}

void Expect(bool ok, const char* what) {
  if (!ok) Fail(what);
}

bool Same(Span a, Span b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// Metas of a decoded tensor section, re-encoded after `prefix`, plus its data.
void CheckTensorSection(Span payload, const Bytes& prefix, const protocol::TensorSection& t) {
  Expect(t.metas.size() == t.numels.size(), "metas and numels differ in length");
  Expect(t.data_offset + t.data_len == payload.size(), "data section does not end the payload");
  uint64_t total = 0;
  Bytes enc = prefix;
  protocol::Writer w(&enc);
  w.U32(static_cast<uint32_t>(t.metas.size()));
  for (size_t i = 0; i < t.metas.size(); ++i) {
    uint64_t n = 1;
    for (int64_t d : t.metas[i].shape) {
      Expect(d >= 0, "negative dimension accepted");
      Expect(!__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n), "numel overflow accepted");
    }
    Expect(n == t.numels[i], "numel is not the product of the shape");
    Expect(!__builtin_add_overflow(total, n, &total), "element sum overflow accepted");
    w.Meta(t.metas[i].name, t.metas[i].shape);
  }
  Expect(total <= t.data_len / sizeof(float) && total * sizeof(float) == t.data_len,
         "data section size does not match the metas");
  Expect(enc.size() == t.data_offset, "data_offset is not the end of the metas");
  Expect(Same(enc, payload.first(t.data_offset)), "tensor section does not re-encode");
}

void DecodeEverything(Span p) {
  {
    Status remote;
    if (protocol::DecodeError(p, &remote).ok()) {
      Expect(!remote.ok(), "error frame decoded as OK");
      if (protocol::LoadLE32(p.data()) != 0) {
        Bytes enc;
        protocol::EncodeError(remote, &enc);
        Expect(Same(enc, p), "error payload does not re-encode");
      }
      (void)remote.ToString();
    }
  }
  {
    protocol::HelloRequest hello;
    if (protocol::DecodeHello(p, &hello).ok()) {
      Bytes enc;
      protocol::EncodeHello(hello, &enc);
      Expect(Same(enc, p), "HELLO does not re-encode");
    }
  }
  for (bool with_options : {false, true}) {
    protocol::Nonce nonce;
    uint32_t accepted = 0;
    if (protocol::DecodeHelloResponse(p, with_options, &nonce, &accepted).ok()) {
      Expect((accepted & ~protocol::kKnownOptions) == 0, "HELLO response accepts unknown options");
      Bytes enc;
      protocol::EncodeHelloResponse(nonce, with_options, accepted, &enc);
      Expect(Same(enc, p), "HELLO response does not re-encode");
    }
  }
  {
    protocol::Nonce nonce;
    if (protocol::DecodeNonce(p, &nonce).ok()) {
      Bytes enc;
      protocol::EncodeNonce(nonce, &enc);
      Expect(Same(enc, p), "nonce does not re-encode");
    }
  }
  {
    protocol::TensorSection t;
    if (protocol::DecodeRegister(p, &t).ok()) CheckTensorSection(p, {}, t);
  }
  {
    protocol::PushHead head;
    protocol::TensorSection t;
    if (protocol::DecodePush(p, &head, &t).ok()) {
      Bytes enc;
      protocol::EncodePushHead(head, &enc);
      Expect(enc.size() == protocol::kPushHeadSize, "push head size");
      CheckTensorSection(p, enc, t);
    }
  }
  {
    // fp16/bf16 data sections (2 bytes per element): the layout checks.
    protocol::PushHead head;
    protocol::TensorSection t;
    if (protocol::DecodeRegister(p, &t, 2).ok() || protocol::DecodePush(p, &head, &t, 2).ok()) {
      uint64_t total = 0;
      for (uint64_t n : t.numels) total += n;
      Expect(t.data_len == total * 2 && t.data_offset + t.data_len == p.size(),
             "encoded data section size");
    }
    uint64_t version;
    std::vector<Tensor> tensors;
    (void)protocol::DecodePullResponse(p, &version, &tensors, protocol::kFlagFp16);
  }
  {
    protocol::RegisterResponse r;
    if (protocol::DecodeRegisterResponse(p, &r).ok()) {
      Bytes enc;
      protocol::EncodeRegisterResponse(r, &enc);
      Expect(Same(enc, p), "REGISTER response does not re-encode");
    }
  }
  {
    uint64_t version;
    if (protocol::DecodeVersion(p, &version).ok()) {
      Bytes enc;
      protocol::EncodeVersion(version, &enc);
      Expect(Same(enc, p), "version does not re-encode");
    }
  }
  {
    uint64_t version;
    std::vector<VariableInfo> vars;
    if (protocol::DecodeListResponse(p, &version, &vars).ok()) {
      Bytes enc;
      protocol::EncodeListResponse(version, vars, &enc);
      Expect(Same(enc, p), "LIST response does not re-encode");
    }
  }
  {
    std::vector<std::string_view> names;
    if (protocol::DecodePullRequest(p, &names).ok()) {
      Bytes enc;
      protocol::EncodePullRequest(names, &enc);
      Expect(Same(enc, p), "PULL request does not re-encode");
    }
  }
  {
    uint64_t version;
    std::vector<Tensor> tensors;
    if (protocol::DecodePullResponse(p, &version, &tensors).ok()) {
      std::vector<VariableInfo> infos;
      for (const Tensor& t : tensors) infos.push_back(t.info);
      Bytes enc;
      protocol::EncodeListResponse(version, infos, &enc);
      protocol::Writer w(&enc);
      for (const Tensor& t : tensors) w.Bytes(t.values.data(), t.values.size() * sizeof(float));
      Expect(Same(enc, p), "PULL response does not re-encode");
    }
  }
  {
    std::vector<StatEntry> stats;
    if (protocol::DecodeStatsResponse(p, &stats).ok()) {
      Bytes enc;
      protocol::EncodeStatsResponse(stats, &enc);
      Expect(Same(enc, p), "STATS response does not re-encode");
    }
  }
  {
    uint64_t version, clock;
    if (protocol::DecodeJoinResponse(p, &version, &clock).ok()) {
      Bytes enc;
      protocol::EncodeJoinResponse(version, clock, &enc);
      Expect(Same(enc, p), "JOIN response does not re-encode");
    }
  }
  {
    bool has_report = false;
    protocol::ProgressReport report;
    if (protocol::DecodeHeartbeat(p, &has_report, &report).ok()) {
      Bytes enc;
      protocol::EncodeHeartbeat(has_report ? &report : nullptr, &enc);
      Expect(Same(enc, p), "HEARTBEAT does not re-encode");
    }
  }
  {
    uint8_t kind = 0;
    std::string_view text;
    if (protocol::DecodeReport(p, &kind, &text).ok()) {
      Expect(text.size() <= protocol::kMaxReportBytes, "REPORT over the limit accepted");
      Bytes enc;
      protocol::EncodeReport(kind, text, &enc);
      Expect(Same(enc, p), "REPORT does not re-encode");
    }
  }
  {
    std::vector<WorkerReport> reports;
    if (protocol::DecodeReportsResponse(p, &reports).ok()) {
      Bytes enc;
      protocol::EncodeReportsResponse(reports, &enc);
      Expect(Same(enc, p), "REPORTS response does not re-encode");
    }
  }
  {
    uint64_t tag;
    if (protocol::DecodeTagRequest(p, &tag).ok()) {
      Bytes enc;
      protocol::EncodeTagRequest(tag, &enc);
      Expect(Same(enc, p), "SNAPSHOT/RESTORE request does not re-encode");
    }
  }
  {
    uint64_t version;
    std::string name;
    if (protocol::DecodeSnapshotResponse(p, &version, &name).ok()) {
      Expect(!name.empty() && name.size() <= protocol::kMaxSnapshotNameLen,
             "SNAPSHOT response name length accepted");
      Bytes enc;
      protocol::EncodeSnapshotResponse(version, name, &enc);
      Expect(Same(enc, p), "SNAPSHOT response does not re-encode");
    }
  }
  {
    std::vector<SnapshotInfo> files;
    if (protocol::DecodeSnapshotsResponse(p, &files).ok()) {
      Expect(files.size() <= protocol::kMaxListedSnapshots, "SNAPSHOTS over the limit accepted");
      Bytes enc;
      protocol::EncodeSnapshotsResponse(files, &enc);
      Expect(Same(enc, p), "SNAPSHOTS response does not re-encode");
    }
  }
  // Sparse tables (opcodes 19-23): what decodes must re-encode to the
  // same bytes.
  {
    std::vector<TableConfig> tables;
    if (protocol::DecodeTableCreate(p, &tables).ok()) {
      Bytes enc;
      protocol::EncodeTableCreate(tables, &enc);
      Expect(Same(enc, p), "TABLE_CREATE does not re-encode");
      for (const TableConfig& t : tables) (void)storage::ValidateTableConfig(t);
    }
    std::vector<uint8_t> created;
    if (protocol::DecodeTableCreateResponse(p, &created).ok()) {
      Bytes enc;
      protocol::EncodeTableCreateResponse(created, &enc);
      Expect(Same(enc, p), "TABLE_CREATE response does not re-encode");
    }
    std::vector<TableInfo> infos;
    if (protocol::DecodeListTablesResponse(p, &infos).ok()) {
      Bytes enc;
      protocol::EncodeListTablesResponse(infos, &enc);
      Expect(Same(enc, p), "LIST_TABLES response does not re-encode");
    }
  }
  {
    std::vector<protocol::RowsSection> sections;
    if (protocol::DecodePullRowsRequest(p, &sections).ok()) {
      std::vector<std::vector<int64_t>> ids(sections.size());
      std::vector<protocol::PullRowsItem> items;
      for (size_t i = 0; i < sections.size(); ++i) {
        ids[i].resize(sections[i].n);
        protocol::CopyIds(sections[i], ids[i].data());
        items.push_back({sections[i].table, ids[i]});
      }
      Bytes enc;
      protocol::EncodePullRowsRequest(items, &enc);
      Expect(Same(enc, p), "PULL_ROWS request does not re-encode");
    }
    uint8_t kind;
    float lr;
    if (protocol::DecodePushRows(p, &kind, &lr, &sections).ok()) {
      std::vector<std::vector<int64_t>> ids(sections.size());
      std::vector<std::vector<float>> values(sections.size());
      std::vector<protocol::PushRowsItem> items;
      for (size_t i = 0; i < sections.size(); ++i) {
        ids[i].resize(sections[i].n);
        values[i].resize(size_t{sections[i].n} * sections[i].dim);
        protocol::CopyIds(sections[i], ids[i].data());
        protocol::CopyValues(sections[i], values[i].data());
        items.push_back({sections[i].table, sections[i].dim, ids[i], values[i]});
      }
      Bytes enc;
      protocol::EncodePushRows(kind, lr, items, &enc);
      Expect(Same(enc, p), "PUSH_ROWS does not re-encode");
    }
    uint64_t version;
    std::vector<protocol::RowsBlock> blocks;
    (void)protocol::DecodePullRowsResponse(p, &version, &blocks);
    std::string_view table;
    uint64_t cursor;
    uint32_t max_rows;
    if (protocol::DecodeExportRowsRequest(p, &table, &cursor, &max_rows).ok()) {
      Bytes enc;
      protocol::EncodeExportRowsRequest(table, cursor, max_rows, &enc);
      Expect(Same(enc, p), "EXPORT_ROWS request does not re-encode");
    }
    protocol::RowsBlock rows;
    (void)protocol::DecodeExportRowsResponse(p, &cursor, &rows);
  }
  {
    RunConfig config;
    if (protocol::DecodeConfigure(p, &config).ok()) {
      Bytes enc;
      protocol::EncodeConfigure(config, &enc);
      Expect(Same(enc, p), "CONFIGURE does not re-encode");
      (void)protocol::ValidateRunConfig(config);
    }
  }
}

void CheckCrc(Span p) {
  const uint32_t crc = protocol::Crc32c(p.data(), p.size());
  Expect(crc == protocol::Crc32cExtendPortable(0, p.data(), p.size()),
         "hardware and portable CRC-32C differ");
  const size_t split = p.empty() ? 0 : p[0] % (p.size() + 1);
  const uint32_t a = protocol::Crc32c(p.data(), split);
  const uint32_t b = protocol::Crc32c(p.data() + split, p.size() - split);
  Expect(protocol::Crc32cCombine(a, b, p.size() - split) == crc, "Crc32cCombine is wrong");
}

}  // namespace
}  // namespace tensorspark::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace tensorspark;
  fuzz::FuzzInput in = fuzz::ParseFuzzInput(data, size);
  for (const fuzz::FrameSpan& f : in.frames) {
    const uint8_t* raw = in.stream.data() + f.header;
    protocol::FrameHeader h = protocol::DecodeHeader(raw);
    uint8_t again[protocol::kHeaderSize];
    protocol::EncodeHeader(h, again);
    fuzz::Expect(std::memcmp(raw, again, sizeof(again)) == 0, "header does not re-encode");
    (void)protocol::OpcodeName(h.opcode);
    (void)protocol::CheckFlags(h);
    (void)protocol::ValidateHeader(h, uint64_t{1} << 31);
    (void)protocol::ValidateHeader(h, 64);
    std::span<const uint8_t> payload(in.stream.data() + f.payload, f.size);
    fuzz::DecodeEverything(payload);
    fuzz::CheckCrc(payload);
  }
  return 0;
}
