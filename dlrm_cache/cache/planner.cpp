// The cache's step planner in C++: the same algorithm as the Python planner in group.py
// (TableGroup._plan_python), one loop per pass instead of dozens of tensor operations per step.
//
// It changes only bookkeeping (row <-> slot maps, pins, dirty bits, policy state, candidate pools);
// the rows themselves are copied by the caller, from the lists this returns: dirty victims to write
// back to the host first, then the rows to load into their slots. Arrays belong to the caller
// (torch tensors); the candidate pools belong to the Planner. Built by native.py with the system C++
// compiler; see there.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kInt64Min = std::numeric_limits<int64_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int kColdnessBits = 31;
constexpr int64_t kMaxColdness = (int64_t(1) << kColdnessBits) - 1;

enum Policy { kLru = 0, kLfu = 1, kFreq = 2, kLookahead = 3 };

inline int64_t clamp_cold(int64_t c) { return c < 0 ? 0 : (c > kMaxColdness ? kMaxColdness : c); }

}  // namespace

extern "C" {

// Everything one step's plan reads and writes. Pointers the policy does not use may be null.
struct PlanArgs {
  // the batch
  int64_t n_uniq;
  const int64_t* uniq;            // (U,) sorted global rows
  const int64_t* occurrences;     // (U,)
  const int64_t* batch_next_use;  // (U,) lookahead: each row's next use after this batch
  int64_t step;
  int64_t pin_floor;
  const int64_t* host_rows;  // (H,) sorted rows the batch in flight updates on the host
  int64_t n_host;
  // state
  int32_t* row_to_slot;
  int64_t* slot_to_row;
  int64_t* filled;  // (T,)
  uint8_t* dirty;
  int64_t* pin_until;
  int64_t* next_use;      // lookahead
  int64_t* last_used;     // lru
  int64_t* access_count;  // lfu (per row)
  const int64_t* coldness;  // per row; null: the row itself
  // out, each of capacity U (T for the per-table ones)
  int64_t* slots;        // (U,) slot of each unique row, -1: served from the host
  int64_t* overflow;     // positions in uniq served from the host, ascending
  int64_t* wb_rows;      // dirty victims: write cache[wb_slots] back to host[wb_rows] first...
  int64_t* wb_slots;
  int64_t* load_rows;    // ...then load host[load_rows] into cache[load_slots]
  int64_t* load_slots;
  int64_t* loaded;       // (T,) misses, rows served from the host included
  int64_t* from_host;    // (T,) rows served from the host
  int64_t* written;      // (T,) dirty victims
  int64_t* short_of;     // (T,) victims wanted but not available (the batch overflows the cache)
  int64_t counts[4];     // n_overflow, n_wb, n_load, n_victims
};

}  // extern "C"

namespace {

struct Planner {
  int64_t tables;
  std::vector<int64_t> slot_offsets, row_offsets, capacity;
  int policy;
  int64_t pool_min, pool_factor, pool_rebuild;
  std::vector<std::vector<int64_t>> pool;
  std::vector<int64_t> floor;
  std::vector<uint8_t> in_pool;
  // scratch, reused across steps
  std::vector<int64_t> miss_pos, held_pos, miss_key, order, cand;
  std::vector<std::pair<int64_t, int64_t>> keyed;

  void reset() {
    for (auto& p : pool) p.clear();
    std::fill(floor.begin(), floor.end(), kInt64Max);  // an empty pool with the top floor knows nothing
    std::fill(in_pool.begin(), in_pool.end(), 0);
  }

  int64_t cold(const PlanArgs& a, int64_t row) const { return a.coldness ? a.coldness[row] : row; }

  int64_t key(const PlanArgs& a, int64_t s) const {  // larger: evict first (policy.py)
    switch (policy) {
      case kLru:
        return -a.last_used[s];
      case kLfu:
        return kMaxColdness - clamp_cold(a.access_count[a.slot_to_row[s]]);
      case kFreq:
        return cold(a, a.slot_to_row[s]);
      default:
        return (a.next_use[s] << kColdnessBits) | clamp_cold(cold(a, a.slot_to_row[s]));
    }
  }

  int64_t table_of_slot(int64_t s) const {
    return std::upper_bound(slot_offsets.begin() + 1, slot_offsets.end(), s) - (slot_offsets.begin() + 1);
  }

