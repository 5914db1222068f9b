// uniter_fast._regionstore: reads a region store (docs/region-store.md) by memory-mapping its shards and
// gathering batches of records straight into caller-owned buffers laid out as the packed batch.
//
// No torch here: outputs arrive through the buffer protocol (torch tensor -> numpy view), so the extension
// does not depend on the torch ABI. Python resolves image ids to index positions; this file owns the index
// parsing, the mappings, the checks and the copies.
//
// Concurrency model. Every entry point starts with the GIL held: that is when the index is consulted, shards
// are mapped and the per-process state is reset after a fork, so none of it needs a lock. The GIL is then
// released for the copies and checksums, which only read the mappings and write the caller's buffers (and set
// bits of the verified set atomically). No mutex exists that a fork could leave locked.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "copy.h"
#include "crc32.h"
#include "format.h"
#include "half.h"

namespace py = pybind11;
namespace fmt = regionstore::format;

namespace {

// Raised as uniter_fast._regionstore.RegionStoreError (a ValueError): a broken index or shard header.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Raised as CorruptRecordError (a RegionStoreError): one record is damaged, truncated or not what the index says.
struct CorruptRecord : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Raised as FileNotFoundError.
struct MissingFile : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum Verify : int { kNever = 0, kFirst = 1, kAlways = 2 };

constexpr uint64_t kMinBytesPerThread = 2u << 20;  // below this a thread costs more than it saves
// Batches whose outputs are larger than this are written with streaming stores: they do not fit the
// per-core caches anyway, and are read later by another stage (copy.h says why it is faster).
constexpr uint64_t kStreamBytes = 4u << 20;

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08" PRIx32, v);
  return buf;
}

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw MissingFile(path + ": no such file (a region store directory holds index.rsi)");
    throw FormatError(path + ": cannot open: " + std::strerror(errno));
  }
  std::string data;
  char buf[1 << 16];
  for (;;) {
    ssize_t got = ::read(fd, buf, sizeof buf);
    if (got < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      throw FormatError(path + ": read failed: " + std::strerror(err));
    }
    if (got == 0) break;
    data.append(buf, static_cast<size_t>(got));
  }
  ::close(fd);
  return data;
}

// A buffer handed in by Python, checked to be a writable C-contiguous array of the expected shape.
struct Output {
  py::buffer_info info;
  char kind = 0;  // 'h' fp16, 'f' fp32, 'q' int64, 'b' bytes

  void* ptr() const { return info.ptr; }
};

char kind_of(const py::buffer_info& info) {
  const std::string& f = info.format;
  if (info.itemsize == 2 && f == "e") return 'h';
  if (info.itemsize == 4 && f == "f") return 'f';
  if (info.itemsize == 8 && (f == "l" || f == "q")) return 'q';
  if (info.itemsize == 1 && (f == "B" || f == "b" || f == "c")) return 'b';
  return 0;
}

const char* kind_name(char kind) {
  switch (kind) {
    case 'h': return "float16";
    case 'f': return "float32";
    case 'q': return "int64";
    case 'b': return "uint8";
  }
  return "?";
}

Output take_output(const py::buffer& buffer, const char* name, const std::vector<int64_t>& shape,
                   const std::string& kinds) {
  Output out{buffer.request(/*writable=*/true)};
  out.kind = kind_of(out.info);
  if (!out.kind || kinds.find(out.kind) == std::string::npos) {
    std::string want;
    for (char k : kinds) want += std::string(want.empty() ? "" : " or ") + kind_name(k);
    throw py::value_error(std::string(name) + ": expected a " + want + " buffer, got format '" + out.info.format +
                          "' with itemsize " + std::to_string(out.info.itemsize));
  }
  bool ok = out.info.ndim == static_cast<ssize_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = out.info.shape[d] == shape[d];
  if (!ok) {
    std::string want, got;
    for (auto s : shape) want += (want.empty() ? "" : ", ") + std::to_string(s);
    for (auto s : out.info.shape) got += (got.empty() ? "" : ", ") + std::to_string(s);
    throw py::value_error(std::string(name) + ": expected shape (" + want + "), got (" + got + ")");
  }
  ssize_t stride = out.info.itemsize;
  for (ssize_t d = out.info.ndim - 1; d >= 0; --d) {
    if (out.info.shape[d] > 1 && out.info.strides[d] != stride)
      throw py::value_error(std::string(name) + ": the buffer must be C-contiguous");
    stride *= out.info.shape[d];
  }
  return out;
}

// A fixed-size set of record positions that copy threads mark concurrently (relaxed atomics: a bit set
// twice or seen late costs one extra checksum or readahead hint, never a wrong result).
class AtomicBitset {
 public:
  void reset(size_t bits) {
    words_ = std::max<size_t>(1, (bits + 63) / 64);
    data_.reset(new std::atomic<uint64_t>[words_]);
    for (size_t w = 0; w < words_; ++w) data_[w].store(0, std::memory_order_relaxed);
  }
  bool test(size_t i) const { return data_[i >> 6].load(std::memory_order_relaxed) & (1ull << (i & 63)); }
  void set(size_t i) { data_[i >> 6].fetch_or(1ull << (i & 63), std::memory_order_relaxed); }

