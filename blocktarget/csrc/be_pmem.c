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
 * namespace without going back to Python at all. One thing here has no Python twin:
 * group commit (bt_pmem_write_group, the lane's), several writes' blocks as one chunk.
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
#define READ_BATCH 64           /* blocks a copying read publishes at once */
#define RTT_MAX 1024            /* blocks reads sent from the pool hold at once */
#define MAP_LOCKS 64
#define MAP_LOCK_SHIFT 4        /* 16 consecutive LBAs share a lock */
#define ZERO_CHUNK 4096         /* LBAs per map-lock round of zeroing */
#define MAX_FREE_PER_LANE 256
_Static_assert(MAX_FREE_PER_LANE <= BT_LBA_SET_MAX, "a group's LBAs fit its set");

static const uint8_t NSEQ[4] = {0, 2, 3, 1};  /* 1 -> 2 -> 3 -> 1 */

struct slot {
    uint64_t off;               /* byte offset of the flog pair */
    uint64_t free;              /* the physical block this slot owns */
    uint32_t next;              /* which entry (0/1) the next update writes */
    uint32_t seq;               /* sequence number of the current entry */
};

struct rtt {                    /* one lane's reader: the blocks it copies from */
    uint32_t n;
    uint64_t blocks[RTT_MAX];
    char pad[64];               /* (lanes' readers on separate cache lines) */
};

/* A write's blocks, one run of consecutive LBAs after another (one run: bt_pmem_write's
   chunk; several: bt_pmem_write_group's, no LBA in two of them). */
struct run {
    uint64_t lba, n;
    const unsigned char *src;
};

struct lane {
    pthread_mutex_t lock;
    struct slot *slots;
    uint32_t nmap;              /* map ranges its last write stored, not yet persisted */
    uint64_t map_off[MAX_FREE_PER_LANE];
    uint64_t map_len[MAX_FREE_PER_LANE];
    struct bt_lba_set group;    /* bt_pmem_write_group's LBAs (under the lock) */
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
    unsigned char *zeroes;      /* one block of zeroes: what a read sent from the pool
                                   sends for an LBA that reads as zeroes */
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
    p->zeroes = calloc(1, g->block_size);
    if (posix_memalign((void **)&p->rtt, 64, g->lanes * sizeof(*p->rtt)) != 0)
        p->rtt = NULL;
    if (p->slots == NULL || p->lanes == NULL || p->rtt == NULL || p->zeroes == NULL) {
        free(p->zeroes);
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
    free(p->zeroes);
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

/* Reads sent from the pool itself (the lane's large reads over a socket it owns, lane.c
 * pmem_read_send): instead of copying the blocks out, the reader gets where they lie and
 * keeps them where no writer can reuse them until the socket has taken its bytes.
 *
 * Why each block is whole, old or new, with writers on other lanes: a writer stores new
 * data only into its slot's free block, which an earlier map store of its own freed, and
 * before storing it checks (after a seq_cst fence) that no other lane's reader has the
 * block published. This reader publishes every block it will send (seq_cst), then
 * re-reads the map: if an entry moved meanwhile it starts over. So either the writer's
 * check sees the block published (it waits until bt_pmem_read_unmap), or the map store
 * that freed the block came before the reader's re-read (the writer's check follows it),
 * which then sees the move and looks again: a block that passes the re-read is the live
 * one and stays untouched while published. Writers of this lane wait for its mutex,
 * held from here to bt_pmem_read_unmap (a one-lane pool relies on that alone). What
 * sendmsg does not take before the caller lets go is copied by the caller first (TCP's
 * sendmsg copies what it accepts before it returns), and the data digest is computed
 * from the same published bytes, so the digest covers exactly what is sent.
 *
 * Several reads may be held at once (the lane sends a batch's reads in one sendmsg):
 * `held` says how many blocks this caller holds already (0: none, the lane's mutex is
 * taken here), and the new ones join them.
 *
 * Returns BT_PMEM_OK with the lane's mutex held and *nsegs pieces in segs (runs of
 * consecutive physical blocks merged; an LBA that reads as zeroes points at a block of
 * zeroes), BT_PMEM_MEDIA for a block with the error flag, or BT_PMEM_RANGE when more
 * blocks than the table takes or more pieces than max would be held: then nothing more
 * is held (what was before stays so; with held 0, the mutex is let go). */
int bt_pmem_read_map(struct bt_pmem *p, uint32_t lane, uint32_t held, uint64_t lba,
                     uint64_t count, struct iovec *segs, unsigned max, unsigned *nsegs)
{
    uint64_t bs = p->g.block_size;
    uint32_t shift = p->shift;
    uint64_t raws[RTT_MAX];
    int shared = p->g.lanes > 1;
    if (!in_range(p, lane, lba, count) || count == 0 || held > RTT_MAX
        || count > RTT_MAX - held)
        return BT_PMEM_RANGE;
    struct rtt *r = &p->rtt[lane];
    if (held == 0)
        pthread_mutex_lock(&p->lanes[lane].lock);
    for (;;) {
        uint32_t k = held;
        for (uint64_t i = 0; i < count; i++) {
            raws[i] = map_get(p, lba + i);
            if (shared && raws[i] >> shift == 3)
                __atomic_store_n(&r->blocks[k++], raws[i] & p->mask, __ATOMIC_RELAXED);
        }
        if (!shared)
            break;
        __atomic_store_n(&r->n, k, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int moved = 0;
        for (uint64_t i = 0; i < count && !moved; i++)
            moved = map_get(p, lba + i) != raws[i];
        if (!moved)
            break;
    }
    unsigned n = 0;
    int rc = BT_PMEM_OK;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t flags = raws[i] >> shift;
        unsigned char *src;
        if (flags == 3) {
            src = p->base + p->g.dataoff + (raws[i] & p->mask) * bs;
            if (n && (unsigned char *)segs[n - 1].iov_base + segs[n - 1].iov_len == src
                && segs[n - 1].iov_base != p->zeroes) {
                segs[n - 1].iov_len += bs;
                continue;
            }
        } else if (flags == 1) {
            rc = BT_PMEM_MEDIA;
            break;
        } else {
            src = p->zeroes;
        }
        if (n == max) {
            rc = BT_PMEM_RANGE;
            break;
        }
        segs[n].iov_base = src;
        segs[n].iov_len = bs;
        n++;
    }
    if (rc != BT_PMEM_OK) {
        if (held == 0) {
            bt_pmem_read_unmap(p, lane);
        } else if (shared) {
            __atomic_store_n(&r->n, held, __ATOMIC_RELEASE);
        }
        return rc;
    }
    *nsegs = n;
    return BT_PMEM_OK;
}

/* The blocks bt_pmem_read_map handed out are no longer read from. */
void bt_pmem_read_unmap(struct bt_pmem *p, uint32_t lane)
{
    __atomic_store_n(&p->rtt[lane].n, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->lanes[lane].lock);
}

/* Does a reader on another lane still copy from `block`? */
static int being_read(struct bt_pmem *p, uint32_t lane, uint64_t block)
{
    for (uint32_t i = 0; i < p->g.lanes; i++) {
        if (i == lane)
            continue;
        struct rtt *r = &p->rtt[i];
        uint32_t n = __atomic_load_n(&r->n, __ATOMIC_SEQ_CST);
        for (uint32_t j = 0; j < n && j < RTT_MAX; j++)
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

/* One chunk of n <= free_per_lane blocks in runs (Pool._write_chunk; a group: the same
   steps over blocks of several writes, see bt_pmem_write_group). 0, or -1 (p->err). */
static int write_chunk(struct bt_pmem *p, uint32_t lane, struct lane *ln,
                       const struct run *runs, uint32_t nruns, uint64_t n)
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
    uint64_t lo = UINT64_MAX, hi = 0, set = 0;
    for (uint32_t r = 0, i = 0; r < nruns; r++) {
        set |= locks_for(runs[r].lba, runs[r].n);
        for (uint64_t b = 0; b < runs[r].n; b++, i++) {
            uint64_t off = p->g.dataoff + slots[i].free * bs;
            copy_flush(p, &pd, off, runs[r].src + b * bs, bs);
            if (off < lo)
                lo = off;
            if (off + bs > hi)
                hi = off + bs;
        }
    }
    if (p->mode == BT_PM_MSYNC)
        flush(p, &pd, lo, hi - lo);
    /* (no drain here: the data only has to be durable before the sequence numbers, and
       the drain after the flog bodies covers both) */
    uint64_t flog_start = slots[0].off;
    uint64_t flog_len = slots[n - 1].off + FLOG_PAIR - flog_start;
    lock_set(p, set);
    int rc = -1;
    /* 2. the flog entries, all but their sequence numbers; drain (data too) */
    for (uint32_t r = 0, i = 0; r < nruns; r++)
        for (uint64_t b = 0; b < runs[r].n; b++, i++) {
            uint64_t lba = runs[r].lba + b;
            uint64_t raw = map_get(p, lba);
            uint64_t old = raw >> p->shift ? raw : (lba | p->zero);
            olds[i] = old;
            uint64_t body[3] = {lba, old, p->normal | slots[i].free};
            uint64_t off = slots[i].off + slots[i].next * FLOG_ENTRY;
            memcpy(p->base + off, body, sizeof(body));
            stored(p, off, sizeof(body));
        }
    flush(p, &pd, flog_start, flog_len);
    /* with them, the map entries this lane's last write stored (so its slots' flog
       entries may be overwritten from step 3 on), and the entries just read as `old`
       (another lane's write may have stored one without persisting it yet; in a
       one-lane pool, only this lane's last write, whose entries are the former) */
    for (uint32_t m = 0; m < ln->nmap; m++)
        flush(p, &pd, ln->map_off[m], ln->map_len[m]);
    if (p->g.lanes > 1)
        for (uint32_t r = 0; r < nruns; r++)
            flush(p, &pd, p->g.mapoff + runs[r].lba * es, runs[r].n * es);
    if (drain(p, &pd) != 0)
        goto out;
    ln->nmap = 0;
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
    for (uint32_t r = 0, i = 0; r < nruns; r++) {
        uint64_t mapoff = p->g.mapoff + runs[r].lba * es;
        for (uint64_t b = 0; b < runs[r].n; b++, i++)
            store(p, mapoff + b * es, p->normal | slots[i].free, es);
        stored(p, mapoff, runs[r].n * es);
        ln->map_off[r] = mapoff;
        ln->map_len[r] = runs[r].n * es;
    }
    ln->nmap = nruns;
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

/* the lane's chunks under its lock; a failure leaves the pool broken */
static int write_runs(struct bt_pmem *p, uint32_t lane, const struct run *runs,
                      uint32_t nruns, uint64_t n)
{
    if (write_chunk(p, lane, &p->lanes[lane], runs, nruns, n) == 0)
        return BT_PMEM_OK;
    /* the run-time free list may no longer match the media: stop writing; reopening
       the pool recovers from what is on the media */
    __atomic_store_n(&p->broken, 1, __ATOMIC_RELEASE);
    return BT_PMEM_FAILED;
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
    for (uint64_t done = 0; done < count && rc == BT_PMEM_OK;) {
        struct run r = {lba + done, count - done < k ? count - done : k, src + done * bs};
        rc = write_runs(p, lane, &r, 1, r.n);
        done += r.n;
    }
    pthread_mutex_unlock(&ln->lock);
    return rc;
}

/* Group commit. The BTT's cost per write is its two drains (fences waiting for the
 * flushed lines, or msyncs), not its blocks: a chunk of k blocks pays them once. A chunk
 * already is k independent one-block writes that share their steps: block i has its own
 * free-list slot (slots[i]: its own free block and its own flog pair), its own flog
 * entry {lba, old, new} naming only itself, and its own commit point (its sequence
 * number); recovery looks at each slot's pair alone. Nothing in the format asks the k
 * blocks to be consecutive LBAs; each entry carries its LBA. So the blocks of several
 * writes of one lane batch (lane.c) are committed as one chunk with the same two drains:
 * step 1 copies all of them, step 2 writes every flog body (each in its own slot's
 * non-current entry: one update per pair, never two in one pair, which the format could
 * not tell apart) and drains once, step 3 stores every sequence number and drains once,
 * step 4 stores the map words. Each block is old or new after a crash at any point,
 * exactly as in a chunk; the caller acknowledges none of the writes before this returns
 * (after the second drain), so nothing acknowledged can be lost.
 *
 * What a chunk guarantees that a group must ask for: no LBA twice (two flog entries for
 * one LBA in one chunk would both read the same `old`: one block owned twice), and at
 * most free_per_lane blocks (one slot each). Either is refused (BT_PMEM_RANGE, nothing
 * written). A failure leaves the pool broken, as for a single write, with any block of
 * the group old or new: the caller hands every write of the group to the Python path. */
uint32_t bt_pmem_group_max(const struct bt_pmem *p)
{
    return p->g.free_per_lane;
}

int bt_pmem_write_group(struct bt_pmem *p, uint32_t lane, uint32_t nw, const uint64_t *lbas,
                        const uint64_t *counts, const unsigned char *const *srcs)
{
    struct run runs[MAX_FREE_PER_LANE];
    uint64_t n = 0;
    if (nw == 0 || nw > p->g.free_per_lane || lane >= p->g.lanes)
        return BT_PMEM_RANGE;
    for (uint32_t i = 0; i < nw; i++) {
        if (counts[i] == 0 || !in_range(p, lane, lbas[i], counts[i]))
            return BT_PMEM_RANGE;
        n += counts[i];
        if (n > p->g.free_per_lane)
            return BT_PMEM_RANGE;
        runs[i] = (struct run){lbas[i], counts[i], srcs[i]};
    }
    struct lane *ln = &p->lanes[lane];
    pthread_mutex_lock(&ln->lock);
    /* (n <= free_per_lane <= BT_LBA_SET_MAX: an add fails only on an LBA seen before) */
    int dup = 0;
    for (uint32_t i = 0; i < nw && !dup; i++)
        for (uint64_t b = 0; b < counts[i] && !dup; b++)
            dup = !bt_lba_set_add(&ln->group, lbas[i] + b);
    bt_lba_set_reset(&ln->group);
    if (dup || bt_pmem_broken(p)) {
        pthread_mutex_unlock(&ln->lock);
        return dup ? BT_PMEM_RANGE : BT_PMEM_BROKEN;
    }
    int rc = write_runs(p, lane, runs, nw, n);
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
