// CRC-32 (zlib's): a slicing-by-8 table path that runs anywhere, and a carry-less multiplication path for x86
// CPUs with PCLMULQDQ, chosen at run time so that the wheel stays portable (no -march flags).
//
// The fast path folds 64-byte blocks into four 128-bit accumulators (Gopal et al., "Fast CRC computation for
// generic polynomials using PCLMULQDQ", Intel 2009): folding an accumulator forward by d bits is a multiply of
// its two halves by x^(d+32) mod P and x^(d-32) mod P (bit-reflected), so the constants below are properties
// of the polynomial, not tuning.
#include "crc32.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define REGIONSTORE_X86 1
#endif


namespace regionstore {
namespace {

constexpr uint32_t kPolynomial = 0xEDB88320u;  // CRC-32/ISO-HDLC, reflected

struct Tables {
  uint32_t t[8][256];
};

Tables make_tables() {
  Tables tables{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int bit = 0; bit < 8; ++bit) c = (c & 1u) ? (c >> 1) ^ kPolynomial : c >> 1;
    tables.t[0][i] = c;
  }
  // t[k][i]: the effect of byte i followed by k zero bytes, so eight bytes are folded in one step.
  for (uint32_t i = 0; i < 256; ++i)
    for (int k = 1; k < 8; ++k)
      tables.t[k][i] = (tables.t[k - 1][i] >> 8) ^ tables.t[0][tables.t[k - 1][i] & 0xFFu];
  return tables;
}

const Tables kTables = make_tables();

// `state` is the running register (already inverted); returns the register after `data`.
uint32_t update_tables(uint32_t state, const uint8_t* data, size_t len) {
  const auto& t = kTables.t;
  while (len >= 8) {
    uint64_t word;
    std::memcpy(&word, data, 8);  // little-endian host (checked at module load)
    word ^= state;
    state = t[7][word & 0xFF] ^ t[6][(word >> 8) & 0xFF] ^ t[5][(word >> 16) & 0xFF] ^
            t[4][(word >> 24) & 0xFF] ^ t[3][(word >> 32) & 0xFF] ^ t[2][(word >> 40) & 0xFF] ^
            t[1][(word >> 48) & 0xFF] ^ t[0][word >> 56];
    data += 8;
    len -= 8;
  }
  while (len--) state = t[0][(state ^ *data++) & 0xFF] ^ (state >> 8);
  return state;
}

#ifdef REGIONSTORE_X86

#define REGIONSTORE_CLMUL_TARGET __attribute__((target("pclmul,sse4.1")))

REGIONSTORE_CLMUL_TARGET inline __m128i load16(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// acc folded forward over the distance encoded in k, then the block that lies there added in.
REGIONSTORE_CLMUL_TARGET inline __m128i fold(__m128i acc, __m128i k, __m128i block) {
  __m128i low = _mm_clmulepi64_si128(acc, k, 0x00);
  __m128i high = _mm_clmulepi64_si128(acc, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(low, high), block);
}

constexpr size_t kPrefetchAhead = 1024;

// What update_clmul does with the blocks it reads besides folding them: nothing, or copy them to `out`.
enum class Store { kNone, kCopy, kStream };

template <Store kStore>
REGIONSTORE_CLMUL_TARGET inline void put16(uint8_t* out, __m128i block) {
  if constexpr (kStore == Store::kCopy) _mm_storeu_si128(reinterpret_cast<__m128i*>(out), block);
  if constexpr (kStore == Store::kStream) _mm_stream_si128(reinterpret_cast<__m128i*>(out), block);
}

template <Store kStore>
REGIONSTORE_CLMUL_TARGET inline __m128i take16(const uint8_t* p, uint8_t* out) {
  __m128i block = load16(p);
  put16<kStore>(out, block);
  return block;
}

const __m128i kFold512 = _mm_set_epi64x(0x1C6E41596LL, 0x154442BD4LL);   // fold by four blocks
const __m128i kFold128 = _mm_set_epi64x(0x0CCAA009ELL, 0x1751997D0LL);   // fold by one block
const __m128i kFold64 = _mm_set_epi64x(0, 0x163CD6124LL);                // 64 -> 32 bits
const __m128i kBarrett = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);   // mu (high), P (low)

// The four accumulators folded into one, the remaining 16-byte blocks (len % 16 == 0) folded in, and the
// result reduced to the 32-bit register.
template <Store kStore>
REGIONSTORE_CLMUL_TARGET uint32_t finish_clmul(__m128i a0, __m128i a1, __m128i a2, __m128i a3, const uint8_t* data,
                                               size_t len, uint8_t* out) {
  const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
  a0 = fold(a0, kFold128, a1);
  a0 = fold(a0, kFold128, a2);
  a0 = fold(a0, kFold128, a3);
  while (len >= 16) {
    a0 = fold(a0, kFold128, take16<kStore>(data, out));
    data += 16;
    out += kStore == Store::kNone ? 0 : 16;
    len -= 16;
  }
  // 128 -> 64 bits: the low half moves up by 64 bits onto the high half.
  __m128i t = _mm_clmulepi64_si128(a0, kFold128, 0x10);
  a0 = _mm_xor_si128(_mm_srli_si128(a0, 8), t);
  // 64 -> 32 bits (plus the 32 that Barrett reduction consumes).
  t = _mm_srli_si128(a0, 4);
  a0 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(a0, low32), kFold64, 0x00), t);
  // Barrett reduction to the 32-bit remainder.
  t = _mm_clmulepi64_si128(_mm_and_si128(a0, low32), kBarrett, 0x10);
  t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), kBarrett, 0x00);
  a0 = _mm_xor_si128(a0, t);
  return static_cast<uint32_t>(_mm_extract_epi32(a0, 1));
}

