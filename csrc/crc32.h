// CRC-32 as zlib.crc32 computes it (reflected polynomial 0xEDB88320, initial and final inversion), so the
// Python writer (zlib) and this reader agree on every record's checksum without a shared library.
#pragma once

#include <cstddef>
#include <cstdint>

namespace regionstore {

// crc32(data, len, crc) == zlib.crc32(data, crc): chaining works the same way.
uint32_t crc32(const void* data, size_t len, uint32_t crc = 0);

// Copies `len` bytes from src to dst and returns crc32(src, len, crc), reading src once: the verification of
// a record costs nothing beyond the copy. With `stream`, 16-byte aligned destinations get non-temporal
// stores (see copy.h; call stream_fence() after a run of copies).
uint32_t crc32_copy(void* dst, const void* src, size_t len, uint32_t crc, bool stream);

// The table-driven path alone (slicing by 8); the tests compare both paths on the same bytes.
uint32_t crc32_portable(const void* data, size_t len, uint32_t crc = 0);

// Whether crc32() uses carry-less multiplication (PCLMULQDQ) on this CPU.
bool crc32_accelerated();

}  // namespace regionstore
