/* The pmem bdev's block translation table in C: reads, atomic writes and zeroing, for the
 * Python path (bdevs/pmem.py's Pool) and the lane (lane.c) alike.
 *
 * bdevs/pmem.py's docstring is the specification: the on-media format, the four steps
 * of a write and their persist points, the map locks hashed on the LBA, the per-lane
 * free lists and the read-tracking table. This file does exactly what Pool's Python
 * methods do, store for store and flush for flush, in the same order (the differential
 * tests compare the pools byte for byte, and the crash-point harness crashes this code at
 * every drain), so a pool written by either is the same and recovery, which stays in
 * Python, is unchanged. Why it exists: a 4 KiB write costs two drains and a dozen
 * Python-level steps; in C it runs with the GIL released and the lane can serve a pmem
 * namespace without going back to Python at all.
 *
 * Concurrency as in Python: a lane mutex around each read and write of that lane (one
 * reactor per lane, so uncontended in the common case), map mutexes taken in ascending
 * order from reading `old` to the map store, and a reader publishing the physical blocks
 * it copies (seq_cst, then re-reading the map) while a writer checks that table before
 * reusing a free block (a fence after the map store that freed it, in an earlier write,
 * orders the two sides as in Dekker's algorithm). A pool of one lane skips the table:
 * its reads and writes all hold the one lane mutex.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#include "bt_pmem.h"

#define FLOG_ENTRY 32
#define FLOG_PAIR 64
#define READ_BATCH 64           /* blocks published in the read-tracking table at once */
#define MAP_LOCKS 64
#define MAP_LOCK_SHIFT 4        /* 16 consecutive LBAs share a lock */
#define ZERO_CHUNK 4096         /* LBAs per map-lock round of zeroing */
#define MAX_FREE_PER_LANE 256

static const uint8_t NSEQ[4] = {0, 2, 3, 1};  /* 1 -> 2 -> 3 -> 1 */

struct slot {
    uint64_t off;               /* byte offset of the flog pair */
    uint64_t free;              /* the physical block this slot owns */
    uint32_t next;              /* which entry (0/1) the next update writes */
    uint32_t seq;               /* sequence number of the current entry */
};

struct rtt {                    /* one lane's reader: the blocks it copies from */
    uint32_t n;
    uint64_t blocks[READ_BATCH];
    char pad[64];               /* (lanes' readers on separate cache lines) */
};

struct lane {
    pthread_mutex_t lock;
    struct slot *slots;
    uint64_t map_lo, map_len;   /* map bytes its last write stored, not yet persisted */
};

struct bt_pmem {
    unsigned char *base;
    uint64_t size;
    struct bt_pmem_geom g;
    uint32_t shift;             /* map entry: flags above this bit */
    uint64_t mask, normal, zero;
    int mode;
    struct bt_pmem_lib lib;
    struct bt_pmem_hook hook;
    int broken;
    int err;
    struct lane *lanes;
    struct slot *slots;
    struct rtt *rtt;
    pthread_mutex_t map_locks[MAP_LOCKS];
};

/* ---- persistence (PersistentMemory's contract: nothing durable before the drain that
   follows its flush) ---- */

struct pending {                /* MsyncMapping's flushed range since the last drain */
    uint64_t lo, hi;
    int any;
};

static void stored(struct bt_pmem *p, uint64_t off, uint64_t len)
{
    if (p->mode == BT_PM_HOOK && p->hook.stored != NULL)
        p->hook.stored(p->hook.ctx, off, len);
}

static void flush(struct bt_pmem *p, struct pending *pd, uint64_t off, uint64_t len)
{
    switch (p->mode) {
    case BT_PM_FLUSH:
        p->lib.flush(p->base + off, len);
        break;
    case BT_PM_MSYNC:
        if (!pd->any) {
            pd->lo = off;
            pd->hi = off + len;
            pd->any = 1;
        } else {
            if (off < pd->lo)
                pd->lo = off;
            if (off + len > pd->hi)
                pd->hi = off + len;
        }
        break;
    default:
        p->hook.flush(p->hook.ctx, off, len);
        break;
    }
}

