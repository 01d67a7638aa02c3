// Criteo TSV lines -> label, integer and categorical arrays, every field checked, in one pass.
// The same rules as the pyarrow path in criteo_tsv.py (its fallback where no compiler is found):
// label "0" or "1"; integer fields empty (-> 0) or an optional '+' or '-' and digits within int64; categorical
// fields empty (-> -1) or exactly 8 hex digits (-> their 32-bit value). Empty lines are skipped, a
// trailing '\r' is dropped. Built by dlrm_cache/native.py with the system C++ compiler.

#include <cstdint>
#include <cstring>

extern "C" {

struct ParseArgs {
  const char* buf;  // whole lines; the last one may lack its '\n'
  int64_t len;
  int32_t n_fields;  // 40 (labeled) or 39
  int32_t skip_bad;  // 0: stop at the first bad line; 1: drop bad lines and count them
  int64_t first_line;  // the line number of buf's first line
  // out, room for every line of buf; ints and cats column by column: column k's value of row r at
  // [k * stride + r] (the caller's column-major arrays for several pieces of a block, each piece's
  // pointers at its first row)
  int8_t* label;  // (rows,) unused when n_fields == 39
  int64_t* ints;  // 13 columns
  int64_t* cats;  // 26 columns
  int64_t* lines;  // (rows,) line number of each row
  int64_t stride;
  int64_t rows;
  int64_t lines_seen;  // lines in buf, empty ones included
  // the first bad line (skip_bad == 0): its number, the field (-1: a wrong number of fields, then
  // err_fields is how many it has), and where the bad value lies in buf
  int64_t err_line;
  int32_t err_field;
  int32_t err_fields;
  int64_t err_off;
  int64_t err_len;
  // bad lines dropped (skip_bad == 1): per reason (0: number of fields, 1: a field's value), and the
  // first 10 of them
  int64_t bad[2];
  int64_t bad_first[10];
  int32_t n_bad_first;
};

}  // extern "C"

namespace {

constexpr int kInts = 13;

// The value of each byte as a hex digit, -1 for the bytes that are not one.
struct HexTable {
  int8_t value[256];
  constexpr HexTable() : value() {
    for (int c = 0; c < 256; ++c)
      value[c] = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
  }
};
constexpr HexTable kHex;

inline bool parse_int(const char* p, int64_t n, int64_t* out) {
  if (n == 0) {
    *out = 0;
    return true;
  }
  const bool neg = *p == '-';
  if (neg || *p == '+') {
    ++p;
    --n;
  }
  if (n < 1) return false;
  // within int64: up to 2^63 - 1, or 2^63 negated
  const uint64_t limit = neg ? (uint64_t(1) << 63) : (uint64_t(1) << 63) - 1;
  uint64_t v = 0;
  for (int64_t i = 0; i < n; ++i) {
    const unsigned d = static_cast<unsigned char>(p[i]) - '0';
    if (d > 9 || v > (limit - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = neg ? int64_t(0 - v) : int64_t(v);
  return true;
}

inline bool parse_hex(const char* p, int64_t n, int64_t* out) {
  if (n == 0) {
    *out = -1;
    return true;
  }
  if (n != 8) return false;
  int64_t v = 0;
  int bad = 0;
  for (int i = 0; i < 8; ++i) {
    const int d = kHex.value[static_cast<unsigned char>(p[i])];
    bad |= d;  // negative once any digit is not one
    v = (v << 4) | (d & 15);
  }
  *out = v;
  return bad >= 0;
}

}  // namespace

// The '\n' bytes of buf[0, len): a block's lines, counted to place its pieces before they are parsed.
extern "C" int64_t count_newlines(const char* buf, int64_t len) {
  int64_t n = 0;
  const char* const end = buf + len;
  for (const char* p = buf; (p = static_cast<const char*>(std::memchr(p, '\n', end - p))); ++p) ++n;
  return n;
}

extern "C" void criteo_parse(ParseArgs* a) {
  const char* p = a->buf;
  const char* const end = a->buf + a->len;
  const bool labeled = a->n_fields == 40;
  int64_t row = 0, line = a->first_line;
  a->err_line = 0;
  a->bad[0] = a->bad[1] = 0;
  a->n_bad_first = 0;
  while (p < end) {
    const char* eol = static_cast<const char*>(std::memchr(p, '\n', end - p));
    if (eol == nullptr) eol = end;
    const char* next = eol < end ? eol + 1 : end;
    const char* stop = (eol > p && eol[-1] == '\r') ? eol - 1 : eol;
    if (stop == p) {  // an empty line
      p = next;
      ++line;
      continue;
    }
    int field = 0, bad_field = -2;  // -2: none
    const char* bad_at = nullptr;
    int64_t bad_len = 0;
    const char* f = p;
    while (true) {
      const char* t = f;
      while (t < stop && *t != '\t') ++t;
      if (field < a->n_fields && bad_field == -2) {
        const int64_t n = t - f;
        bool ok;
        if (labeled && field == 0) {
          ok = n == 1 && (*f == '0' || *f == '1');
          a->label[row] = static_cast<int8_t>(ok && *f == '1');
        } else {
          const int k = field - (labeled ? 1 : 0);
          ok = k < kInts ? parse_int(f, n, a->ints + k * a->stride + row)
                         : parse_hex(f, n, a->cats + (k - kInts) * a->stride + row);
        }
        if (!ok) {
          bad_field = field;
          bad_at = f;
          bad_len = n;
        }
      }
      ++field;
      if (t >= stop) break;
      f = t + 1;
    }
    if (field != a->n_fields) bad_field = -1;
    if (bad_field == -2) {
      a->lines[row++] = line;
    } else if (!a->skip_bad) {
      a->err_line = line;
      a->err_field = bad_field;
      a->err_fields = field;
      a->err_off = bad_at ? bad_at - a->buf : 0;
      a->err_len = bad_len;
      break;
    } else {
      const int reason = bad_field == -1 ? 0 : 1;
      ++a->bad[reason];
      if (a->n_bad_first < 10) a->bad_first[a->n_bad_first++] = line;
    }
    p = next;
    ++line;
  }
  a->rows = row;
  a->lines_seen = line - a->first_line;
}
