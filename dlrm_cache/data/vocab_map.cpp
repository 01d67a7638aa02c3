// Raw categorical values for vocab.py:
// - a counter (open addressing, linear probing): one feature's train counts, a probe or two per
//   value as the chunks stream by (numpy's fallback sorts every chunk and merges the sorted runs);
// - the re-numbering map (sorted_map_lookup): raw value -> new id in 8 bytes a kept value (plus at most
//   one of directory), a directory read and a search of a few keys per value.
// Built by dlrm_cache/native_build.py.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kEmpty = std::numeric_limits<int64_t>::min();  // never a raw value

uint64_t hash(int64_t k) {  // splitmix64's finalizer
  uint64_t x = static_cast<uint64_t>(k);
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

bool is_hash(int64_t r) { return r >= 0 && r <= 0xFFFFFFFFLL; }  // a 32-bit raw value

// Fetching ahead (measured on a 2-core VM: 8 and 16 values ahead were the best of 4, 8, 16, 32).
constexpr int64_t kLookupAhead = 8;            // values looked up while one's map entries are fetched
constexpr int64_t kCountAhead = 16;            // values counted while one's slot is fetched
constexpr int64_t kFetchAheadFrom = 1 << 16;   // keys or slots; smaller tables (<= 1 MiB) stay cached

// Counts per distinct raw value (never kEmpty: raw values are -1 .. 2^32 - 1); doubles at load 1/2.
struct Counter {
  struct Slot {
    int64_t key;
    int64_t count;
  };
  std::vector<Slot> slots = std::vector<Slot>(1 << 12, Slot{kEmpty, 0});
  uint64_t mask = (1 << 12) - 1;
  int64_t size = 0;

  void add(int64_t key) {
    uint64_t h = hash(key) & mask;
    while (slots[h].key != key) {
      if (slots[h].key == kEmpty) {
        slots[h] = Slot{key, 1};
        if (++size * 2 > static_cast<int64_t>(slots.size())) grow();
        return;
      }
      h = (h + 1) & mask;
    }
    ++slots[h].count;
  }

  void grow() {
    std::vector<Slot> old(slots.size() * 2, Slot{kEmpty, 0});
    old.swap(slots);
    mask = slots.size() - 1;
    for (const Slot& s : old) {
      if (s.key == kEmpty) continue;
      uint64_t h = hash(s.key) & mask;
      while (slots[h].key != kEmpty) h = (h + 1) & mask;
      slots[h] = s;
    }
  }
};

// The re-numbering map, compact: the kept values' 32-bit keys sorted (4 bytes each), their ids beside
// them (4 bytes), and a directory of where each run of keys sharing their top `bits` bits starts (at
// most a quarter of an entry per key). A lookup reads the directory, then searches a few keys.
// out[i] = the id of raw[i]; `empty_id` for -1 (the empty value), `missing` for any other value not kept.
// A map larger than the caches costs a miss in the directory, then one in the keys and one in the ids:
// each value's are fetched ahead (its directory entry 2 * kLookupAhead values before, its keys and ids
// kLookupAhead before), so that many misses are under way at once instead of one after another.
template <typename Id>
void lookup(const uint32_t* keys, const uint32_t* ids, int64_t n, const uint32_t* dir, int64_t bits,
            const int64_t* raw, int64_t m, int64_t missing, int64_t empty_id, Id* out) {
  const int shift = 32 - static_cast<int>(bits);
  const auto bucket = [&](int64_t r) -> uint64_t { return bits ? static_cast<uint32_t>(r) >> shift : 0; };
  const bool ahead = n >= kFetchAheadFrom;
  for (int64_t i = 0; i < m; ++i) {
    if (ahead && i + 2 * kLookupAhead < m && is_hash(raw[i + 2 * kLookupAhead])) {
      __builtin_prefetch(dir + bucket(raw[i + 2 * kLookupAhead]));
    }
    if (ahead && i + kLookupAhead < m && is_hash(raw[i + kLookupAhead])) {
      const uint32_t first = dir[bucket(raw[i + kLookupAhead])];
      __builtin_prefetch(keys + first);
      __builtin_prefetch(ids + first);
    }
    const int64_t r = raw[i];
    if (!is_hash(r)) {
      out[i] = r == -1 ? empty_id : missing;
      continue;
    }
    const uint32_t key = static_cast<uint32_t>(r);
    const uint64_t b = bucket(r);
    uint32_t lo = dir[b], hi = dir[b + 1];
    while (lo < hi) {  // the first key >= key
      const uint32_t mid = lo + (hi - lo) / 2;
      if (keys[mid] < key) lo = mid + 1; else hi = mid;
    }
    out[i] = (lo < n && keys[lo] == key) ? ids[lo] : missing;
  }
}

}  // namespace