/* 0, or -1 with p->err set */
static int drain(struct bt_pmem *p, struct pending *pd)
{
    switch (p->mode) {
    case BT_PM_FLUSH:
        p->lib.drain();
        return 0;
    case BT_PM_MSYNC:
        if (!pd->any)
            return 0;
        pd->any = 0;
        if (p->lib.msync(p->base + pd->lo, pd->hi - pd->lo) != 0) {
            p->err = errno ? errno : EIO;
            return -1;
        }
        return 0;
    default:
        if (p->hook.drain(p->hook.ctx) != 0) {
            p->err = EIO;
            return -1;
        }
        return 0;
    }
}

/* a block into place and its write-back started (PersistentMemory.copy_flush) */
static void copy_flush(struct bt_pmem *p, struct pending *pd, uint64_t off,
                       const unsigned char *src, uint64_t n)
{
    if (p->mode == BT_PM_FLUSH) {
        p->lib.memcpy_nodrain(p->base + off, src, n);
        return;
    }
    memcpy(p->base + off, src, n);
    stored(p, off, n);
    if (p->mode == BT_PM_HOOK)
        flush(p, pd, off, n);
}

static inline void store(struct bt_pmem *p, uint64_t off, uint64_t value, uint32_t width)
{
    if (width == 8)
        __atomic_store_n((uint64_t *)(p->base + off), value, __ATOMIC_RELEASE);
    else
        __atomic_store_n((uint32_t *)(p->base + off), (uint32_t)value, __ATOMIC_RELEASE);
}

static inline uint64_t map_get(const struct bt_pmem *p, uint64_t lba)
{
    const unsigned char *e = p->base + p->g.mapoff + lba * p->g.entry_size;
    if (p->g.entry_size == 8)
        return __atomic_load_n((const uint64_t *)e, __ATOMIC_ACQUIRE);
    return __atomic_load_n((const uint32_t *)e, __ATOMIC_ACQUIRE);
}

/* ---- life ---- */

struct bt_pmem *bt_pmem_new(unsigned char *base, uint64_t size, const struct bt_pmem_geom *g,
                            int mode, const struct bt_pmem_lib *lib,
                            const struct bt_pmem_hook *hook)
{
    if (g->entry_size != 4 && g->entry_size != 8)
        return NULL;
    if (g->lanes == 0 || g->free_per_lane == 0 || g->free_per_lane > MAX_FREE_PER_LANE)
        return NULL;
    if (g->dataoff + g->internal_blocks * g->block_size > size
        || g->mapoff + g->num_blocks * g->entry_size > size)
        return NULL;
    if (mode == BT_PM_HOOK ? hook == NULL || hook->flush == NULL || hook->drain == NULL
                           : lib == NULL || lib->flush == NULL || lib->drain == NULL
                             || lib->msync == NULL || lib->memcpy_nodrain == NULL)
        return NULL;
    struct bt_pmem *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->base = base;
    p->size = size;
    p->g = *g;
    p->shift = g->entry_size * 8 - 2;
    p->mask = ((uint64_t)1 << p->shift) - 1;
    p->normal = (uint64_t)3 << p->shift;
    p->zero = (uint64_t)2 << p->shift;
    p->mode = mode;
    if (lib != NULL)
        p->lib = *lib;
    if (hook != NULL)
        p->hook = *hook;
    uint64_t nfree = (uint64_t)g->lanes * g->free_per_lane;
    p->slots = calloc(nfree, sizeof(*p->slots));
    p->lanes = calloc(g->lanes, sizeof(*p->lanes));
    if (posix_memalign((void **)&p->rtt, 64, g->lanes * sizeof(*p->rtt)) != 0)
        p->rtt = NULL;
    if (p->slots == NULL || p->lanes == NULL || p->rtt == NULL) {
        free(p->slots);
        free(p->lanes);
        free(p->rtt);
        free(p);
        return NULL;
    }
    memset(p->rtt, 0, g->lanes * sizeof(*p->rtt));
    for (uint32_t i = 0; i < g->lanes; i++) {
        pthread_mutex_init(&p->lanes[i].lock, NULL);
        p->lanes[i].slots = p->slots + (uint64_t)i * g->free_per_lane;
    }
    for (uint64_t i = 0; i < nfree; i++)
        p->slots[i].off = g->flogoff + i * FLOG_PAIR;
    for (int i = 0; i < MAP_LOCKS; i++)
        pthread_mutex_init(&p->map_locks[i], NULL);
    return p;
}