 private:
  size_t words_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> data_;
};

long major_faults() {
  struct rusage usage;
  return ::getrusage(RUSAGE_SELF, &usage) == 0 ? usage.ru_majflt : 0;
}

class Store {
 public:
  explicit Store(const std::string& dir) : dir_(dir), index_path_(dir + "/index.rsi") {
    parse_index(read_file(index_path_));
    for (uint32_t s = 0; s < shard_sizes_.size(); ++s) {
      struct stat st;
      if (::stat(shard_path(s).c_str(), &st) != 0)
        throw MissingFile(shard_path(s) + ": missing shard file (" + index_path_ + " lists " +
                          std::to_string(images_in_shard(s)) + " images in it)");
    }
    reset_process_state();
  }

  ~Store() { unmap_all(); }

  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // ---- the index, as Python sees it ----

  uint32_t feature_dim() const { return feature_dim_; }
  uint32_t label_dim() const { return label_dim_; }
  uint32_t flags() const { return flags_; }
  size_t size() const { return entries_.size(); }
  const std::string& dir() const { return dir_; }
  const std::string& index_path() const { return index_path_; }
  py::bytes uuid() const { return py::bytes(uuid_); }
  const std::vector<uint64_t>& shard_sizes() const { return shard_sizes_; }

  std::string shard_path(uint32_t shard) const {
    char name[32];
    std::snprintf(name, sizeof name, "/shard-%05u.rgs", shard);
    return dir_ + name;
  }

  py::list image_ids() const {
    py::list ids(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) {
      const char* p = ids_.data() + id_start_[i];
      PyObject* s = PyUnicode_DecodeUTF8(p, static_cast<Py_ssize_t>(entries_[i].id_len), "strict");
      if (!s) throw py::error_already_set();
      PyList_SET_ITEM(ids.ptr(), static_cast<Py_ssize_t>(i), s);
    }
    return ids;
  }

  // The record table as stored (40-byte rows): Python views it with a structured numpy dtype.
  py::bytes entries_bytes() const {
    return py::bytes(reinterpret_cast<const char*>(entries_.data()), entries_.size() * sizeof(fmt::IndexEntry));
  }

  // ---- reading ----

  // Copies records `positions` into the packed batch: features (T, D) fp16/fp32, boxes (T, 7) fp32 with
  // w*h appended, offsets (B+1,) int64, soft labels (T, C) fp16/fp32 or None.
  void gather(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& positions,
              const py::buffer& features, const py::buffer& boxes, const py::buffer& offsets,
              const py::object& soft_labels, int verify, int threads) {
    check_verify(verify);
    std::vector<size_t> pos = checked_positions(positions);
    const int64_t batch = static_cast<int64_t>(pos.size());
    int64_t total = 0;
    for (size_t p : pos) total += entries_[p].n;

    Output feat = take_output(features, "features", {total, feature_dim_}, "hf");
    Output box = take_output(boxes, "boxes", {total, 7}, "f");
    Output offs = take_output(offsets, "offsets", {batch + 1}, "q");
    Output soft;
    const bool want_soft = !soft_labels.is_none();
    if (want_soft) {
      if (!(flags_ & fmt::kSoftLabels))
        throw py::value_error(dir_ + ": this store was written without soft labels");
      soft = take_output(soft_labels.cast<py::buffer>(), "soft_labels", {total, label_dim_}, "hf");
    }

    prepare(pos);
    auto* row_offsets = static_cast<int64_t*>(offs.ptr());
    row_offsets[0] = 0;
    for (int64_t i = 0; i < batch; ++i) row_offsets[i + 1] = row_offsets[i] + entries_[pos[i]].n;

    const uint64_t out_bytes = static_cast<uint64_t>(total) *
        (feature_dim_ * feat.info.itemsize + (want_soft ? label_dim_ * soft.info.itemsize : 0));
    Targets targets{feat.ptr(), feat.kind == 'f', static_cast<float*>(box.ptr()),
                    want_soft ? soft.ptr() : nullptr, want_soft && soft.kind == 'f', row_offsets,
                    out_bytes >= kStreamBytes};
    InFlight guard(busy_);
    py::gil_scoped_release release;
    const long faults_before = major_faults();
    announce_reads(pos, want_soft);
    run_split(pos, threads, [&](size_t i) {
      copy_record(pos[i], static_cast<Verify>(verify), targets, row_offsets[i]);
      touched_.set(pos[i]);
    });
    faulted_.store(major_faults() > faults_before, std::memory_order_relaxed);
  }

  // Copies one whole record (header, id and sections, as stored) into `out` (uint8, nbytes long), checked.
  void read_record(int64_t position, const py::buffer& out, int verify) {
    check_verify(verify);
    std::vector<size_t> pos = checked_positions_list({position});
    const fmt::IndexEntry& e = entries_[pos[0]];
    Output dst = take_output(out, "out", {static_cast<int64_t>(e.nbytes)}, "b");
    prepare(pos);
    InFlight guard(busy_);
    py::gil_scoped_release release;
    const bool soft = flags_ & fmt::kSoftLabels;
    announce_reads(pos, soft);  // the whole record is copied
    const uint8_t* rec = checked_record(pos[0], static_cast<Verify>(verify), soft);
    std::memcpy(dst.ptr(), rec, e.nbytes);
    touched_.set(pos[0]);
  }

