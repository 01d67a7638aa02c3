// A batch's ids made ready for one table group's cache (prepare.py: the same as `prepare_ids_torch`):
// checked against their tables, their bags reordered sample-major (bag b * F + f is sample b,
// feature f), the sorted unique global rows with their occurrences, and each id's position among them.
//
// The tables of a group are laid end to end (global row = table's row offset + id), so the sorted
// unique rows of the group are those of each table, table after table: each table is done on its
// own, the tables spread over the threads (largest first). A table whose rows are few next to its
// ids is counted in a histogram of its rows (one pass over its ids); a larger one is radix-sorted on
// the bits of its ids (11 a pass: two passes up to 4M rows, three up to 8G). Each id's unique index is
// first written in the ids' own (feature-major) order, then read into sample-major order by one
// sequential pass over the samples: no scattered writes over the batch.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int kDigitBits = 11;
constexpr int64_t kDenseRows = int64_t(1) << 16;  // tables of up to this many rows (or 2x their ids) are counted

struct PrepareArgs {  // the field order of _PrepareArgs in prepare.py
  int64_t features, batch, tables, threads;
  const int64_t* values;         // the batch's ids: every feature of the KeyedJaggedTensor, feature-major
  const int64_t* value_start;    // (F) where each of the group's features starts in `values`
  const int64_t* lengths;        // (F, B) bag lengths, feature-major
  const int64_t* feature_table;  // (F) non-decreasing: a table's features are consecutive
  const int64_t* row_offsets;    // (T + 1)
  int64_t* offsets;              // out (F * B + 1): bag offsets, sample-major
  int64_t* inverse;              // out (N): position in `uniq` of each id, sample-major
  int64_t* uniq;                 // out (N at most): sorted unique global rows
  int64_t* occurrences;          // out (N at most)
  int64_t* lookups;              // out (T): ids per table
  int64_t n_uniq;                // out
  int64_t one_hot;               // out: every bag holds one id
  int64_t bad;                   // out: first id outside its table, at its position among the group's
                                 // ids taken feature after feature; -1 if none
};

struct Table {
  int64_t first_feature = 0, end_feature = 0, rows = 0, ids = 0;
  int64_t at = 0;            // where its ids start among the group's (feature-major)
  bool dense = false;        // counted in a histogram, else sorted
  int64_t work_at = 0;       // dense: its histogram's start in `counts`; sorted: its pairs' start
  int64_t n_uniq = 0, base = 0;
  uint64_t* sorted = nullptr;  // (id << 32 | index among the table's ids), sorted
};

// Reused by the thread that calls (a batch's size at most): no page faults on fresh memory each batch.
thread_local std::vector<uint64_t> pairs_a, pairs_b;
thread_local std::vector<int64_t> counts;
thread_local std::vector<uint32_t> unique_index;  // each id's, feature-major (table's base + j)

int bits_of(int64_t rows) {
  int b = 0;
  while (b < 63 && (int64_t(1) << b) < rows) ++b;
  return b;
}

// LSD radix sort of (id << 32 | position) on the id's bits; returns the buffer holding the result.
uint64_t* radix_sort(uint64_t* a, uint64_t* b, int64_t n, int bits) {
  const int passes = std::max(1, (bits + kDigitBits - 1) / kDigitBits);
  const int digit = (bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t(1) << digit) - 1;
  std::vector<int64_t> count(size_t(1) << digit);
  for (int p = 0; p < passes; ++p) {
    const int shift = 32 + p * digit;
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t k = c;
      c = sum;
      sum += k;
    }
    for (int64_t i = 0; i < n; ++i) b[count[(a[i] >> shift) & mask]++] = a[i];
    std::swap(a, b);
  }
  return a;
}

}  // namespace