void bt_pmem_free(struct bt_pmem *p)
{
    if (p == NULL)
        return;
    for (uint32_t i = 0; i < p->g.lanes; i++)
        pthread_mutex_destroy(&p->lanes[i].lock);
    for (int i = 0; i < MAP_LOCKS; i++)
        pthread_mutex_destroy(&p->map_locks[i]);
    free(p->slots);
    free(p->lanes);
    free(p->rtt);
    free(p);
}

void bt_pmem_set_slot(struct bt_pmem *p, uint32_t i, uint32_t next, uint32_t seq,
                      uint64_t free_block)
{
    if (i >= p->g.lanes * p->g.free_per_lane)
        return;
    p->slots[i].next = next & 1;
    p->slots[i].seq = seq & 3;
    p->slots[i].free = free_block;
}

void bt_pmem_get_slot(struct bt_pmem *p, uint32_t i, uint32_t *next, uint32_t *seq,
                      uint64_t *free_block)
{
    if (i >= p->g.lanes * p->g.free_per_lane)
        return;
    struct lane *ln = &p->lanes[i / p->g.free_per_lane];
    pthread_mutex_lock(&ln->lock);  /* (a consistent view of a slot in use) */
    *next = p->slots[i].next;
    *seq = p->slots[i].seq;
    *free_block = p->slots[i].free;
    pthread_mutex_unlock(&ln->lock);
}

int bt_pmem_broken(struct bt_pmem *p)
{
    return __atomic_load_n(&p->broken, __ATOMIC_ACQUIRE);
}

void bt_pmem_set_broken(struct bt_pmem *p)
{
    __atomic_store_n(&p->broken, 1, __ATOMIC_RELEASE);
}

int bt_pmem_errno(struct bt_pmem *p)
{
    return p->err;
}

static int in_range(const struct bt_pmem *p, uint32_t lane, uint64_t lba, uint64_t count)
{
    return lane < p->g.lanes && lba <= p->g.num_blocks && count <= p->g.num_blocks - lba;
}

/* ---- map locks: lba..lba+n-1's, in ascending order (no deadlock) ---- */

static uint64_t locks_for(uint64_t lba, uint64_t n)
{
    uint64_t first = lba >> MAP_LOCK_SHIFT, last = (lba + n - 1) >> MAP_LOCK_SHIFT;
    if (last - first + 1 >= MAP_LOCKS)
        return ~(uint64_t)0;
    uint64_t set = 0;
    for (uint64_t b = first; b <= last; b++)
        set |= (uint64_t)1 << (b % MAP_LOCKS);
    return set;
}

/* (a byte of the set at a time: a one-block write takes one lock, and testing all 64
   bits both ways cost as much as the rest of its BTT bookkeeping; no bit-scan builtin,
   which GCC emits as tzcnt, beyond x86-64-v2) */
static void lock_set(struct bt_pmem *p, uint64_t set)
{
    for (int b = 0; b < MAP_LOCKS; b += 8)
        if (set >> b & 0xff)
            for (int i = b; i < b + 8; i++)
                if (set >> i & 1)
                    pthread_mutex_lock(&p->map_locks[i]);
}

static void unlock_set(struct bt_pmem *p, uint64_t set)
{
    for (int b = 0; b < MAP_LOCKS; b += 8)
        if (set >> b & 0xff)
            for (int i = b; i < b + 8; i++)
                if (set >> i & 1)
                    pthread_mutex_unlock(&p->map_locks[i]);
}

/* ---- reads ---- */

