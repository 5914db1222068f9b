// Bulk copies into batch buffers. A batch (tens of MB) is written once and read later by someone else, so
// the large copies use non-temporal stores: they skip the read-for-ownership of each destination line,
// which on this hardware is a third of the memory traffic of an ordinary memcpy.
#pragma once

#include <cstddef>
#include <cstdint>

namespace regionstore {

// memcpy(dst, src, n), streaming stores for the aligned middle when `stream` and the CPU has AVX2/AVX-512.
void copy_bytes(void* dst, const void* src, size_t n, bool stream);

// Orders this thread's streaming stores before whatever it does next (call once after a run of copies).
void stream_fence();

// "avx512f", "avx2" or "memcpy": what copy_bytes streams with here.
const char* copy_impl();

}  // namespace regionstore
