// CRC-32C (Castagnoli), as used for frame checksums in wire protocol v1.
//
// Uses Intel ISA-L's crc32_iscsi (PCLMULQDQ / VPCLMULQDQ folding, chosen at
// run time) when the build found libisal; otherwise the SSE4.2 crc32
// instruction (three interleaved streams) when the CPU has it, and a
// slicing-by-8 table last. Thread-safe; no setup needed.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tensorspark::protocol {

// Extends `crc` (the CRC of the bytes so far; 0 for none) with `n` more bytes:
// Crc32c(a ‖ b) == Crc32cExtend(Crc32c(a), b).
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t n);

inline uint32_t Crc32c(const void* data, size_t n) { return Crc32cExtend(0, data, n); }

// CRC of a ‖ b from crc_a = Crc32c(a), crc_b = Crc32c(b) and len_b = |b|,
// without touching the data: O(log len_b).
uint32_t Crc32cCombine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// For tests and benchmarks: the slicing-by-8 code; the built-in code
// (SSE4.2 when the CPU has it, else slicing-by-8), which Crc32cExtend uses
// without ISA-L; whether that one uses SSE4.2; and the name of what
// Crc32cExtend runs: "isa-l", "sse4.2" or "portable".
uint32_t Crc32cExtendPortable(uint32_t crc, const void* data, size_t n);
uint32_t Crc32cExtendBuiltin(uint32_t crc, const void* data, size_t n);
bool Crc32cHardwareEnabled();
const char* Crc32cImplementation();

}  // namespace tensorspark::protocol
