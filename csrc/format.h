// The on-disk layout of a region store, version 1 (docs/region-store.md is the prose version of this file and
// uniter_fast/data/region_store.py the writer's). All integers little-endian, every record 64-byte aligned.
#pragma once

#include <cstdint>
#include <cstring>

namespace regionstore {
namespace format {

constexpr uint32_t kVersion = 1;
constexpr uint64_t kAlign = 64;          // records and the sections inside them start on 64-byte boundaries
constexpr uint64_t kHeaderBytes = 64;    // shard header and index header
constexpr uint64_t kRecordHeaderBytes = 32;
constexpr char kShardMagic[8] = {'U', 'F', 'R', 'E', 'G', 'S', 'H', 'D'};
constexpr char kIndexMagic[8] = {'U', 'F', 'R', 'E', 'G', 'I', 'D', 'X'};
constexpr char kRecordMagic[4] = {'U', 'F', 'R', 'R'};

enum Flags : uint32_t {
  kSoftLabels = 1u << 0,  // records carry n x C fp16 soft labels
  kBoxesFp32 = 1u << 1,   // norm_bb stored fp32 (else fp16)
  kConfFp32 = 1u << 2,    // conf stored fp32 (else fp16)
  kKnownFlags = kSoftLabels | kBoxesFp32 | kConfFp32,
};

// Byte offsets of one record's sections, from the start of the record.
struct Layout {
  uint64_t features;
  uint64_t norm_bb;
  uint64_t conf;
  uint64_t soft_labels;  // 0 when the store has none
  uint64_t main_end;     // where the first checksum's range ends: soft_labels, or nbytes without them
  uint64_t nbytes;       // the whole record, padding included
};

inline uint64_t align_up(uint64_t x) { return (x + kAlign - 1) & ~(kAlign - 1); }

inline Layout record_layout(uint64_t n, uint64_t id_len, uint64_t feature_dim, uint64_t label_dim, uint32_t flags) {
  Layout l{};
  l.features = align_up(kRecordHeaderBytes + id_len);
  l.norm_bb = align_up(l.features + n * feature_dim * 2);
  l.conf = align_up(l.norm_bb + n * 6 * ((flags & kBoxesFp32) ? 4 : 2));
  uint64_t end = l.conf + n * ((flags & kConfFp32) ? 4 : 2);
  if (flags & kSoftLabels) {
    l.soft_labels = align_up(end);
    end = l.soft_labels + n * label_dim * 2;
  }
  l.nbytes = align_up(end);
  l.main_end = (flags & kSoftLabels) ? l.soft_labels : l.nbytes;
  return l;
}

// One row of the index's record table, exactly as stored (40 bytes, naturally aligned, no padding).
// Two checksums per record, so that reading without soft labels (most tasks) never has to read them to
// verify: `crc` covers the record's bytes [8, main_end) (header fields after the crc, id, features, boxes,
// conf, padding), `crc_soft` covers [soft_labels, nbytes) and is 0 in stores without soft labels.
struct IndexEntry {
  uint64_t offset;    // of the record in its shard
  uint64_t nbytes;    // of the record
  uint32_t shard;
  uint32_t n;         // regions
  uint32_t crc;
  uint32_t crc_soft;
  uint32_t id_len;    // bytes of the UTF-8 image id in the id table
  uint32_t reserved;  // 0
};
static_assert(sizeof(IndexEntry) == 40, "the index row is 40 bytes on disk");

template <typename T>
inline T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace format
}  // namespace regionstore
