// The cache's step planner in C++: the same algorithm as python_planner.py's PythonPlanner, one loop
// per pass instead of dozens of tensor operations per step.
//
// It changes only bookkeeping (row <-> slot maps, pins, dirty bits, policy state, candidate pools);
// the rows themselves are copied by the caller, from the lists this returns: dirty victims to write
// back to the host first, then the rows to load into their slots. Arrays belong to the caller
// (torch tensors); the candidate pools belong to the Planner. Built by native.py with the system C++
// compiler; see there.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

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
  // the rows, where both tiers are in host memory (else null: the caller copies, from the lists)
  float* host;
  float* cache;
  int64_t width;
  // out, each of capacity U (T for the per-table ones)
  int64_t* slots;        // (U,) slot of each unique row, -1: served from the host
  int64_t* overflow;     // positions in uniq served from the host, ascending
  int64_t* wb_rows;      // dirty victims: write cache[wb_slots] back to host[wb_rows] first...
  int64_t* wb_slots;
  int64_t* load_rows;    // ...then load host[load_rows] into cache[load_slots]
  int64_t* load_slots;
  int64_t* short_of;     // (T,) victims wanted but not available (the batch overflows the cache)
  int64_t counts[4];     // n_overflow, n_wb, n_load, and the sum of short_of
  // the group's counters (T,), added to: ids looked up (from `lookups`), unique rows, misses (rows
  // served from the host included), rows served from the host, dirty victims written back
  const int64_t* lookups;
  int64_t* stat_lookups;
  int64_t* stat_touched;
  int64_t* stat_loaded;
  int64_t* stat_from_host;
  int64_t* stat_written;
};

}  // extern "C"

namespace {

constexpr int64_t kParallelCopyRows = 256;  // copy_rows: fewer rows are copied on one thread
// Loops over rows or slots at random places in large arrays ask for the element this many
// iterations ahead (software prefetch): the loads are independent, but the hardware cannot guess them.
constexpr int64_t kAhead = 16;

using Keyed = std::vector<std::pair<int64_t, int64_t>>;  // (eviction key, slot)

struct Scratch {
  std::vector<int64_t> order, held;  // a table's misses (in admission order), its rows read from the host
  Keyed keyed;
};

struct Planner {
  int64_t tables;
  std::vector<int64_t> slot_offsets, row_offsets, capacity;
  int policy;
  int64_t pool_min, pool_factor, pool_rebuild;
  int64_t parallel_rows;  // below this many unique rows a step is planned on one thread
  std::vector<std::vector<int64_t>> pool;
  std::vector<int64_t> floor;
  std::vector<uint8_t> in_pool;
  // reused across steps: per table, where its rows start in uniq and its lists' lengths; the tables
  // in planning order (most rows first); per row, the admission key of a miss; per thread, the
  // scratch of the table it plans
  std::vector<int64_t> starts, lengths, miss_key, by_size;
  std::vector<Scratch> scratch;

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

  int64_t pool_target(int64_t k) const { return std::max(pool_min, pool_factor * k); }

  // Table t's pool from a full scan of its `n` filled slots: the top max(pool_min, pool_factor * k).
  void refresh_pool(const PlanArgs& a, int64_t t, int64_t k, int64_t n, Keyed& keyed) {
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
  void candidates(const PlanArgs& a, int64_t t, int64_t need, int64_t n, Keyed& keyed) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      keyed.clear();
      const std::vector<int64_t>& members = pool[t];
      const int64_t m = members.size();
      for (int64_t i = 0; i < m; ++i) {
        if (i + kAhead < m) {
          const int64_t ahead = members[i + kAhead];
          __builtin_prefetch(a.slot_to_row + ahead);
          __builtin_prefetch(a.pin_until + ahead);
          if (policy == kLookahead) __builtin_prefetch(a.next_use + ahead);
        }
        const int64_t s = members[i];
        const int64_t k = key(a, s);
        if (k >= floor[t] && a.pin_until[s] < a.pin_floor) keyed.emplace_back(k, s);
      }
      const bool complete = floor[t] == kInt64Min;  // the pool holds every filled slot
      const bool run_dry = int64_t(keyed.size()) < need && !complete;
      const bool too_big = int64_t(pool[t].size()) > pool_rebuild * pool_target(need);
      if (attempt || !(run_dry || too_big)) break;
      refresh_pool(a, t, need, n, keyed);
    }
    // the k most evictable, in order: a selection, then a sort of those k only (slots are distinct,
    // so the order is total and the result that of a full sort)
    const int64_t k = std::min<int64_t>(need, keyed.size());
    const auto first = [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    };
    if (k < int64_t(keyed.size())) std::nth_element(keyed.begin(), keyed.begin() + k, keyed.end(), first);
    keyed.resize(k);
    std::sort(keyed.begin(), keyed.end(), first);
  }