int bt_pmem_read(struct bt_pmem *p, uint32_t lane, uint64_t lba, uint64_t count,
                 unsigned char *dst)
{
    struct lane *ln = &p->lanes[lane];
    struct rtt *r = &p->rtt[lane];
    uint64_t bs = p->g.block_size;
    uint32_t shift = p->shift;
    uint64_t raws[READ_BATCH];
    int rc = BT_PMEM_OK;
    /* Only a writer on another lane can move a block from under this copy (this lane's
       writes wait for its lock): a one-lane pool needs no read tracking. */
    int shared = p->g.lanes > 1;
    if (!in_range(p, lane, lba, count))
        return BT_PMEM_RANGE;
    pthread_mutex_lock(&ln->lock);
    uint64_t done = 0;
    while (done < count) {
        uint64_t n = count - done < READ_BATCH ? count - done : READ_BATCH;
        uint64_t first = lba + done;
        uint32_t k = 0;
        for (uint64_t i = 0; i < n; i++) {
            raws[i] = map_get(p, first + i);
            if (shared && raws[i] >> shift == 3)
                __atomic_store_n(&r->blocks[k++], raws[i] & p->mask, __ATOMIC_RELAXED);
        }
        if (shared) {
            /* publish, then make sure they are still the live ones (a writer reads the
               table after its map store: one of the two sees the other) */
            __atomic_store_n(&r->n, k, __ATOMIC_SEQ_CST);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            int moved = 0;
            for (uint64_t i = 0; i < n && !moved; i++)
                moved = map_get(p, first + i) != raws[i];
            if (moved)
                continue;  /* a write moved one of them meanwhile: look again */
        }
        unsigned char *d = dst + done * bs;
        for (uint64_t i = 0; i < n; i++, d += bs) {
            uint64_t flags = raws[i] >> shift;
            if (flags == 3) {
                memcpy(d, p->base + p->g.dataoff + (raws[i] & p->mask) * bs, bs);
            } else if (flags == 1) {
                rc = BT_PMEM_MEDIA;
                goto out;
            } else {
                memset(d, 0, bs);
            }
        }
        __atomic_store_n(&r->n, 0, __ATOMIC_RELEASE);
        done += n;
    }
out:
    __atomic_store_n(&r->n, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&ln->lock);
    return rc;
}

/* Does a reader on another lane still copy from `block`? */
static int being_read(struct bt_pmem *p, uint32_t lane, uint64_t block)
{
    for (uint32_t i = 0; i < p->g.lanes; i++) {
        if (i == lane)
            continue;
        struct rtt *r = &p->rtt[i];
        uint32_t n = __atomic_load_n(&r->n, __ATOMIC_SEQ_CST);
        for (uint32_t j = 0; j < n && j < READ_BATCH; j++)
            if (__atomic_load_n(&r->blocks[j], __ATOMIC_RELAXED) == block)
                return 1;
    }
    return 0;
}

static int any_reader(struct bt_pmem *p)
{
    for (uint32_t i = 0; i < p->g.lanes; i++)
        if (__atomic_load_n(&p->rtt[i].n, __ATOMIC_SEQ_CST))
            return 1;
    return 0;
}

/* ---- writes ---- */

/* One chunk of n <= free_per_lane blocks: Pool._write_chunk. 0, or -1 (p->err). */
static int write_chunk(struct bt_pmem *p, uint32_t lane, struct lane *ln, uint64_t lba,
                       uint64_t n, const unsigned char *src)
{
    struct slot *slots = ln->slots;
    struct pending pd = {0, 0, 0};
    uint64_t bs = p->g.block_size;
    uint32_t es = p->g.entry_size;
    uint64_t olds[MAX_FREE_PER_LANE];
    /* 1. data into the free blocks (no reader may still be copying from one) */
    if (p->g.lanes > 1) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (any_reader(p))
            for (uint64_t i = 0; i < n; i++)
                while (being_read(p, lane, slots[i].free))
                    sched_yield();
    }
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = p->g.dataoff + slots[i].free * bs;
        copy_flush(p, &pd, off, src + i * bs, bs);
        if (off < lo)
            lo = off;
        if (off + bs > hi)
            hi = off + bs;
    }
    if (p->mode == BT_PM_MSYNC)
        flush(p, &pd, lo, hi - lo);
    /* (no drain here: the data only has to be durable before the sequence numbers, and
       the drain after the flog bodies covers both) */
    uint64_t flog_start = slots[0].off;
    uint64_t flog_len = slots[n - 1].off + FLOG_PAIR - flog_start;
    uint64_t set = locks_for(lba, n);
    lock_set(p, set);
    int rc = -1;
    /* 2. the flog entries, all but their sequence numbers; drain (data too) */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t raw = map_get(p, lba + i);
        uint64_t old = raw >> p->shift ? raw : ((lba + i) | p->zero);
        olds[i] = old;
        uint64_t body[3] = {lba + i, old, p->normal | slots[i].free};
        uint64_t off = slots[i].off + slots[i].next * FLOG_ENTRY;
        memcpy(p->base + off, body, sizeof(body));
        stored(p, off, sizeof(body));
    }
    flush(p, &pd, flog_start, flog_len);
    /* with them, the map entries this lane's last write stored (so its slots' flog
       entries may be overwritten from step 3 on), and the entries just read as `old`
       (another lane's write may have stored one without persisting it yet; in a
       one-lane pool, only this lane's last write, whose entries are the former) */
    if (ln->map_len)
        flush(p, &pd, ln->map_lo, ln->map_len);
    uint64_t mapoff = p->g.mapoff + lba * es;
    if (p->g.lanes > 1)
        flush(p, &pd, mapoff, n * es);
    if (drain(p, &pd) != 0)
        goto out;
    ln->map_len = 0;
    /* 3. the sequence numbers: each block's commit point */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t off = slots[i].off + slots[i].next * FLOG_ENTRY + 24;
        store(p, off, NSEQ[slots[i].seq], 8);
        stored(p, off, 8);
    }
    flush(p, &pd, flog_start, flog_len);
    if (drain(p, &pd) != 0)
        goto out;
    /* 4. the map, persisted by the next write's step 2 (this lane's or, for these
       LBAs, any lane's): until then recovery redoes it from the flog */
    for (uint64_t i = 0; i < n; i++)
        store(p, mapoff + i * es, p->normal | slots[i].free, es);
    stored(p, mapoff, n * es);
    ln->map_lo = mapoff;
    ln->map_len = n * es;
    rc = 0;