  // Checks every listed record (checksum included) and returns [(position, message)] for the bad ones
  // instead of raising at the first.
  std::vector<std::pair<int64_t, std::string>> check_records(
      const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& positions) {
    std::vector<size_t> pos = checked_positions(positions);
    std::vector<std::pair<int64_t, std::string>> problems;
    std::vector<size_t> mappable;
    for (size_t p : pos) {  // shard-level problems first (missing, bad header, truncated), with the GIL
      try {
        prepare({p});
        mappable.push_back(p);
      } catch (const std::exception& err) {
        problems.emplace_back(static_cast<int64_t>(p), err.what());
      }
    }
    InFlight guard(busy_);
    py::gil_scoped_release release;
    const bool soft = flags_ & fmt::kSoftLabels;
    constexpr size_t kAhead = 64;  // records announced to the disk at a time: enough to keep it busy, no more
    for (size_t start = 0; start < mappable.size(); start += kAhead) {
      const std::vector<size_t> chunk(mappable.begin() + start,
                                      mappable.begin() + std::min(mappable.size(), start + kAhead));
      announce_reads(chunk, soft);
      for (size_t p : chunk) {
        try {
          checked_record(p, kAlways, soft);
        } catch (const std::exception& err) {
          problems.emplace_back(static_cast<int64_t>(p), err.what());
        }
      }
    }
    std::sort(problems.begin(), problems.end());
    return problems;
  }

  // Unmaps the shards (they are mapped again on the next read). Refused while a read is copying.
  void close() {
    if (busy_.load() != 0) throw std::runtime_error(dir_ + ": cannot close the store while a gather is running");
    unmap_all();
  }

  size_t mapped_shards() const {
    size_t count = 0;
    for (const auto& m : maps_) count += m.data != nullptr;
    return count;
  }

 private:
  struct Mapping {
    const uint8_t* data = nullptr;
    size_t size = 0;
  };

  struct Targets {
    void* features;
    bool features_fp32;
    float* boxes;
    void* soft;
    bool soft_fp32;
    const int64_t* rows;
    bool stream;  // non-temporal stores for features and soft labels
  };

  // Counts reads that run without the GIL, so that close() cannot unmap under them.
  struct InFlight {
    std::atomic<int>& count;
    explicit InFlight(std::atomic<int>& c) : count(c) { ++count; }
    ~InFlight() { --count; }
  };

  void parse_index(const std::string& data) {
    const auto* p = reinterpret_cast<const uint8_t*>(data.data());
    const uint64_t size = data.size();
    if (size < fmt::kHeaderBytes + 4)
      throw FormatError(index_path_ + ": truncated index (" + std::to_string(size) + " bytes)");
    if (std::memcmp(p, fmt::kIndexMagic, 8) != 0)
      throw FormatError(index_path_ + ": not a region store index (bad magic)");
    const uint32_t version = fmt::load<uint32_t>(p + 8);
    if (version != fmt::kVersion)
      throw FormatError(index_path_ + ": format version " + std::to_string(version) + ", this reader knows " +
                        std::to_string(fmt::kVersion));
    const uint32_t header_crc = fmt::load<uint32_t>(p + 60);
    if (regionstore::crc32(p, 60) != header_crc) throw FormatError(index_path_ + ": header checksum mismatch");
    if (fmt::load<uint32_t>(p + 12) != fmt::kHeaderBytes)
      throw FormatError(index_path_ + ": unexpected header size");
    feature_dim_ = fmt::load<uint32_t>(p + 16);
    label_dim_ = fmt::load<uint32_t>(p + 20);
    flags_ = fmt::load<uint32_t>(p + 24);
    if (flags_ & ~fmt::kKnownFlags)
      throw FormatError(index_path_ + ": unknown flags " + hex32(flags_) + " (written by a newer writer?)");
    if (feature_dim_ == 0) throw FormatError(index_path_ + ": feature_dim is 0");
    const uint32_t num_shards = fmt::load<uint32_t>(p + 28);
    const uint64_t num_records = fmt::load<uint64_t>(p + 32);
    uuid_.assign(reinterpret_cast<const char*>(p + 40), 16);

    const uint64_t table = fmt::kHeaderBytes + 8ull * num_shards;
    if (num_records > size / sizeof(fmt::IndexEntry) || table + num_records * sizeof(fmt::IndexEntry) + 4 > size)
      throw FormatError(index_path_ + ": truncated index (" + std::to_string(size) + " bytes for " +
                        std::to_string(num_records) + " records)");
    const uint32_t trailer = fmt::load<uint32_t>(p + size - 4);
    if (regionstore::crc32(p + fmt::kHeaderBytes, size - 4 - fmt::kHeaderBytes) != trailer)
      throw FormatError(index_path_ + ": checksum mismatch (the index is damaged or truncated)");

    shard_sizes_.resize(num_shards);
    std::memcpy(shard_sizes_.data(), p + fmt::kHeaderBytes, 8ull * num_shards);
    entries_.resize(num_records);
    std::memcpy(entries_.data(), p + table, num_records * sizeof(fmt::IndexEntry));
    const uint64_t ids_at = table + num_records * sizeof(fmt::IndexEntry);
    id_start_.resize(num_records + 1);
    id_start_[0] = 0;
    for (uint64_t i = 0; i < num_records; ++i) id_start_[i + 1] = id_start_[i] + entries_[i].id_len;
    if (ids_at + id_start_[num_records] + 4 != size)
      throw FormatError(index_path_ + ": the id table does not end where the file does");
    ids_.assign(reinterpret_cast<const char*>(p + ids_at), id_start_[num_records]);

    for (uint64_t i = 0; i < num_records; ++i) {
      const fmt::IndexEntry& e = entries_[i];
      std::string where = index_path_ + ": entry " + std::to_string(i) + " ('" + image_id(i) + "'): ";
      if (e.shard >= num_shards) throw FormatError(where + "shard " + std::to_string(e.shard) + " does not exist");
      if (e.n == 0) throw FormatError(where + "zero regions");
      if (e.reserved != 0 || (!(flags_ & fmt::kSoftLabels) && e.crc_soft != 0))
        throw FormatError(where + "reserved fields are not zero");
      const uint64_t expect = fmt::record_layout(e.n, e.id_len, feature_dim_, label_dim_, flags_).nbytes;
      if (e.nbytes != expect || e.offset < fmt::kHeaderBytes || e.offset % fmt::kAlign != 0 ||
          e.offset + e.nbytes > shard_sizes_[e.shard])
        throw FormatError(where + "inconsistent offset/size");
    }
  }