extern "C" {

void prepare_ids(PrepareArgs* a) {
  const int64_t F = a->features, B = a->batch, T = a->tables;
  const int threads = int(std::max<int64_t>(1, a->threads));
  // sample-major bag offsets, and the ids of each feature and table
  std::vector<int64_t> per_feature(F, 0);
  a->offsets[0] = 0;
  bool one_hot = true;
  for (int64_t b = 0, at = 0; b < B; ++b)
    for (int64_t f = 0; f < F; ++f) {
      const int64_t len = a->lengths[f * B + b];
      one_hot &= len == 1;
      per_feature[f] += len;
      at += len;
      a->offsets[b * F + f + 1] = at;
    }
  a->one_hot = one_hot;
  const int64_t n = a->offsets[F * B];
  std::vector<int64_t> feature_at(F + 1, 0);  // where each feature's ids start among the group's
  for (int64_t f = 0; f < F; ++f) feature_at[f + 1] = feature_at[f] + per_feature[f];
  std::vector<Table> tables(T);
  for (int64_t t = 0; t < T; ++t) tables[t].rows = a->row_offsets[t + 1] - a->row_offsets[t];
  for (int64_t f = F - 1; f >= 0; --f) tables[a->feature_table[f]].first_feature = f;
  for (int64_t f = 0; f < F; ++f) {
    Table& t = tables[a->feature_table[f]];
    t.end_feature = f + 1;
    t.ids += per_feature[f];
  }
  int64_t hist_rows = 0, sorted_ids = 0;
  for (int64_t t = 0; t < T; ++t) {
    Table& tb = tables[t];
    a->lookups[t] = tb.ids;
    tb.at = tb.ids ? feature_at[tb.first_feature] : 0;
    tb.dense = tb.rows <= std::max(kDenseRows, 2 * tb.ids);
    if (!tb.ids) continue;
    tb.work_at = tb.dense ? hist_rows : sorted_ids;
    (tb.dense ? hist_rows : sorted_ids) += tb.dense ? tb.rows : tb.ids;
  }
  if (int64_t(pairs_a.size()) < sorted_ids) {
    pairs_a.resize(sorted_ids);
    pairs_b.resize(sorted_ids);
  }
  if (int64_t(counts.size()) < hist_rows) counts.resize(hist_rows);
  if (int64_t(unique_index.size()) < n) unique_index.resize(n);
  // (thread-local: the threads below are handed the caller's)
  uint64_t* const work_a = pairs_a.data();
  uint64_t* const work_b = pairs_b.data();
  int64_t* const hist = counts.data();
  uint32_t* const unique = unique_index.data();
  std::vector<int64_t> order(T);  // largest tables first: they bound the time
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return tables[x].ids > tables[y].ids; });
  const bool parallel = n >= 65536 && threads > 1;

  // each table: its ids checked, then counted or sorted
  std::vector<int64_t> bad(F, -1);  // per feature, its first id outside its table
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (parallel)
  for (int64_t k = 0; k < T; ++k) {
    Table& t = tables[order[k]];
    if (t.ids == 0) continue;
    bool ok = true;
    for (int64_t f = t.first_feature; f < t.end_feature; ++f) {
      const int64_t* v = a->values + a->value_start[f];
      for (int64_t i = 0; i < per_feature[f]; ++i)
        if (v[i] < 0 || v[i] >= t.rows) {
          bad[f] = i;
          ok = false;
          break;
        }
    }
    if (!ok) continue;
    if (t.dense) {
      int64_t* h = hist + t.work_at;
      std::fill(h, h + t.rows, 0);
      for (int64_t f = t.first_feature; f < t.end_feature; ++f) {
        const int64_t* v = a->values + a->value_start[f];
        for (int64_t i = 0; i < per_feature[f]; ++i) ++h[v[i]];
      }
      for (int64_t r = 0; r < t.rows; ++r) t.n_uniq += h[r] != 0;
    } else {
      uint64_t* p = work_a + t.work_at;
      for (int64_t f = t.first_feature, i = 0; f < t.end_feature; ++f) {
        const int64_t* v = a->values + a->value_start[f];
        for (int64_t j = 0; j < per_feature[f]; ++j, ++i) p[i] = uint64_t(v[j]) << 32 | uint64_t(i);
      }
      t.sorted = radix_sort(p, work_b + t.work_at, t.ids, bits_of(t.rows));
      for (int64_t i = 0; i < t.ids; ++i) t.n_uniq += i == 0 || (t.sorted[i] >> 32) != (t.sorted[i - 1] >> 32);
    }
  }
  a->bad = -1;
  for (int64_t f = 0; f < F; ++f)
    if (bad[f] >= 0) {
      a->bad = feature_at[f] + bad[f];
      return;
    }
  int64_t u = 0;
  for (auto& t : tables) {
    t.base = u;
    u += t.n_uniq;
  }
  a->n_uniq = u;

  // the unique rows, their occurrences, and each id's unique index (feature-major)
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (parallel)
  for (int64_t k = 0; k < T; ++k) {
    Table& t = tables[order[k]];
    if (t.ids == 0) continue;
    const int64_t offset = a->row_offsets[order[k]];
    uint32_t* index = unique + t.at;
    if (t.dense) {
      int64_t* h = hist + t.work_at;  // counts, then each row's unique index
      for (int64_t r = 0, j = t.base; r < t.rows; ++r)
        if (h[r]) {
          a->uniq[j] = offset + r;
          a->occurrences[j] = h[r];
          h[r] = j++;
        }
      for (int64_t f = t.first_feature, i = 0; f < t.end_feature; ++f) {
        const int64_t* v = a->values + a->value_start[f];
        for (int64_t j = 0; j < per_feature[f]; ++j, ++i) index[i] = uint32_t(h[v[j]]);
      }
    } else {
      const uint64_t* s = t.sorted;
      int64_t j = t.base - 1;
      for (int64_t i = 0; i < t.ids; ++i) {
        const int64_t id = int64_t(s[i] >> 32);
        if (i == 0 || id != int64_t(s[i - 1] >> 32)) {
          a->uniq[++j] = offset + id;
          a->occurrences[j] = 0;
        }
        ++a->occurrences[j];
        index[s[i] & 0xffffffffu] = uint32_t(j);
      }
    }
  }

  // sample-major: each id's unique index, the samples in chunks over the threads
  const int64_t chunks = parallel ? std::min<int64_t>(B, 8 * threads) : 1;
  std::vector<int64_t> cursor(chunks * F);  // where each chunk's samples start in each feature's ids
  for (int64_t f = 0; f < F; ++f) {
    int64_t at = feature_at[f];
    for (int64_t c = 0; c < chunks; ++c) {
      cursor[c * F + f] = at;
      for (int64_t b = B * c / chunks; b < B * (c + 1) / chunks; ++b) at += a->lengths[f * B + b];
    }
  }
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t* at = cursor.data() + c * F;
    for (int64_t b = B * c / chunks; b < B * (c + 1) / chunks; ++b)
      for (int64_t f = 0; f < F; ++f) {
        const int64_t bag = b * F + f;
        for (int64_t o = a->offsets[bag]; o < a->offsets[bag + 1]; ++o) a->inverse[o] = unique[at[f]++];
      }
  }
}

// A batch's checksum (batch_signature.py): the sum of (i + 1) * v[i], wrapping around as torch's int64
// arithmetic does, in one pass (torch's needs two temporaries the size of the batch).
int64_t checksum_i64(const int64_t* v, int64_t n) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += uint64_t(i + 1) * uint64_t(v[i]);
  return int64_t(s);
}

int64_t checksum_i32(const int32_t* v, int64_t n) {
  uint64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += uint64_t(i + 1) * uint64_t(int64_t(v[i]));
  return int64_t(s);
}

}  // extern "C"