  // Table t's share of the plan: its unique rows are uniq[lo, hi) (uniq is sorted, so each table's
  // rows are a range), and its lists go to the same range [lo, hi) of the output arrays (a table
  // loads, writes back and serves from the host at most as many rows as it has); `n` gets their
  // lengths: overflow, write-back, load. With `a.host`, it also copies its rows. Tables share no
  // slot, row, pool or counter, so they are planned at once, each by one thread.
  void plan_table(PlanArgs& a, int64_t t, int64_t lo, int64_t hi, Scratch& sc, int64_t* n) {
    // The slot of every row first, in a pass without branches: the reads of the (large, O(rows))
    // row -> slot map are then independent and overlap, instead of waiting behind mispredicted
    // hit/miss branches.
    for (int64_t u = lo; u < hi; ++u) {
      if (u + kAhead < hi) __builtin_prefetch(a.row_to_slot + a.uniq[u + kAhead]);
      a.slots[u] = a.row_to_slot[a.uniq[u]];
    }
    sc.order.clear();
    int64_t* over = a.overflow + lo;  // positions served from the host, ascending (merged below)
    int64_t n_held = 0;
    for (int64_t u = lo; u < hi; ++u) {  // hits are pinned first, so no victim choice can take them
      const int64_t s = a.slots[u];
      if (s >= 0) {
        a.pin_until[s] = a.step;
      } else if (a.n_host && std::binary_search(a.host_rows, a.host_rows + a.n_host, a.uniq[u])) {
        sc.held.push_back(u);  // updated on the host by the batch in flight: read it there
        ++n_held;
      } else {
        sc.order.push_back(u);
      }
    }
    int64_t n_over = 0, n_wb = 0, n_load = 0;
    int64_t *wb_rows = a.wb_rows + lo, *wb_slots = a.wb_slots + lo;
    int64_t *load_rows = a.load_rows + lo, *load_slots = a.load_slots + lo;
    const int64_t misses = sc.order.size();
    a.stat_lookups[t] += a.lookups[t];
    a.stat_touched[t] += hi - lo;
    a.stat_loaded[t] += misses + n_held;
    a.stat_from_host[t] += n_held;
    a.short_of[t] = 0;
    const bool lookahead = policy == kLookahead;
    if (misses) {
      // admission order: nearest next use, then hottest (lookahead); else row order
      if (lookahead) {
        for (int64_t u : sc.order)
          miss_key[u] = (a.batch_next_use[u] << kColdnessBits) | clamp_cold(cold(a, a.uniq[u]));
        std::stable_sort(sc.order.begin(), sc.order.end(),
                         [&](int64_t x, int64_t y) { return miss_key[x] < miss_key[y]; });
      }
      const int64_t filled = a.filled[t];
      const int64_t take = std::min(misses, capacity[t] - filled);
      const int64_t need = misses - take;
      const int64_t first_free = slot_offsets[t] + filled;
      a.filled[t] += take;
      for (int64_t r = 0; r < take; ++r) {
        const int64_t u = sc.order[r], s = first_free + r;
        a.slots[u] = s;
        load_rows[n_load] = a.uniq[u];
        load_slots[n_load++] = s;
      }
      if (need > 0) {
        candidates(a, t, need, filled, sc.keyed);
        const int64_t avail = sc.keyed.size();
        if (avail < need) a.short_of[t] = need - avail;
        for (int64_t r = 0; r < need; ++r) {
          const int64_t u = sc.order[take + r];
          if (r < avail && (!lookahead || sc.keyed[r].first > miss_key[u])) {
            const int64_t s = sc.keyed[r].second, victim = a.slot_to_row[s];
            if (a.dirty[s]) {
              wb_rows[n_wb] = victim;
              wb_slots[n_wb++] = s;
            }
            a.row_to_slot[victim] = -1;
            a.slots[u] = s;
            load_rows[n_load] = a.uniq[u];
            load_slots[n_load++] = s;
          } else {
            a.slots[u] = -1;
            over[n_over++] = u;
            a.stat_from_host[t] += 1;
          }
        }
        a.stat_written[t] += n_wb;
      }
    }
    if (a.host) {  // dirty victims out before their slots are overwritten
      const int64_t w = a.width;
      for (int64_t k = 0; k < n_wb; ++k)
        std::memcpy(a.host + wb_rows[k] * w, a.cache + wb_slots[k] * w, w * sizeof(float));
      for (int64_t k = 0; k < n_load; ++k)
        std::memcpy(a.cache + load_slots[k] * w, a.host + load_rows[k] * w, w * sizeof(float));
    }
    for (int64_t k = 0; k < n_load; ++k) {
      const int64_t s = load_slots[k];
      a.row_to_slot[load_rows[k]] = int32_t(s);
      a.slot_to_row[s] = load_rows[k];
      a.dirty[s] = 0;
      a.pin_until[s] = a.step;
    }
    for (int64_t u : sc.held) over[n_over++] = u;
    sc.held.clear();
    std::sort(over, over + n_over);
    // Policy state of the used slots, and the pools they may now join (a slot whose key may have
    // risen joins its table's pool if it reaches the floor). The new key is worked out from the
    // batch's own arrays (the slot now holds uniq[u], next used at batch_next_use[u]), not read back
    // from the per-slot arrays at random.
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t s = a.slots[u], row = a.uniq[u];
      if (policy == kLfu) a.access_count[row] += a.occurrences[u];
      if (s < 0) continue;
      int64_t k;
      switch (policy) {
        case kLru:
          a.last_used[s] = a.step;
          k = -a.step;
          break;
        case kLfu:
          k = kMaxColdness - clamp_cold(a.access_count[row]);
          break;
        case kFreq:
          k = cold(a, row);
          break;
        default:
          a.next_use[s] = a.batch_next_use[u];
          k = (a.batch_next_use[u] << kColdnessBits) | clamp_cold(cold(a, row));
      }
      if (!in_pool[s] && k >= floor[t]) {
        in_pool[s] = 1;
        pool[t].push_back(s);
      }
    }
    n[0] = n_over;
    n[1] = n_wb;
    n[2] = n_load;
  }

  void plan(PlanArgs& a) {
    const int64_t U = a.n_uniq;
    // where each table's rows start in uniq
    for (int64_t t = 0; t <= tables; ++t)
      starts[t] = std::lower_bound(a.uniq, a.uniq + U, row_offsets[t]) - a.uniq;
    if (policy == kLookahead) miss_key.resize(U);
#ifdef _OPENMP
    scratch.resize(std::max<size_t>(scratch.size(), omp_get_max_threads()));
#else
    scratch.resize(1);
#endif
    // biggest tables first, so that no thread is left with a big one at the end
    for (int64_t t = 0; t < tables; ++t) by_size[t] = t;
    std::sort(by_size.begin(), by_size.end(), [&](int64_t x, int64_t y) {
      return starts[x + 1] - starts[x] > starts[y + 1] - starts[y];
    });
#pragma omp parallel for schedule(dynamic, 1) if (U >= parallel_rows)
    for (int64_t i = 0; i < tables; ++i) {
      const int64_t t = by_size[i];
#ifdef _OPENMP
      Scratch& sc = scratch[omp_get_thread_num()];
#else
      Scratch& sc = scratch[0];
#endif
      plan_table(a, t, starts[t], starts[t + 1], sc, &lengths[3 * t]);
    }
    // each table's lists, in table order, to the front of the output arrays
    for (auto& c : a.counts) c = 0;
    for (int64_t t = 0; t < tables; ++t) a.counts[3] += a.short_of[t];
    const std::pair<int64_t*, int64_t*> lists[] = {
        {a.overflow, nullptr}, {a.wb_rows, a.wb_slots}, {a.load_rows, a.load_slots}};
    for (int64_t t = 0; t < tables; ++t) {
      for (int l = 0; l < 3; ++l) {
        const int64_t len = lengths[3 * t + l], to = a.counts[l];
        for (int64_t* list : {lists[l].first, lists[l].second})
          if (list && len) std::memmove(list + to, list + starts[t], len * sizeof(int64_t));
        a.counts[l] += len;
      }
    }
  }
};

}  // namespace