  std::string image_id(size_t i) const { return ids_.substr(id_start_[i], entries_[i].id_len); }

  size_t images_in_shard(uint32_t shard) const {
    size_t count = 0;
    for (const auto& e : entries_) count += e.shard == shard;
    return count;
  }

  std::string where(size_t pos) const {
    const fmt::IndexEntry& e = entries_[pos];
    return shard_path(e.shard) + ": image '" + image_id(pos) + "' (record at byte " + std::to_string(e.offset) +
           ", " + std::to_string(e.nbytes) + " bytes): ";
  }

  static void check_verify(int verify) {
    if (verify < kNever || verify > kAlways) throw py::value_error("verify must be 0 (never), 1 (first) or 2 (always)");
  }

  std::vector<size_t> checked_positions(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a) {
    if (a.ndim() != 1) throw py::value_error("positions must be one-dimensional");
    std::vector<size_t> pos(static_cast<size_t>(a.shape(0)));
    const int64_t* data = a.data();
    for (size_t i = 0; i < pos.size(); ++i) {
      if (data[i] < 0 || static_cast<uint64_t>(data[i]) >= entries_.size())
        throw py::index_error("position " + std::to_string(data[i]) + " outside the store's " +
                              std::to_string(entries_.size()) + " records");
      pos[i] = static_cast<size_t>(data[i]);
    }
    return pos;
  }

