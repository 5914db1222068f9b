// fp16 -> fp32 conversion. numpy's conversion is about 10x slower than the hardware's (reference/loader.md),
// which is one reason the original loader is slow; the hardware converts 8 (F16C) or 16 (AVX-512) at a time.
#include "half.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define REGIONSTORE_X86 1
#endif

// GCC 12's AVX-512 header initialises an "undefined" vector from itself and then warns about it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace regionstore {

float half_to_float_scalar(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {  // inf or NaN: keep the payload
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal half: normalise it, every one is a normal float
    int shift = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3FFu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

namespace {

using Convert = void (*)(const uint16_t*, float*, size_t);

void convert_scalar(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = half_to_float_scalar(src[i]);
}

// Scalar conversion up to the first `align`-byte boundary of dst; returns how many values that took.
inline size_t head_to_alignment(const uint16_t* src, float* dst, size_t n, size_t align) {
  size_t head = ((align - reinterpret_cast<uintptr_t>(dst) % align) % align) / sizeof(float);
  if (head > n) head = n;
  convert_scalar(src, dst, head);
  return head;
}

#ifdef REGIONSTORE_X86

__attribute__((target("avx,f16c"))) void convert_f16c(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  convert_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c"))) void convert_f16c_stream(const uint16_t* src, float* dst, size_t n) {
  size_t i = head_to_alignment(src, dst, n, 32);
  for (; i + 8 <= n; i += 8)
    _mm256_stream_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  convert_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx512f,avx,f16c"))) void convert_avx512(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two vectors per step keep both load ports busy
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(a));
    _mm512_storeu_ps(dst + i + 16, _mm512_cvtph_ps(b));
  }
  convert_f16c(src + i, dst + i, n - i);
}

__attribute__((target("avx512f,avx,f16c"))) void convert_avx512_stream(const uint16_t* src, float* dst, size_t n) {
  size_t i = head_to_alignment(src, dst, n, 64);
  for (; i + 32 <= n; i += 32) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16));
    _mm512_stream_ps(dst + i, _mm512_cvtph_ps(a));
    _mm512_stream_ps(dst + i + 16, _mm512_cvtph_ps(b));
  }
  for (; i + 16 <= n; i += 16)
    _mm512_stream_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  convert_f16c(src + i, dst + i, n - i);
}

struct Choice {
  Convert plain, stream;
  const char* name;
};

Choice choose() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c"))
    return {convert_avx512, convert_avx512_stream, "avx512f"};
  if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"))
    return {convert_f16c, convert_f16c_stream, "f16c"};
  return {convert_scalar, convert_scalar, "scalar"};
}

#else

struct Choice {
  Convert plain, stream;
  const char* name;
};

Choice choose() { return {convert_scalar, convert_scalar, "scalar"}; }

#endif

const Choice kChoice = choose();

}  // namespace

void half_to_float(const uint16_t* src, float* dst, size_t n, bool stream) {
  (stream ? kChoice.stream : kChoice.plain)(src, dst, n);
}

const char* half_to_float_impl() { return kChoice.name; }

}  // namespace regionstore