  int64_t pool_target(int64_t k) const { return std::max(pool_min, pool_factor * k); }

  // Table t's pool from a full scan of its `n` filled slots: the top max(pool_min, pool_factor * k).
  void refresh_pool(const PlanArgs& a, int64_t t, int64_t k, int64_t n) {
    for (int64_t s : pool[t]) in_pool[s] = 0;
    pool[t].clear();
    const int64_t lo = slot_offsets[t];
    if (n == 0) {
      floor[t] = kInt64Min;
      return;
    }
    keyed.clear();
    for (int64_t s = lo; s < lo + n; ++s) keyed.emplace_back(key(a, s), s);
    const int64_t m = std::min(n, pool_target(k));
    std::nth_element(keyed.begin(), keyed.begin() + (m - 1), keyed.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    int64_t lowest = kInt64Max;
    for (int64_t i = 0; i < m; ++i) {
      pool[t].push_back(keyed[i].second);
      in_pool[keyed[i].second] = 1;
      lowest = std::min(lowest, keyed[i].first);
    }
    floor[t] = m < n ? lowest : kInt64Min;
  }

  // Up to `need` victims among table t's `n` filled slots into `keyed` (key, slot), most evictable first.
  void candidates(const PlanArgs& a, int64_t t, int64_t need, int64_t n) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      keyed.clear();
      for (int64_t s : pool[t]) {
        const int64_t k = key(a, s);
        if (k >= floor[t] && a.pin_until[s] < a.pin_floor) keyed.emplace_back(k, s);
      }
      const bool complete = floor[t] == kInt64Min;  // the pool holds every filled slot
      const bool run_dry = int64_t(keyed.size()) < need && !complete;
      const bool too_big = int64_t(pool[t].size()) > pool_rebuild * pool_target(need);
      if (attempt || !(run_dry || too_big)) break;
      refresh_pool(a, t, need, n);
    }
    const int64_t k = std::min<int64_t>(need, keyed.size());
    std::partial_sort(keyed.begin(), keyed.begin() + k, keyed.end(), [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
    keyed.resize(k);
  }

  void track(const PlanArgs& a, int64_t s) {  // a slot whose key may have risen joins its pool
    if (in_pool[s]) return;
    const int64_t t = table_of_slot(s);
    if (key(a, s) >= floor[t]) {
      in_pool[s] = 1;
      pool[t].push_back(s);
    }
  }

  void plan(PlanArgs& a) {
    const int64_t U = a.n_uniq;
    for (int64_t t = 0; t < tables; ++t) a.loaded[t] = a.from_host[t] = a.written[t] = a.short_of[t] = 0;
    miss_pos.clear();
    held_pos.clear();
    for (int64_t u = 0; u < U; ++u) {  // hits are pinned first, so no victim choice can take them
      const int64_t s = a.row_to_slot[a.uniq[u]];
      a.slots[u] = s;
      if (s >= 0) {
        a.pin_until[s] = a.step;
      } else if (a.n_host && std::binary_search(a.host_rows, a.host_rows + a.n_host, a.uniq[u])) {
        held_pos.push_back(u);  // updated on the host by the batch in flight: read it there
      } else {
        miss_pos.push_back(u);
      }
    }
    int64_t n_over = 0, n_wb = 0, n_load = 0, n_victims = 0;
    std::vector<int64_t>& over = cand;  // positions served from the host (sorted below)
    over.clear();
    const bool lookahead = policy == kLookahead;
    // misses come table by table (uniq is sorted)
    size_t i = 0;
    while (i < miss_pos.size()) {
      const int64_t t = std::upper_bound(row_offsets.begin() + 1, row_offsets.end(), a.uniq[miss_pos[i]]) -
                        (row_offsets.begin() + 1);
      size_t j = i;
      while (j < miss_pos.size() && a.uniq[miss_pos[j]] < row_offsets[t + 1]) ++j;
      const int64_t n = j - i;
      a.loaded[t] += n;
      // admission order: nearest next use, then hottest (lookahead); else row order
      order.assign(miss_pos.begin() + i, miss_pos.begin() + j);
      if (lookahead) {
        miss_key.resize(U);
        for (int64_t u : order)
          miss_key[u] = (a.batch_next_use[u] << kColdnessBits) | clamp_cold(cold(a, a.uniq[u]));
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t x, int64_t y) { return miss_key[x] < miss_key[y]; });
      }
      const int64_t filled = a.filled[t];
      const int64_t take = std::min(n, capacity[t] - filled);
      const int64_t need = n - take;
      const int64_t first_free = slot_offsets[t] + filled;
      a.filled[t] += take;
      for (int64_t r = 0; r < take; ++r) {
        const int64_t u = order[r], s = first_free + r;
        a.slots[u] = s;
        a.load_rows[n_load] = a.uniq[u];
        a.load_slots[n_load++] = s;
      }
      if (need > 0) {
        candidates(a, t, need, filled);
        const int64_t avail = keyed.size();
        if (avail < need) a.short_of[t] = need - avail;
        for (int64_t r = 0; r < need; ++r) {
          const int64_t u = order[take + r];
          if (r < avail && (!lookahead || keyed[r].first > miss_key[u])) {
            const int64_t s = keyed[r].second, victim = a.slot_to_row[s];
            if (a.dirty[s]) {
              a.wb_rows[n_wb] = victim;
              a.wb_slots[n_wb++] = s;
              a.written[t] += 1;
            }
            a.row_to_slot[victim] = -1;
            a.slots[u] = s;
            a.load_rows[n_load] = a.uniq[u];
            a.load_slots[n_load++] = s;
            ++n_victims;
          } else {
            a.slots[u] = -1;
            over.push_back(u);
            a.from_host[t] += 1;
          }
        }
      }
      i = j;
    }
    for (int64_t k = 0; k < n_load; ++k) {
      const int64_t s = a.load_slots[k];
      a.row_to_slot[a.load_rows[k]] = int32_t(s);
      a.slot_to_row[s] = a.load_rows[k];
      a.dirty[s] = 0;
      a.pin_until[s] = a.step;
    }
    for (int64_t u : held_pos) {
      const int64_t t = std::upper_bound(row_offsets.begin() + 1, row_offsets.end(), a.uniq[u]) -
                        (row_offsets.begin() + 1);
      a.loaded[t] += 1;
      a.from_host[t] += 1;
      over.push_back(u);
    }
    std::sort(over.begin(), over.end());
    for (int64_t u : over) a.overflow[n_over++] = u;
    for (int64_t u = 0; u < U; ++u) {
      const int64_t s = a.slots[u];
      if (policy == kLfu) a.access_count[a.uniq[u]] += a.occurrences[u];
      if (s < 0) continue;
      if (lookahead) a.next_use[s] = a.batch_next_use[u];
      if (policy == kLru) a.last_used[s] = a.step;
    }
    for (int64_t u = 0; u < U; ++u)
      if (a.slots[u] >= 0) track(a, a.slots[u]);
    a.counts[0] = n_over;
    a.counts[1] = n_wb;
    a.counts[2] = n_load;
    a.counts[3] = n_victims;
  }
};

}  // namespace

extern "C" {

void* planner_new(int64_t tables, const int64_t* slot_offsets, const int64_t* row_offsets, int policy,
                  int64_t pool_min, int64_t pool_factor, int64_t pool_rebuild) {
  auto* p = new Planner();
  p->tables = tables;
  p->slot_offsets.assign(slot_offsets, slot_offsets + tables + 1);
  p->row_offsets.assign(row_offsets, row_offsets + tables + 1);
  for (int64_t t = 0; t < tables; ++t) p->capacity.push_back(slot_offsets[t + 1] - slot_offsets[t]);
  p->policy = policy;
  p->pool_min = pool_min;
  p->pool_factor = pool_factor;
  p->pool_rebuild = pool_rebuild;
  p->pool.resize(tables);
  p->floor.resize(tables);
  p->in_pool.resize(slot_offsets[tables]);
  p->reset();
  return p;
}

void planner_free(void* p) { delete static_cast<Planner*>(p); }

void planner_reset(void* p) { static_cast<Planner*>(p)->reset(); }

void planner_plan(void* p, PlanArgs* a) { static_cast<Planner*>(p)->plan(*a); }

}  // extern "C"