extern "C" {

void* value_counter_new() { return new Counter(); }

void value_counter_free(void* c) { delete static_cast<Counter*>(c); }

// Count raw[0], raw[stride], ... (n values) into the counter: a column of a row-major chunk as is.
// A table larger than the caches costs a miss a value: each value's slot is fetched kCountAhead values
// before it is counted.
void value_counter_add(void* counter, const int64_t* raw, int64_t n, int64_t stride) {
  Counter& c = *static_cast<Counter*>(counter);
  for (int64_t i = 0; i < n; ++i) {
    if (i + kCountAhead < n && static_cast<int64_t>(c.slots.size()) >= kFetchAheadFrom) {
      __builtin_prefetch(&c.slots[hash(raw[(i + kCountAhead) * stride]) & c.mask]);
    }
    c.add(raw[i * stride]);
  }
}

int64_t value_counter_size(const void* counter) { return static_cast<const Counter*>(counter)->size; }

// Every distinct value and its count as (value, count) pairs, grouped by part - (value + 1) >> shift,
// the last part taking any beyond - the parts in order, each in the table's order; part p's pairs
// start at bounds[p] (parts + 1 entries). The table is left empty with its room kept: counting starts
// again with no new memory.
void value_counter_drain(void* counter, int64_t shift, int64_t parts, int64_t* pairs, int64_t* bounds) {
  Counter& c = *static_cast<Counter*>(counter);
  const auto part = [&](int64_t key) { return std::min<int64_t>((key + 1) >> shift, parts - 1); };
  std::fill(bounds, bounds + parts + 1, 0);
  for (const Counter::Slot& s : c.slots) {
    if (s.key != kEmpty) ++bounds[part(s.key) + 1];
  }
  for (int64_t p = 1; p <= parts; ++p) bounds[p] += bounds[p - 1];
  std::vector<int64_t> next(bounds, bounds + parts);
  for (Counter::Slot& s : c.slots) {
    if (s.key == kEmpty) continue;
    const int64_t j = next[part(s.key)]++;
    pairs[2 * j] = s.key;
    pairs[2 * j + 1] = s.count;
    s = Counter::Slot{kEmpty, 0};
  }
  c.size = 0;
}

// The distinct values and their counts (value_counter_size of each), in the table's order.
void value_counter_export(const void* counter, int64_t* values, int64_t* counts) {
  const Counter& c = *static_cast<const Counter*>(counter);
  int64_t j = 0;
  for (const Counter::Slot& s : c.slots) {
    if (s.key == kEmpty) continue;
    values[j] = s.key;
    counts[j++] = s.count;
  }
}

// The lookup into 64-bit ids.
void sorted_map_lookup(const uint32_t* keys, const uint32_t* ids, int64_t n, const uint32_t* dir,
                       int64_t bits, const int64_t* raw, int64_t m, int64_t missing, int64_t empty_id,
                       int64_t* out) {
  lookup(keys, ids, n, dir, bits, raw, m, missing, empty_id, out);
}

// The same, into 32-bit ids (the output's column type where a table has fewer than 2^31 rows).
void sorted_map_lookup_int32(const uint32_t* keys, const uint32_t* ids, int64_t n, const uint32_t* dir,
                             int64_t bits, const int64_t* raw, int64_t m, int64_t missing,
                             int64_t empty_id, int32_t* out) {
  lookup(keys, ids, n, dir, bits, raw, m, missing, empty_id, out);
}

}  // extern "C"
