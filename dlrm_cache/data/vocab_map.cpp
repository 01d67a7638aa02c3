// Hash tables of raw categorical values (open addressing, linear probing), for vocab.py:
// - a counter: one feature's train counts, a probe or two per value as the chunks stream by (numpy's
//   fallback sorts every chunk and merges the sorted runs);
// - the re-numbering map: raw value -> new id, built once per feature (load <= 0.6), then a probe or
//   two per value instead of a binary search over the whole vocabulary.
// Built by dlrm_cache/native_build.py.

#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kEmpty = std::numeric_limits<int64_t>::min();  // never a raw value

struct Map {
  std::vector<int64_t> keys;
  std::vector<int64_t> ids;
  uint64_t mask = 0;

  static uint64_t hash(int64_t k) {  // splitmix64's finalizer
    uint64_t x = static_cast<uint64_t>(k);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  }
};

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
    uint64_t h = Map::hash(key) & mask;
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
      uint64_t h = Map::hash(s.key) & mask;
      while (slots[h].key != kEmpty) h = (h + 1) & mask;
      slots[h] = s;
    }
  }
};

}  // namespace

extern "C" {

void* value_counter_new() { return new Counter(); }

void value_counter_free(void* c) { delete static_cast<Counter*>(c); }

// Count raw[0], raw[stride], ... (n values) into the counter: a column of a row-major chunk as is.
void value_counter_add(void* counter, const int64_t* raw, int64_t n, int64_t stride) {
  Counter& c = *static_cast<Counter*>(counter);
  for (int64_t i = 0; i < n; ++i) c.add(raw[i * stride]);
}

int64_t value_counter_size(const void* counter) { return static_cast<const Counter*>(counter)->size; }

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

// keys: n distinct raw values; ids: their new ids.
void* vocab_map_new(const int64_t* keys, const int64_t* ids, int64_t n) {
  auto* m = new Map();
  uint64_t cap = 16;
  while (cap * 3 < static_cast<uint64_t>(n) * 5) cap <<= 1;  // load <= 0.6
  m->keys.assign(cap, kEmpty);
  m->ids.assign(cap, 0);
  m->mask = cap - 1;
  for (int64_t i = 0; i < n; ++i) {
    uint64_t h = Map::hash(keys[i]) & m->mask;
    while (m->keys[h] != kEmpty) h = (h + 1) & m->mask;
    m->keys[h] = keys[i];
    m->ids[h] = ids[i];
  }
  return m;
}

void vocab_map_free(void* m) { delete static_cast<Map*>(m); }

// out[i] = the id of raw[i], or `missing` for a value not in the map.
void vocab_map_lookup(const void* map, const int64_t* raw, int64_t n, int64_t missing, int64_t* out) {
  const Map& m = *static_cast<const Map*>(map);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t h = Map::hash(raw[i]) & m.mask;
    int64_t id = missing;
    while (m.keys[h] != kEmpty) {
      if (m.keys[h] == raw[i]) {
        id = m.ids[h];
        break;
      }
      h = (h + 1) & m.mask;
    }
    out[i] = id;
  }
}

}  // extern "C"
