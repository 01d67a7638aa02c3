// Raw categorical value -> new id, for re-numbering: an open-addressing hash table (linear probing,
// load <= 0.6) built once per feature, then one probe or two per value instead of a binary search
// over the whole vocabulary (vocab.py's fallback). Built by dlrm_cache/native_build.py.

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

}  // namespace

extern "C" {

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