extern "C" {

void* planner_new(int64_t tables, const int64_t* slot_offsets, const int64_t* row_offsets, int policy,
                  int64_t pool_min, int64_t pool_factor, int64_t pool_rebuild, int64_t parallel_rows) {
  auto* p = new Planner();
  p->tables = tables;
  p->slot_offsets.assign(slot_offsets, slot_offsets + tables + 1);
  p->row_offsets.assign(row_offsets, row_offsets + tables + 1);
  for (int64_t t = 0; t < tables; ++t) p->capacity.push_back(slot_offsets[t + 1] - slot_offsets[t]);
  p->policy = policy;
  p->pool_min = pool_min;
  p->pool_factor = pool_factor;
  p->pool_rebuild = pool_rebuild;
  p->parallel_rows = parallel_rows;
  p->pool.resize(tables);
  p->floor.resize(tables);
  p->in_pool.resize(slot_offsets[tables]);
  p->starts.resize(tables + 1);
  p->lengths.resize(3 * tables);
  p->by_size.resize(tables);
  p->reset();
  return p;
}

void planner_free(void* p) { delete static_cast<Planner*>(p); }

void planner_reset(void* p) { static_cast<Planner*>(p)->reset(); }

void planner_plan(void* p, PlanArgs* a) { static_cast<Planner*>(p)->plan(*a); }

// Row copies between the cache and the host tier when both are in host memory (the CPU), rows of
// `width` floats, one memcpy each, spread over the threads (faster than torch's index_copy_ here: docs/cache.md).

// dst[dst_idx[i]] = src[src_idx[i]]
void copy_rows(const float* src, const int64_t* src_idx, float* dst, const int64_t* dst_idx, int64_t n,
               int64_t width) {
#pragma omp parallel for if (n >= kParallelCopyRows)
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + dst_idx[i] * width, src + src_idx[i] * width, width * sizeof(float));
}