out:
    unlock_set(p, set);
    if (rc == 0)
        for (uint64_t i = 0; i < n; i++) {
            slots[i].seq = NSEQ[slots[i].seq];
            slots[i].next ^= 1;
            slots[i].free = olds[i] & p->mask;
        }
    return rc;
}

int bt_pmem_write(struct bt_pmem *p, uint32_t lane, uint64_t lba, uint64_t count,
                  const unsigned char *src)
{
    if (!in_range(p, lane, lba, count))
        return BT_PMEM_RANGE;
    if (bt_pmem_broken(p))
        return BT_PMEM_BROKEN;
    struct lane *ln = &p->lanes[lane];
    uint64_t k = p->g.free_per_lane, bs = p->g.block_size;
    int rc = BT_PMEM_OK;
    pthread_mutex_lock(&ln->lock);
    for (uint64_t done = 0; done < count;) {
        uint64_t n = count - done < k ? count - done : k;
        if (write_chunk(p, lane, ln, lba + done, n, src + done * bs) != 0) {
            /* the run-time free list may no longer match the media: stop writing;
               reopening the pool recovers from what is on the media */
            __atomic_store_n(&p->broken, 1, __ATOMIC_RELEASE);
            rc = BT_PMEM_FAILED;
            break;
        }
        done += n;
    }
    pthread_mutex_unlock(&ln->lock);
    return rc;
}

/* ---- zeroing (Pool.zero) ---- */

int bt_pmem_zero(struct bt_pmem *p, uint64_t lba, uint64_t count)
{
    if (!in_range(p, 0, lba, count))
        return BT_PMEM_RANGE;
    if (bt_pmem_broken(p))
        return BT_PMEM_BROKEN;
    uint32_t es = p->g.entry_size;
    uint64_t end = lba + count;
    for (uint64_t start = lba; start < end;) {
        uint64_t stop = end - start < ZERO_CHUNK ? end : start + ZERO_CHUNK;
        uint64_t set = locks_for(start, stop - start);
        lock_set(p, set);
        struct pending pd = {0, 0, 0};
        uint64_t first = UINT64_MAX, last = 0;
        for (uint64_t b = start; b < stop; b++) {
            uint64_t raw = map_get(p, b);
            uint64_t flags = raw >> p->shift;
            if (flags == 0 || flags == 2)
                continue;  /* already reads as zeroes */
            uint64_t off = p->g.mapoff + b * es;
            store(p, off, p->zero | (raw & p->mask), es);
            stored(p, off, es);
            if (first == UINT64_MAX)
                first = off;
            last = off;
        }
        int rc = 0;
        if (first != UINT64_MAX) {
            flush(p, &pd, first, last + es - first);
            rc = drain(p, &pd);
        }
        unlock_set(p, set);
        if (rc != 0)
            return BT_PMEM_FAILED;
        start = stop;
    }
    return BT_PMEM_OK;
}
