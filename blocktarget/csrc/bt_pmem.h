/* blocktarget C data plane: the pmem bdev's block translation table (be_pmem.c), shared
 * by the Python path (bdevs/pmem.py's Pool calls it for every read, write and zeroing
 * when the extension is built) and the lane (lane.c, BT_BE_PMEM), so both use one set of
 * free-list slots, map locks and read-tracking table.
 *
 * Recovery, formatting and checking stay in Python (bdevs/pmem.py), which hands the
 * recovered free-list slots over with bt_pmem_set_slot. The cdef section follows the
 * same rules as bt_lane.h's.
 */
#ifndef BT_PMEM_H
#define BT_PMEM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- cdef begin ---- */

struct bt_pmem;             /* an open pool's BTT as C runs it */

/* libpmem's functions, as Python found them (blocktarget._pmem): the lane's extension
   does not link libpmem itself, so it builds and loads where libpmem is missing. */
struct bt_pmem_lib {
    void (*flush)(const void *addr, size_t len);
    void (*drain)(void);
    int (*msync)(const void *addr, size_t len);
    void *(*memcpy_nodrain)(void *dst, const void *src, size_t len);
};

/* A test's stand-in for the media (tests/unit/test_pmem_crash.py): told every range C
   stored into (after the stores), every flush and every drain; a drain returning
   non-zero fails the operation as a failed msync would. */
struct bt_pmem_hook {
    void *ctx;
    void (*stored)(void *ctx, uint64_t off, uint64_t len);
    void (*flush)(void *ctx, uint64_t off, uint64_t len);
    int (*drain)(void *ctx);
};

/* how stores are made durable: as bdevs/pmem.py's PmemMapping (cache-line flushes and a
   fence), MsyncMapping (pmem_msync of what was flushed since the last drain), or a hook */
enum bt_pmem_mode { BT_PM_FLUSH = 0, BT_PM_MSYNC = 1, BT_PM_HOOK = 2 };

/* results of the I/O calls */
enum bt_pmem_rc {
    BT_PMEM_OK = 0,
    BT_PMEM_MEDIA = 1,      /* a block's map entry carries the error flag (a read) */
    BT_PMEM_BROKEN = 2,     /* an earlier write failed half way: no writes until reopened */
    BT_PMEM_FAILED = 3,     /* making a step durable failed (errno in bt_pmem_errno); a
                               write leaves the pool broken */
    BT_PMEM_RANGE = 4       /* blocks outside the pool, or no such lane (nothing done) */
};

/* Layout (bdevs/pmem.py) as far as the I/O paths need it. */
struct bt_pmem_geom {
    uint32_t block_size;
    uint32_t entry_size;    /* 4 or 8 */
    uint32_t lanes;
    uint32_t free_per_lane;
    uint64_t num_blocks;
    uint64_t internal_blocks;
    uint64_t flogoff, mapoff, dataoff;
};

/* The BTT over `size` bytes at base; NULL when out of memory or the geometry does not
   fit. lib for BT_PM_FLUSH / BT_PM_MSYNC, hook for BT_PM_HOOK (both copied). */
struct bt_pmem *bt_pmem_new(unsigned char *base, uint64_t size, const struct bt_pmem_geom *g,
                            int mode, const struct bt_pmem_lib *lib,
                            const struct bt_pmem_hook *hook);
/* Only once no read or write runs on it (the bdev is gone, its lanes refreshed). */
void bt_pmem_free(struct bt_pmem *p);
/* Free-list slot i (lane * free_per_lane + s) as recovery found it: the flog entry the
   next update writes (0/1), the current entry's sequence number, the free block. */
void bt_pmem_set_slot(struct bt_pmem *p, uint32_t i, uint32_t next, uint32_t seq,
                      uint64_t free_block);
void bt_pmem_get_slot(struct bt_pmem *p, uint32_t i, uint32_t *next, uint32_t *seq,
                      uint64_t *free_block);

/* count blocks from lba into dst; each block whole, old or new (enum bt_pmem_rc) */
int bt_pmem_read(struct bt_pmem *p, uint32_t lane, uint64_t lba, uint64_t count,
                 unsigned char *dst);