// A step's rows: out[u] = cache[slots[u]], or host[host_rows[u]] where slots[u] < 0 (served from the host).
void gather_rows(const float* cache, const int64_t* slots, const float* host, const int64_t* host_rows,
                 int64_t n, int64_t width, float* out) {
#pragma omp parallel for if (n >= kParallelCopyRows)
  for (int64_t u = 0; u < n; ++u) {
    const int64_t s = slots[u];
    const float* src = s >= 0 ? cache + s * width : host + host_rows[u] * width;
    std::memcpy(out + u * width, src, width * sizeof(float));
  }
}

// A step's updated rows back: rows[u] to cache[slots[u]] (its dirty bit set, where `dirty` is given),
// or to host[host_rows[u]] where slots[u] < 0.
void scatter_rows(const float* rows, const int64_t* slots, const int64_t* host_rows, int64_t n, int64_t width,
                  float* cache, uint8_t* dirty, float* host) {
#pragma omp parallel for if (n >= kParallelCopyRows)
  for (int64_t u = 0; u < n; ++u) {
    const int64_t s = slots[u];
    if (s >= 0) {
      std::memcpy(cache + s * width, rows + u * width, width * sizeof(float));
      if (dirty) dirty[s] = 1;
    } else {
      std::memcpy(host + host_rows[u] * width, rows + u * width, width * sizeof(float));
    }
  }
}

// A batch enqueued for the lookahead policy, in one pass over its n unique rows: FutureIndex.add
// (future.py; the caller has reserved arena positions base .. base + n - 1, which alias no live
// one) and TableGroup.register_future (a cached row's next use becomes seq if that is sooner).
// Rows are distinct, so the rows are handled at once by several threads.
void future_add(void* p, const int64_t* uniq, int64_t n, int64_t seq, int64_t base, int64_t tail,
                int64_t* last_pos, int64_t* arena, int64_t arena_size, int64_t no_next_use,
                const int32_t* row_to_slot, int64_t* next_use) {
  const int64_t mask = arena_size - 1;  // a power of two
#pragma omp parallel for if (n >= static_cast<Planner*>(p)->parallel_rows)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = uniq[i], prev = last_pos[row];
    if (prev >= tail) arena[prev & mask] = seq;  // the row's previous occurrence: next used here
    arena[(base + i) & mask] = no_next_use;
    last_pos[row] = base + i;
    const int64_t s = row_to_slot[row];
    if (s >= 0 && next_use[s] > seq) next_use[s] = seq;
  }
}

}  // extern "C"
