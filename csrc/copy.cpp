#include "copy.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define REGIONSTORE_X86 1
#endif

namespace regionstore {
namespace {

void copy_plain(uint8_t* dst, const uint8_t* src, size_t n) { std::memcpy(dst, src, n); }

#ifdef REGIONSTORE_X86

// Ordinary stores up to the first `align`-byte boundary of dst; returns how many bytes that took.
inline size_t head_to_alignment(uint8_t* dst, const uint8_t* src, size_t n, size_t align) {
  size_t head = (align - reinterpret_cast<uintptr_t>(dst) % align) % align;
  if (head > n) head = n;
  std::memcpy(dst, src, head);
  return head;
}

__attribute__((target("avx512f"))) void copy_avx512(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t done = head_to_alignment(dst, src, n, 64);
  dst += done, src += done, n -= done;
  for (; n >= 256; n -= 256, dst += 256, src += 256) {
    __m512i a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 64);
    __m512i c = _mm512_loadu_si512(src + 128), d = _mm512_loadu_si512(src + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + 192), d);
  }
  for (; n >= 64; n -= 64, dst += 64, src += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
  std::memcpy(dst, src, n);
}

__attribute__((target("avx2"))) void copy_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t done = head_to_alignment(dst, src, n, 32);
  dst += done, src += done, n -= done;
  for (; n >= 128; n -= 128, dst += 128, src += 128) {
    __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32));
    __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 64));
    __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + 96), d);
  }
  for (; n >= 32; n -= 32, dst += 32, src += 32)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  std::memcpy(dst, src, n);
}

struct Choice {
  void (*fn)(uint8_t*, const uint8_t*, size_t);
  const char* name;
};

Choice choose() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {copy_avx512, "avx512f"};
  if (__builtin_cpu_supports("avx2")) return {copy_avx2, "avx2"};
  return {copy_plain, "memcpy"};
}

#else

struct Choice {
  void (*fn)(uint8_t*, const uint8_t*, size_t);
  const char* name;
};

Choice choose() { return {copy_plain, "memcpy"}; }

#endif

const Choice kChoice = choose();

}  // namespace

void copy_bytes(void* dst, const void* src, size_t n, bool stream) {
  if (stream)
    kChoice.fn(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n);
  else
    std::memcpy(dst, src, n);
}

void stream_fence() {
#ifdef REGIONSTORE_X86
  _mm_sfence();
#endif
}

const char* copy_impl() { return kChoice.name; }

}  // namespace regionstore
