/* The --verify block pattern and the latency histogram of `blocktarget perf`, in C.
 *
 * Both must be exactly what blocktarget/host/perf.py does, so that a run of the C
 * engine and one of the Python engine mean the same thing and their results merge:
 *
 * - make_pattern: every block carries its 16-byte stamp (magic "BTVP", LBA as u64,
 *   generation as u32, little-endian) repeated over the whole block, the last copy cut
 *   short when the block size is not a multiple of 16 (520-byte blocks). A torn or
 *   shifted block therefore fails too, not only a wrong first stamp.
 * - LatencyHistogram.index: exact below 128 ns, then 64 buckets per power of two, the
 *   last bucket counting everything beyond 2^41 ns.
 *
 * tests/unit/test_perf_c.py compares both with the Python functions.
 */
#include <string.h>

#include "bt_perf.h"

#define STAMP 16

static inline void stamp_of(unsigned char s[STAMP], uint64_t lba, uint32_t gen)
{
    memcpy(s, "BTVP", 4);
    memcpy(s + 4, &lba, 8);  /* little-endian hosts only (perf.c checks) */
    memcpy(s + 12, &gen, 4);
}

void bt_perf_make_pattern(unsigned char *buf, uint64_t slba, uint32_t nlb,
                          uint32_t lba_size, uint32_t gen)
{
    unsigned char s[STAMP];
    for (uint32_t i = 0; i < nlb; i++) {
        unsigned char *b = buf + (size_t)i * lba_size;
        stamp_of(s, slba + i, gen);
        uint32_t off = 0;
        for (; off + STAMP <= lba_size; off += STAMP)
            memcpy(b + off, s, STAMP);
        if (off < lba_size)
            memcpy(b + off, s, lba_size - off);
    }
}

uint32_t bt_perf_check_pattern(const unsigned char *buf, uint64_t slba, uint32_t nlb,
                               uint32_t lba_size, uint32_t gen)
{
    unsigned char s[STAMP];
    for (uint32_t i = 0; i < nlb; i++) {
        const unsigned char *b = buf + (size_t)i * lba_size;
        stamp_of(s, slba + i, gen);
        uint64_t w0, w1;
        memcpy(&w0, s, 8);
        memcpy(&w1, s + 8, 8);
        uint32_t off = 0;
        for (; off + STAMP <= lba_size; off += STAMP) {
            uint64_t a, c;
            memcpy(&a, b + off, 8);
            memcpy(&c, b + off + 8, 8);
            if ((a ^ w0) | (c ^ w1))
                return i + 1;
        }
        if (off < lba_size && memcmp(b + off, s, lba_size - off) != 0)
            return i + 1;
    }
    return 0;
}

uint32_t bt_perf_hist_index(uint64_t v)
{
    if (v < 2u << BT_PERF_HIST_SUB_BITS)
        return (uint32_t)v;
    unsigned bits = 64 - (unsigned)__builtin_clzll(v);
    unsigned shift = bits - BT_PERF_HIST_SUB_BITS - 1;
    if (shift > BT_PERF_HIST_MAX_SHIFT)
        return BT_PERF_HIST_BUCKETS - 1;
    return (shift << BT_PERF_HIST_SUB_BITS) + (uint32_t)(v >> shift);
}

void bt_perf_hist_record(struct bt_perf_dir *d, uint64_t v)
{
    d->hist[bt_perf_hist_index(v)]++;
    if (d->lat_count == 0 || v < d->lat_min)
        d->lat_min = v;
    if (v > d->lat_max)
        d->lat_max = v;
    d->lat_count++;
    d->lat_total += v;
}