  std::vector<size_t> checked_positions_list(std::initializer_list<int64_t> list) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(list.size()));
    std::copy(list.begin(), list.end(), a.mutable_data());
    return checked_positions(a);
  }

  void reset_process_state() {
    // After a fork the child's copies of the parent's mappings would work, but "opened lazily per process"
    // keeps each process's view its own (and the verified set is per process by definition).
    maps_.assign(shard_sizes_.size(), Mapping{});
    verified_.reset(entries_.size());
    verified_soft_.reset(entries_.size());
    touched_.reset(entries_.size());
    faulted_.store(false);
    busy_.store(0);
    pid_ = ::getpid();
  }

  void unmap_all() {
    for (auto& m : maps_) {
      if (m.data) ::munmap(const_cast<uint8_t*>(m.data), m.size);
      m = Mapping{};
    }
  }

  // With the GIL: reset after a fork, map the shards these records live in, check their byte ranges.
  void prepare(const std::vector<size_t>& pos) {
    if (::getpid() != pid_) {
      unmap_all();  // the child's own copies of the parent's mappings; no thread of the parent came along to use them
      reset_process_state();
    }
    for (size_t p : pos) {
      const fmt::IndexEntry& e = entries_[p];
      Mapping& m = maps_[e.shard];
      if (!m.data) m = map_shard(e.shard, p);
      if (e.offset + e.nbytes > m.size)
        throw CorruptRecord(where(p) + "truncated: the record ends at byte " + std::to_string(e.offset + e.nbytes) +
                            " but the file has " + std::to_string(m.size) + " bytes");
    }
  }

  Mapping map_shard(uint32_t shard, size_t requested) {
    const std::string path = shard_path(shard);
    const std::string context = " (reading image '" + image_id(requested) + "')";
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) throw MissingFile(path + ": missing shard file" + context);
      throw CorruptRecord(path + ": cannot open: " + std::strerror(errno) + context);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      throw CorruptRecord(path + ": cannot stat: " + std::strerror(err) + context);
    }
    const size_t size = static_cast<size_t>(st.st_size);
    if (size < fmt::kHeaderBytes) {
      ::close(fd);
      throw CorruptRecord(path + ": truncated: " + std::to_string(size) + " bytes, shorter than its header" + context);
    }
    void* data = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    int err = errno;
    ::close(fd);  // the mapping keeps the file open
    if (data == MAP_FAILED) throw CorruptRecord(path + ": mmap failed: " + std::strerror(err) + context);
    ::madvise(data, size, MADV_RANDOM);  // see announce_reads
    Mapping m{static_cast<const uint8_t*>(data), size};
    try {
      check_shard_header(shard, m.data, context);
    } catch (...) {
      ::munmap(data, size);
      throw;
    }
    return m;
  }

  void check_shard_header(uint32_t shard, const uint8_t* p, const std::string& context) const {
    const std::string path = shard_path(shard);
    auto fail = [&](const std::string& what) { throw CorruptRecord(path + ": " + what + context); };
    if (std::memcmp(p, fmt::kShardMagic, 8) != 0) fail("not a region store shard (bad magic)");
    if (regionstore::crc32(p, 60) != fmt::load<uint32_t>(p + 60)) fail("shard header checksum mismatch");
    if (fmt::load<uint32_t>(p + 8) != fmt::kVersion)
      fail("format version " + std::to_string(fmt::load<uint32_t>(p + 8)) + ", this reader knows " +
           std::to_string(fmt::kVersion));
    if (fmt::load<uint32_t>(p + 12) != fmt::kHeaderBytes || fmt::load<uint32_t>(p + 28) != fmt::kAlign)
      fail("unexpected header size or alignment");
    if (fmt::load<uint32_t>(p + 16) != feature_dim_ || fmt::load<uint32_t>(p + 20) != label_dim_ ||
        fmt::load<uint32_t>(p + 24) != flags_)
      fail("header disagrees with the index (feature_dim, label_dim or flags)");
    if (fmt::load<uint32_t>(p + 32) != shard)
      fail("header says it is shard " + std::to_string(fmt::load<uint32_t>(p + 32)));
    if (std::memcmp(p + 36, uuid_.data(), 16) != 0)
      fail("belongs to another store (its uuid differs from the index's)");
  }

  bool needs_checksum(const AtomicBitset& done, size_t pos, Verify verify) const {
    return verify == kAlways || (verify == kFirst && !done.test(pos));
  }

  // Cold reads. The shards are mapped MADV_RANDOM, so a page fault reads only around itself instead of the
  // device's whole readahead window (8 MiB here, for a record of a few hundred KiB). Instead, before copying,
  // the exact byte ranges a batch will read are announced with MADV_WILLNEED, so that the disk works on all of
  // them at once. Only for records this process has not read yet, or all of them after a read that waited
  // for the disk (the page cache may have dropped them since): a warm epoch makes no extra system calls.
  void announce_reads(const std::vector<size_t>& pos, bool soft) const {
    const bool all = faulted_.load(std::memory_order_relaxed);
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    for (size_t p : pos) {
      if (!all && touched_.test(p)) continue;
      const fmt::IndexEntry& e = entries_[p];
      const uint8_t* rec = maps_[e.shard].data + e.offset;
      const fmt::Layout l = fmt::record_layout(e.n, e.id_len, feature_dim_, label_dim_, flags_);
      const uint8_t* end = rec + (soft ? e.nbytes : l.main_end);  // soft labels are the record's tail
      uintptr_t lo = reinterpret_cast<uintptr_t>(rec) & ~(page - 1);
      ::madvise(reinterpret_cast<void*>(lo), reinterpret_cast<uintptr_t>(end) - lo, MADV_WILLNEED);
    }
  }

  // Which of a record's checksums a read has to verify.
  struct Pending {
    bool main;
    bool soft;
  };

  // Without the GIL: the record's header against the index (every mode, it is one cache line); returns the
  // checksums `verify` asks for (the soft labels' only when they are read).
  const uint8_t* checked_header(size_t pos, Verify verify, bool soft, Pending& pending) const {
    const fmt::IndexEntry& e = entries_[pos];
    const uint8_t* rec = maps_[e.shard].data + e.offset;
    if (std::memcmp(rec, fmt::kRecordMagic, 4) != 0)
      throw CorruptRecord(where(pos) + "no record header at this offset (bad magic)");
    if (fmt::load<uint64_t>(rec + 8) != e.nbytes || fmt::load<uint32_t>(rec + 16) != e.n ||
        fmt::load<uint32_t>(rec + 20) != e.id_len || fmt::load<uint32_t>(rec + 24) != flags_)
      throw CorruptRecord(where(pos) + "record header disagrees with the index (size " +
                          std::to_string(fmt::load<uint64_t>(rec + 8)) + ", regions " +
                          std::to_string(fmt::load<uint32_t>(rec + 16)) + "; the index says " +
                          std::to_string(e.nbytes) + ", " + std::to_string(e.n) + ")");
    if (std::memcmp(rec + fmt::kRecordHeaderBytes, ids_.data() + id_start_[pos], e.id_len) != 0)
      throw CorruptRecord(where(pos) + "the record holds another image's id");
    if (fmt::load<uint32_t>(rec + 4) != e.crc || fmt::load<uint32_t>(rec + 28) != e.crc_soft)
      throw CorruptRecord(where(pos) + "checksums in the record header (" + hex32(fmt::load<uint32_t>(rec + 4)) +
                          ", " + hex32(fmt::load<uint32_t>(rec + 28)) + ") differ from the index's (" +
                          hex32(e.crc) + ", " + hex32(e.crc_soft) + ")");
    pending.main = needs_checksum(verified_, pos, verify);
    pending.soft = soft && needs_checksum(verified_soft_, pos, verify);
    return rec;
  }

  // A checksum computed over a record's part, checked against the index; marks the part verified.
  void settle(size_t pos, bool soft_part, uint32_t computed) {
    const uint32_t stored = soft_part ? entries_[pos].crc_soft : entries_[pos].crc;
    if (computed != stored)
      throw CorruptRecord(where(pos) + "checksum mismatch in " + (soft_part ? "soft labels" : "features/boxes/conf") +
                          ": stored " + hex32(stored) + ", computed " + hex32(computed) +
                          " (the record's bytes changed after it was written)");
    (soft_part ? verified_soft_ : verified_).set(pos);
  }

  // Header check and the pending checksums, for reads that do not copy into a batch.
  const uint8_t* checked_record(size_t pos, Verify verify, bool soft) {
    Pending pending;
    const uint8_t* rec = checked_header(pos, verify, soft, pending);
    const fmt::IndexEntry& e = entries_[pos];
    const fmt::Layout l = fmt::record_layout(e.n, e.id_len, feature_dim_, label_dim_, flags_);
    if (pending.main) settle(pos, false, regionstore::crc32(rec + 8, l.main_end - 8));
    if (pending.soft) settle(pos, true, regionstore::crc32(rec + l.soft_labels, e.nbytes - l.soft_labels));
    return rec;
  }

  // Runs copy(offset, length) over [begin, end) of the record in L1-sized chunks, each folded into `crc` just
  // before it is copied when `check`: verifying then costs one pass over memory, not two. Returns the crc.
  template <typename Copy>
  static uint32_t copy_checked(const uint8_t* rec, uint64_t begin, uint64_t end, bool check, uint32_t crc,
                               Copy copy) {
    constexpr uint64_t kChunk = 16u << 10;
    if (!check) {
      copy(0, end - begin);
      return crc;
    }
    for (uint64_t at = begin; at < end; at += kChunk) {
      const uint64_t length = std::min(kChunk, end - at);
      crc = regionstore::crc32(rec + at, length, crc);
      copy(at - begin, length);
    }
    return crc;
  }

  // One record into the batch at `row`, its pending checksums verified while copying. A mismatch raises
  // after the bad bytes were copied: the batch is not returned, so nothing reads them.
  void copy_record(size_t pos, Verify verify, const Targets& t, int64_t row) {
    Pending pending;
    const uint8_t* rec = checked_header(pos, verify, t.soft != nullptr, pending);
    const fmt::IndexEntry& e = entries_[pos];
    const fmt::Layout l = fmt::record_layout(e.n, e.id_len, feature_dim_, label_dim_, flags_);
    const uint64_t feature_bytes = static_cast<uint64_t>(e.n) * feature_dim_ * 2;

    auto copy_features = [&](uint64_t offset, uint64_t length) {
      const auto* src = reinterpret_cast<const uint16_t*>(rec + l.features + offset);
      if (t.features_fp32)
        regionstore::half_to_float(src, static_cast<float*>(t.features) + row * feature_dim_ + offset / 2,
                                   length / 2, t.stream);
      else
        regionstore::copy_bytes(static_cast<uint8_t*>(t.features) + row * feature_dim_ * 2 + offset, src, length,
                                t.stream);
    };
    uint32_t crc = pending.main ? regionstore::crc32(rec + 8, l.features - 8) : 0;  // header and id
    if (pending.main && !t.features_fp32)  // fp16 out: one pass copies and checksums
      crc = regionstore::crc32_copy(static_cast<uint8_t*>(t.features) + row * feature_dim_ * 2, rec + l.features,
                                    feature_bytes, crc, t.stream);
    else
      crc = copy_checked(rec, l.features, l.features + feature_bytes, pending.main, crc, copy_features);
    if (pending.main) {  // boxes, conf and padding: small, and read again from L1 just below
      crc = regionstore::crc32(rec + l.features + feature_bytes, l.main_end - l.features - feature_bytes, crc);
      settle(pos, false, crc);
    }

    // boxes: [x1, y1, x2, y2, w, h] as stored, then w*h in fp32 (the original computes it after .float());
    // fp16 boxes are converted a block of regions at a time with the vector conversion.
    float* box = t.boxes + row * 7;
    constexpr uint32_t kBlock = 128;
    float six[kBlock * 6];
    for (uint32_t first = 0; first < e.n; first += kBlock) {
      const uint32_t count = std::min(kBlock, e.n - first);
      const uint8_t* src = rec + l.norm_bb + first * 6ull * ((flags_ & fmt::kBoxesFp32) ? 4 : 2);
      if (flags_ & fmt::kBoxesFp32)
        std::memcpy(six, src, count * 24ull);
      else
        regionstore::half_to_float(reinterpret_cast<const uint16_t*>(src), six, count * 6ull);
      for (uint32_t r = 0; r < count; ++r, box += 7) {
        std::memcpy(box, six + r * 6, 24);
        box[6] = six[r * 6 + 4] * six[r * 6 + 5];
      }
    }

    if (t.soft) {
      const uint64_t label_bytes = static_cast<uint64_t>(e.n) * label_dim_ * 2;
      auto copy_soft = [&](uint64_t offset, uint64_t length) {
        const auto* src = reinterpret_cast<const uint16_t*>(rec + l.soft_labels + offset);
        if (t.soft_fp32)
          regionstore::half_to_float(src, static_cast<float*>(t.soft) + row * label_dim_ + offset / 2, length / 2,
                                     t.stream);
        else
          regionstore::copy_bytes(static_cast<uint8_t*>(t.soft) + row * label_dim_ * 2 + offset, src, length,
                                  t.stream);
      };
      uint32_t soft_crc = 0;
      if (pending.soft && !t.soft_fp32)
        soft_crc = regionstore::crc32_copy(static_cast<uint8_t*>(t.soft) + row * label_dim_ * 2, rec + l.soft_labels,
                                           label_bytes, 0, t.stream);
      else
        soft_crc = copy_checked(rec, l.soft_labels, l.soft_labels + label_bytes, pending.soft, 0, copy_soft);
      if (pending.soft) {
        soft_crc = regionstore::crc32(rec + l.soft_labels + label_bytes, e.nbytes - l.soft_labels - label_bytes,
                                      soft_crc);
        settle(pos, true, soft_crc);
      }
    }
  }

  // Runs work(i) for every batch position, split into contiguous runs of about equal bytes over up to
  // `threads` threads (the caller's included). The error of the earliest failing position is rethrown: a
  // failure stops the work beyond it only, so every earlier position still runs, whichever thread holds it.
  template <typename Work>
  void run_split(const std::vector<size_t>& pos, int threads, Work work) const {
    const size_t count = pos.size();
    std::vector<uint64_t> cumulative(count + 1, 0);
    for (size_t i = 0; i < count; ++i) cumulative[i + 1] = cumulative[i] + entries_[pos[i]].nbytes;
    const uint64_t total = cumulative[count];
    size_t parts = static_cast<size_t>(std::max(1, threads));
    const size_t by_size = static_cast<size_t>(std::max<uint64_t>(1, total / kMinBytesPerThread));
    parts = std::min<size_t>({parts, count ? count : 1, by_size});

    std::vector<size_t> bounds(parts + 1, count);
    bounds[0] = 0;
    for (size_t k = 1; k < parts; ++k)
      bounds[k] = static_cast<size_t>(
          std::lower_bound(cumulative.begin(), cumulative.end(), total * k / parts) - cumulative.begin());

    std::vector<std::exception_ptr> errors(parts);
    std::vector<size_t> failed_at(parts, count);
    std::atomic<size_t> stop_at{count};  // the earliest failing position seen so far
    auto run = [&](size_t k) {
      for (size_t i = bounds[k]; i < bounds[k + 1] && i < stop_at.load(std::memory_order_relaxed); ++i) {
        try {
          work(i);
        } catch (...) {
          errors[k] = std::current_exception();
          failed_at[k] = i;
          size_t seen = stop_at.load();
          while (i < seen && !stop_at.compare_exchange_weak(seen, i)) {
          }
          break;
        }
      }
      regionstore::stream_fence();  // this thread's streaming stores land before the join publishes them
    };
    std::vector<std::thread> pool;
    pool.reserve(parts - 1);
    for (size_t k = 1; k < parts; ++k) pool.emplace_back(run, k);
    run(0);
    for (auto& th : pool) th.join();
    size_t first = parts;
    for (size_t k = 0; k < parts; ++k)
      if (errors[k] && (first == parts || failed_at[k] < failed_at[first])) first = k;
    if (first != parts) std::rethrow_exception(errors[first]);
  }

  std::string dir_, index_path_;
  uint32_t feature_dim_ = 0, label_dim_ = 0, flags_ = 0;
  std::string uuid_;
  std::vector<uint64_t> shard_sizes_;
  std::vector<fmt::IndexEntry> entries_;
  std::vector<uint64_t> id_start_;
  std::string ids_;

  // per process (reset after a fork)
  pid_t pid_ = 0;
  std::vector<Mapping> maps_;
  AtomicBitset verified_;       // first checksum checked in this process ("first")
  AtomicBitset verified_soft_;  // soft labels' checksum checked in this process
  AtomicBitset touched_;    // read before by this process: likely in the page cache
  std::atomic<bool> faulted_{false};  // the last read had to wait for the disk
  std::atomic<int> busy_{0};
};

