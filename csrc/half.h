// IEEE half -> single precision for the fp32 outputs (features, soft labels, boxes), with the widest
// conversion instructions the CPU has, picked at run time so the wheel stays portable.
#pragma once

#include <cstddef>
#include <cstdint>

namespace regionstore {

// dst[i] = float(src[i]) for i < n; exact (every half is a float), NaN payloads kept. With `stream`, the
// aligned middle of dst is written with non-temporal stores (see copy.h; call stream_fence() after a run).
void half_to_float(const uint16_t* src, float* dst, size_t n, bool stream = false);

// The scalar conversion, for the tests and for CPUs without F16C.
float half_to_float_scalar(uint16_t h);

// "avx512f", "f16c" or "scalar": what half_to_float uses here.
const char* half_to_float_impl();

}  // namespace regionstore