// Requires len >= 64 and len % 16 == 0; `state` as in update_tables. With kStore != kNone the bytes read
// are also written to `out` (16-byte aligned for kStream).
template <Store kStore>
REGIONSTORE_CLMUL_TARGET uint32_t update_clmul(uint32_t state, const uint8_t* data, size_t len, uint8_t* out) {
  __m128i a0 = _mm_xor_si128(take16<kStore>(data, out), _mm_cvtsi32_si128(static_cast<int>(state)));
  __m128i a1 = take16<kStore>(data + 16, out + 16), a2 = take16<kStore>(data + 32, out + 32);
  __m128i a3 = take16<kStore>(data + 48, out + 48);
  data += 64;
  out += kStore == Store::kNone ? 0 : 64;
  len -= 64;
  while (len >= 64) {
    // The fold chains keep few loads in flight; asking for the data ahead keeps memory busy (+40% from DRAM).
    _mm_prefetch(reinterpret_cast<const char*>(data) + kPrefetchAhead, _MM_HINT_T0);
    a0 = fold(a0, kFold512, take16<kStore>(data, out));
    a1 = fold(a1, kFold512, take16<kStore>(data + 16, out + 16));
    a2 = fold(a2, kFold512, take16<kStore>(data + 32, out + 32));
    a3 = fold(a3, kFold512, take16<kStore>(data + 48, out + 48));
    data += 64;
    out += kStore == Store::kNone ? 0 : 64;
    len -= 64;
  }
  return finish_clmul<kStore>(a0, a1, a2, a3, data, len, out);
}

bool detect_clmul() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

const bool kHasClmul = detect_clmul();

#else

const bool kHasClmul = false;

#endif

}  // namespace

uint32_t crc32_portable(const void* data, size_t len, uint32_t crc) {
  return ~update_tables(~crc, static_cast<const uint8_t*>(data), len);
}

uint32_t crc32(const void* data, size_t len, uint32_t crc) {
  const auto* bytes = static_cast<const uint8_t*>(data);
  uint32_t state = ~crc;
#ifdef REGIONSTORE_X86
  if (kHasClmul && len >= 64) {
    size_t blocks = len & ~static_cast<size_t>(15);
    state = update_clmul<Store::kNone>(state, bytes, blocks, nullptr);
    bytes += blocks;
    len -= blocks;
  }
#endif
  return ~update_tables(state, bytes, len);
}

uint32_t crc32_copy(void* dst, const void* src, size_t len, uint32_t crc, bool stream) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
#ifdef REGIONSTORE_X86
  if (kHasClmul && len >= 64) {
    size_t blocks = len & ~static_cast<size_t>(15);
    uint32_t state = ~crc;
    if (stream && reinterpret_cast<uintptr_t>(out) % 16 == 0)
      state = update_clmul<Store::kStream>(state, in, blocks, out);
    else
      state = update_clmul<Store::kCopy>(state, in, blocks, out);
    std::memcpy(out + blocks, in + blocks, len - blocks);
    return ~update_tables(state, in + blocks, len - blocks);
  }
#endif
  (void)stream;
  std::memcpy(out, in, len);
  return crc32(in, len, crc);
}

bool crc32_accelerated() { return kHasClmul; }

}  // namespace regionstore