bool little_endian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

}  // namespace

PYBIND11_MODULE(_regionstore, m) {
  m.doc() = "Region store reader: memory-mapped shards gathered into packed batches (docs/region-store.md).";
  if (!little_endian()) throw std::runtime_error("uniter_fast._regionstore supports little-endian hosts only");

  auto& store_error = py::register_exception<FormatError>(m, "RegionStoreError", PyExc_ValueError);
  py::register_exception<CorruptRecord>(m, "CorruptRecordError", store_error.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const MissingFile& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    }
  });
  m.attr("FORMAT_VERSION") = fmt::kVersion;
  m.attr("VERIFY_NEVER") = static_cast<int>(kNever);
  m.attr("VERIFY_FIRST") = static_cast<int>(kFirst);
  m.attr("VERIFY_ALWAYS") = static_cast<int>(kAlways);

  m.def("crc32", [](const py::buffer& data, uint32_t crc) {
    py::buffer_info info = data.request();
    const size_t len = static_cast<size_t>(info.size * info.itemsize);
    py::gil_scoped_release release;
    return regionstore::crc32(info.ptr, len, crc);
  }, py::arg("data"), py::arg("crc") = 0u, "zlib.crc32-compatible CRC-32 (C-contiguous buffers)");
  m.def("crc32_portable", [](const py::buffer& data, uint32_t crc) {
    py::buffer_info info = data.request();
    return regionstore::crc32_portable(info.ptr, static_cast<size_t>(info.size * info.itemsize), crc);
  }, py::arg("data"), py::arg("crc") = 0u);
  m.def("crc32_accelerated", &regionstore::crc32_accelerated);
  m.def("crc32_copy", [](const py::buffer& src, const py::buffer& dst, uint32_t crc, bool stream) {
    py::buffer_info in = src.request();
    Output out = take_output(dst, "dst", {static_cast<int64_t>(in.size * in.itemsize)}, "b");
    uint32_t result = regionstore::crc32_copy(out.ptr(), in.ptr, static_cast<size_t>(in.size * in.itemsize), crc,
                                              stream);
    regionstore::stream_fence();
    return result;
  }, py::arg("src"), py::arg("dst"), py::arg("crc") = 0u, py::arg("stream") = false,
  "dst[:] = src's bytes, returning zlib.crc32(src, crc) (for the tests)");
  m.def("half_to_float", [](const py::buffer& src, const py::buffer& dst, bool stream) {
    py::buffer_info in = src.request();
    Output out = take_output(dst, "dst", {static_cast<int64_t>(in.size)}, "f");
    if (kind_of(in) != 'h') throw py::value_error("src must be a float16 buffer");
    regionstore::half_to_float(static_cast<const uint16_t*>(in.ptr), static_cast<float*>(out.ptr()),
                               static_cast<size_t>(in.size), stream);
    regionstore::stream_fence();
  }, py::arg("src"), py::arg("dst"), py::arg("stream") = false,
  "dst[:] = src as float32 (the reader's conversion, for the tests)");
  m.def("copy_bytes", [](const py::buffer& src, const py::buffer& dst, bool stream) {
    py::buffer_info in = src.request();
    Output out = take_output(dst, "dst", {static_cast<int64_t>(in.size * in.itemsize)}, "b");
    regionstore::copy_bytes(out.ptr(), in.ptr, static_cast<size_t>(in.size * in.itemsize), stream);
    regionstore::stream_fence();
  }, py::arg("src"), py::arg("dst"), py::arg("stream") = false, "dst[:] = src's bytes (for the tests)");
  m.def("half_to_float_impl", &regionstore::half_to_float_impl);
  m.def("copy_impl", &regionstore::copy_impl);

  py::class_<Store>(m, "Store")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("feature_dim", &Store::feature_dim)
      .def_property_readonly("label_dim", &Store::label_dim)
      .def_property_readonly("flags", &Store::flags)
      .def_property_readonly("path", &Store::dir)
      .def_property_readonly("index_path", &Store::index_path)
      .def_property_readonly("uuid", &Store::uuid)
      .def_property_readonly("shard_sizes", &Store::shard_sizes)
      .def("__len__", &Store::size)
      .def("shard_path", &Store::shard_path, py::arg("shard"))
      .def("image_ids", &Store::image_ids)
      .def("entries_bytes", &Store::entries_bytes)
      .def("gather", &Store::gather, py::arg("positions"), py::arg("features"), py::arg("boxes"),
           py::arg("offsets"), py::arg("soft_labels"), py::arg("verify"), py::arg("threads"))
      .def("read_record", &Store::read_record, py::arg("position"), py::arg("out"), py::arg("verify"))
      .def("check_records", &Store::check_records, py::arg("positions"))
      .def("close", &Store::close)
      .def("mapped_shards", &Store::mapped_shards);
}