/* count blocks from src, each atomically (enum bt_pmem_rc) */
int bt_pmem_write(struct bt_pmem *p, uint32_t lane, uint64_t lba, uint64_t count,
                  const unsigned char *src);
/* nw writes (lbas[i], counts[i] blocks from srcs[i]) of one lane committed together: each
   block atomically, with the two drains of one chunk for all (be_pmem.c). No LBA in two
   writes and at most free_per_lane blocks in all, else BT_PMEM_RANGE with nothing done. */
int bt_pmem_write_group(struct bt_pmem *p, uint32_t lane, uint32_t nw, const uint64_t *lbas,
                        const uint64_t *counts, const unsigned char *const *srcs);
/* make count blocks read as zeroes (map flag; no data written) */
int bt_pmem_zero(struct bt_pmem *p, uint64_t lba, uint64_t count);
int bt_pmem_broken(struct bt_pmem *p);
/* No more writes (Python found the pool unusable): the lane leaves them to Python too. */
void bt_pmem_set_broken(struct bt_pmem *p);
int bt_pmem_errno(struct bt_pmem *p);

/* ---- cdef end ---- */

/* Reads sent from where their blocks lie (be_pmem.c has the argument): count blocks
   from lba as up to max pieces, held for the caller with the `held` it holds already
   (no writer reuses them, the lane's mutex is held) until bt_pmem_read_unmap.
   BT_PMEM_OK, BT_PMEM_MEDIA, or BT_PMEM_RANGE (more blocks or pieces than it takes):
   nothing more held then. */
int bt_pmem_read_map(struct bt_pmem *p, uint32_t lane, uint32_t held, uint64_t lba,
                     uint64_t count, struct iovec *segs, unsigned max, unsigned *nsegs);
void bt_pmem_read_unmap(struct bt_pmem *p, uint32_t lane);

/* The most blocks bt_pmem_write_group takes at once (the lane's free-list slots). */
uint32_t bt_pmem_group_max(const struct bt_pmem *p);

/* The LBAs of a group, exactly (a group may hold no LBA twice: one flog entry per LBA).
   Why not a filter: a 256-bit filter of 32 random one-block writes' LBAs saw a false
   repeat in most groups, and each then compared every pair of writes, an eighth of the
   forced write path's CPU (bench/RESULTS.md, "the group's LBAs"). An open-addressed set
   twice the size of the largest group answers in about one probe. It must start zeroed
   (calloc); a reset clears only the entries it used. */
#define BT_LBA_SET_MAX 256              /* blocks: be_pmem.c's MAX_FREE_PER_LANE */
#define BT_LBA_SET_MASK (2 * BT_LBA_SET_MAX - 1)

struct bt_lba_set {
    uint32_t n;
    uint16_t used[BT_LBA_SET_MAX];      /* where the n LBAs are in key */
    uint64_t key[2 * BT_LBA_SET_MAX];   /* lba + 1; 0: empty */
};

static inline uint32_t bt_lba_set_slot(uint64_t lba)
{
    return (uint32_t)((lba * 0x9E3779B97F4A7C15ull) >> 55) & BT_LBA_SET_MASK;
}

static inline int bt_lba_set_has(const struct bt_lba_set *s, uint64_t lba)
{
    for (uint32_t h = bt_lba_set_slot(lba); s->key[h] != 0; h = (h + 1) & BT_LBA_SET_MASK)
        if (s->key[h] == lba + 1)
            return 1;
    return 0;
}

/* 1: added; 0: it was there already, or the set is full (nothing added either way) */
static inline int bt_lba_set_add(struct bt_lba_set *s, uint64_t lba)
{
    if (s->n == BT_LBA_SET_MAX)
        return 0;
    uint32_t h = bt_lba_set_slot(lba);
    for (; s->key[h] != 0; h = (h + 1) & BT_LBA_SET_MASK)
        if (s->key[h] == lba + 1)
            return 0;
    s->key[h] = lba + 1;
    s->used[s->n++] = (uint16_t)h;
    return 1;
}

static inline void bt_lba_set_reset(struct bt_lba_set *s)
{
    for (uint32_t i = 0; i < s->n; i++)
        s->key[s->used[i]] = 0;
    s->n = 0;
}

#endif
