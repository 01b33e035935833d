/* A PCIe NVMe controller's I/O queues, modelled in C and run by a thread of their own
 * (tests/unit/cfake_nvme.py builds and drives it).
 *
 * Why: the Python device model (test_nvme_driver.MemBarNvme) needs the reactor's loop
 * to give it a turn, or a thread that takes the GIL, so a benchmark of the NVMe lane
 * against it measured the harness's extra loop turn per batch, not the target. This
 * model behaves as hardware does for that measurement: it watches the SQ tail doorbells
 * in the fake BAR's memory, moves the data through the commands' PRPs with its own
 * memory, and posts completions with the phase bit, all without the GIL; the reactor's C
 * poller finds them as it finds a real SSD's. Its thread's CPU is reported apart.
 * Or, with no thread (fdev_doorbell as the queue pairs' doorbell hook), it completes
 * the commands at the doorbell write, inside the target's call, timing itself: on a
 * shared CPU, where a thread of its own waits for a core, that is the only way to model
 * an SSD that is done within the poller's sweep.
 *
 * Registers and the admin queue stay with the Python model (controller bring-up, queue
 * creation, error injection); it tells this one which I/O queues exist, where the
 * namespaces' contents are, and how IOVAs map to memory (the fake IOMMU's table).
 * Everything here runs under one mutex, taken by the thread for each pass over the
 * queues and by each control call, so queues and mappings change only between passes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "fake_nvme_dev.h"

#define PAGE 4096u
#define MAXQ 64
#define MAXNS 8
#define MAXMAP 1024
#define DB_BASE 0x1000u

/* NVMe generic status codes (NVMe 2.0, Figure 101) and one command specific */
#define ST_INVALID_OPCODE 0x001
#define ST_DATA_XFER_ERROR 0x004
#define ST_INVALID_NS 0x00B
#define ST_LBA_RANGE 0x080

struct fq {
    unsigned char *base;     /* the ring in our memory (translated once at creation) */
    uint16_t size;
    uint16_t head;           /* SQ: next entry to fetch; CQ: the host's head as last read */
    uint16_t tail;           /* CQ: next slot to post */
    uint16_t cqid;           /* SQ: its CQ */
    uint8_t phase;           /* CQ */
    uint8_t live;
    int irq_fd;              /* CQ: the eventfd its MSI-X vector signals, or -1 */
};

struct fmap {
    uint64_t iova, size;
    unsigned char *va;
};

struct fns {
    unsigned char *data;
    uint64_t blocks;
    uint32_t bs;
};

struct fdev {
    pthread_mutex_t mu;
    pthread_t thread;
    int running;
    int stop;                /* (read by the thread without the mutex: atomics) */
    volatile uint32_t *bar;
    struct fq sq[MAXQ], cq[MAXQ];
    struct fns ns[MAXNS + 1];
    struct fmap maps[MAXMAP];
    unsigned nmaps;
    uint64_t spin_ns, sleep_ns, latency_ns;
    uint64_t cpu_done_ns;    /* the CPU of the device's threads that have ended */
    uint16_t cids[65536], sts[65536];  /* a pass's completions, posted after its work */
    struct fdev_stats st;
};

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint16_t ld16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t ld32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t ld64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static volatile uint32_t *doorbell(struct fdev *d, unsigned qid, int cq)
{
    return d->bar + (DB_BASE / 4) + 2 * qid + (cq ? 1 : 0);
}

/* our address of [iova, iova + n), or NULL (not mapped: the device would fault) */
static unsigned char *xlate(struct fdev *d, uint64_t iova, uint64_t n)
{
    for (unsigned i = 0; i < d->nmaps; i++) {
        struct fmap *m = &d->maps[i];
        if (iova >= m->iova && iova + n <= m->iova + m->size)
            return m->va + (iova - m->iova);
    }
    return NULL;
}

/* Copy `len` bytes between `mem` and the host memory the PRPs describe (to_host: a
   read's direction), walking PRP lists as the spec has them (NVMe 2.0 4.1.1: the last
   entry of a full list page points to the next list page). 0, or -EFAULT. */
static int prp_copy(struct fdev *d, uint64_t prp1, uint64_t prp2, unsigned char *mem,
                    uint64_t len, int to_host)
{
    uint64_t first = PAGE - (prp1 % PAGE);
    if (first > len)
        first = len;
    uint64_t done = 0, addr = prp1, n = first;
    const unsigned char *list = NULL;
    uint64_t lpos = 0;  /* the IOVA of the next list entry */
    for (;;) {
        unsigned char *p = xlate(d, addr, n);
        if (p == NULL || (prp1 & 3))
            return -EFAULT;
        if (to_host)
            memcpy(p, mem + done, n);
        else
            memcpy(mem + done, p, n);
        done += n;
        if (done == len)
            return 0;
        uint64_t rest = len - done;
        n = rest < PAGE ? rest : PAGE;
        if (done == first && rest <= PAGE) {  /* PRP2 is the data pointer itself */
            if (prp2 % PAGE)
                return -EFAULT;
            addr = prp2;
            continue;
        }
        if (list == NULL)
            lpos = prp2;
        if (lpos % 8)
            return -EFAULT;
        if ((lpos + 8) % PAGE == 0 && rest > PAGE) {  /* a chain to the next list page */
            const unsigned char *e = xlate(d, lpos, 8);
            if (e == NULL || ld64(e) % PAGE)
                return -EFAULT;
            lpos = ld64(e);
        }
        list = xlate(d, lpos, 8);
        if (list == NULL)
            return -EFAULT;
        addr = ld64(list);
        lpos += 8;
        if (addr % PAGE)
            return -EFAULT;
    }
}

/* status of one I/O command (its data moved) */
static uint16_t execute(struct fdev *d, const unsigned char *e)
{
    uint8_t opc = e[0];
    uint32_t nsid = ld32(e + 4);
    if (nsid == 0 || nsid > MAXNS || d->ns[nsid].data == NULL)
        return ST_INVALID_NS;
    struct fns *ns = &d->ns[nsid];
    uint64_t slba = ld64(e + 40);
    uint64_t nlb = (ld32(e + 48) & 0xFFFF) + 1u;
    switch (opc) {
    case 0x00:  /* Flush: the memory is the medium */
        d->st.flushes++;
        return 0;
    case 0x01:  /* Write */
    case 0x02:  /* Read */
    case 0x08:  /* Write Zeroes */
        if (slba + nlb > ns->blocks)
            return ST_LBA_RANGE;
        unsigned char *mem = ns->data + slba * ns->bs;
        uint64_t len = nlb * ns->bs;
        if (opc == 0x08) {
            memset(mem, 0, len);
            return 0;
        }
        if (prp_copy(d, ld64(e + 24), ld64(e + 32), mem, len, opc == 0x02)) {
            d->st.dma_faults++;
            return ST_DATA_XFER_ERROR;
        }
        if (opc == 0x02) {
            d->st.reads++;
            d->st.read_bytes += len;
        } else {
            d->st.writes++;
            d->st.write_bytes += len;
        }
        return 0;
    default:
        return ST_INVALID_OPCODE;
    }
}

/* room for completions in the CQ of SQ `sqid` (the host's head read again) */
static unsigned cq_room(struct fdev *d, unsigned sqid)
{
    struct fq *s = &d->sq[sqid], *c = &d->cq[s->cqid];
    c->head = (uint16_t)*doorbell(d, s->cqid, 1);
    if (c->head >= c->size)
        return 0;  /* (a head beyond the ring: the host's error; nothing is posted) */
    return (unsigned)((c->head + c->size - c->tail - 1) % c->size);
}

/* post the completion of `cid` from SQ `sqid` (room checked by the caller) */
static void post(struct fdev *d, unsigned sqid, uint16_t cid, uint16_t status)
{
    struct fq *s = &d->sq[sqid], *c = &d->cq[s->cqid];
    unsigned char *at = c->base + (size_t)c->tail * 16;
    uint32_t dw2 = (uint32_t)s->head | (uint32_t)sqid << 16;
    memset(at, 0, 8);
    memcpy(at + 8, &dw2, 4);
    memcpy(at + 12, &cid, 2);
    /* the status word, with the phase bit, lands last: the host reads the rest only
       after seeing it */
    __atomic_store_n((uint16_t *)(at + 14), (uint16_t)(status << 1 | c->phase),
                     __ATOMIC_RELEASE);
    c->tail = (uint16_t)(c->tail + 1 == c->size ? 0 : c->tail + 1);
    if (c->tail == 0)
        c->phase ^= 1;
    d->st.completions++;
}

/* One pass over the I/O queues: the SQEs each doorbell announces (as many as its CQ has
   room for) are executed, then their completions posted together, as an SSD working on
   its queue in parallel finishes a burst (the host then finds the batch in one sweep,
   not one entry per look). Returns how many. */
static unsigned pass(struct fdev *d)
{
    uint16_t *cids = d->cids, *sts = d->sts;
    unsigned n = 0;
    for (unsigned q = 1; q < MAXQ; q++) {
        struct fq *s = &d->sq[q];
        if (!s->live || !d->cq[s->cqid].live)
            continue;
        uint16_t tail = (uint16_t)*doorbell(d, q, 0);
        if (tail == s->head || tail >= s->size)
            continue;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);  /* the SQEs after the doorbell */
        unsigned want = (unsigned)((tail + s->size - s->head) % s->size);
        unsigned room = cq_room(d, q);
        if (want > room) {
            d->st.cq_full++;
            want = room;  /* (the rest once the host makes room) */
        }
        uint16_t h = s->head;
        for (unsigned i = 0; i < want; i++) {
            const unsigned char *e = s->base + (size_t)h * 64;
            cids[i] = ld16(e + 2);
            sts[i] = execute(d, e);
            h = (uint16_t)(h + 1 == s->size ? 0 : h + 1);
        }
        for (unsigned i = 0; i < want; i++) {
            s->head = (uint16_t)(s->head + 1 == s->size ? 0 : s->head + 1);
            post(d, q, cids[i], sts[i]);
        }
        int irq = d->cq[s->cqid].irq_fd;
        if (want && irq >= 0) {  /* the vector fires once the batch is posted */
            uint64_t one = 1;
            if (write(irq, &one, sizeof(one)) == sizeof(one))
                d->st.interrupts++;
        }
        n += want;
    }
    return n;
}

static void nap(uint64_t ns)
{
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    nanosleep(&ts, NULL);
}

static void *run(void *arg)
{
    struct fdev *d = arg;
    /* (the default 50 us slack would stretch every nap to 50 us) */
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    uint64_t last = mono_ns(), seen_at = 0;
    while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
        uint64_t now = mono_ns();
        pthread_mutex_lock(&d->mu);
        if (d->latency_ns) {
            /* a fixed latency: what the doorbells announced waits that long first */
            int news = 0;
            for (unsigned q = 1; q < MAXQ && !news; q++)
                news = d->sq[q].live && (uint16_t)*doorbell(d, q, 0) != d->sq[q].head;
            if (news && !seen_at)
                seen_at = now;
            if (news && now - seen_at < d->latency_ns) {
                pthread_mutex_unlock(&d->mu);
                nap(d->latency_ns - (now - seen_at));
                continue;
            }
            seen_at = 0;
        }
        unsigned n = pass(d);
        int idle = !n && now - last >= d->spin_ns;
        d->st.busy_passes += n ? 1 : 0;
        d->st.naps += idle ? 1 : 0;
        pthread_mutex_unlock(&d->mu);
        if (n)
            last = now;
        else if (idle)
            nap(d->sleep_ns);
    }
    struct timespec ts;  /* (its CPU, kept for fdev_thread_cpu_ns once it is gone) */
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    pthread_mutex_lock(&d->mu);
    d->cpu_done_ns += (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

struct fdev *fdev_new(uint32_t *bar, uint64_t spin_ns, uint64_t sleep_ns, uint64_t latency_ns)
{
    struct fdev *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return NULL;
    pthread_mutex_init(&d->mu, NULL);
    d->bar = bar;
    d->spin_ns = spin_ns;
    d->sleep_ns = sleep_ns ? sleep_ns : 1;
    d->latency_ns = latency_ns;
    return d;
}

int fdev_start(struct fdev *d)
{
    if (d->running)
        return 0;
    __atomic_store_n(&d->stop, 0, __ATOMIC_RELEASE);
    int r = pthread_create(&d->thread, NULL, run, d);
    if (r)
        return -r;
    d->running = 1;
    return 0;
}

void fdev_stop(struct fdev *d)
{
    if (!d->running)
        return;
    __atomic_store_n(&d->stop, 1, __ATOMIC_RELEASE);
    pthread_join(d->thread, NULL);
    d->running = 0;
}

void fdev_free(struct fdev *d)
{
    if (d == NULL)
        return;
    fdev_stop(d);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

int fdev_service(struct fdev *d)
{
    pthread_mutex_lock(&d->mu);
    unsigned n = pass(d);
    pthread_mutex_unlock(&d->mu);
    return (int)n;
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Called by the target's C code right after it wrote an SQ doorbell (its db_hook): the
   commands complete before the submitting call goes on, as an SSD finishing within the
   poller's sweep. The clock reads bracket the lock and the pass, so what is counted
   here and subtracted by the bench is the device's; the clock calls' own halves
   outside the bracket stay with the caller (against the target, not for it). */
void fdev_doorbell(void *ctx)
{
    struct fdev *d = ctx;
    uint64_t c0 = thread_cpu_ns();
    pthread_mutex_lock(&d->mu);
    pass(d);
    d->st.sync_calls++;
    d->st.sync_cpu_ns += thread_cpu_ns() - c0;
    pthread_mutex_unlock(&d->mu);
}

int fdev_idle(struct fdev *d)
{
    int idle = 1;
    pthread_mutex_lock(&d->mu);
    for (unsigned q = 1; q < MAXQ && idle; q++)
        idle = !d->sq[q].live || (uint16_t)*doorbell(d, q, 0) == d->sq[q].head;
    pthread_mutex_unlock(&d->mu);
    return idle;
}

int fdev_map(struct fdev *d, uint64_t iova, unsigned char *va, uint64_t size)
{
    int r = 0;
    pthread_mutex_lock(&d->mu);
    if (d->nmaps == MAXMAP)
        r = -ENOSPC;
    else
        d->maps[d->nmaps++] = (struct fmap){iova, size, va};
    pthread_mutex_unlock(&d->mu);
    return r;
}

void fdev_unmap(struct fdev *d, uint64_t iova)
{
    pthread_mutex_lock(&d->mu);
    for (unsigned i = 0; i < d->nmaps; i++)
        if (d->maps[i].iova == iova) {
            d->maps[i] = d->maps[--d->nmaps];
            break;
        }
    pthread_mutex_unlock(&d->mu);
}

int fdev_set_ns(struct fdev *d, uint32_t nsid, unsigned char *data, uint64_t blocks,
                uint32_t block_size)
{
    if (nsid == 0 || nsid > MAXNS)
        return -EINVAL;
    pthread_mutex_lock(&d->mu);
    d->ns[nsid] = (struct fns){data, blocks, block_size};
    pthread_mutex_unlock(&d->mu);
    return 0;
}

static int add_q(struct fdev *d, struct fq *qs, uint16_t qid, uint64_t iova, uint16_t size,
                 uint16_t cqid, size_t esz)
{
    if (qid == 0 || qid >= MAXQ || size < 2)
        return -EINVAL;
    int r = 0;
    pthread_mutex_lock(&d->mu);
    unsigned char *base = xlate(d, iova, (uint64_t)size * esz);
    if (base == NULL)
        r = -EFAULT;
    else
        qs[qid] = (struct fq){.base = base, .size = size, .cqid = cqid, .phase = 1, .live = 1,
                              .irq_fd = -1};
    pthread_mutex_unlock(&d->mu);
    return r;
}

int fdev_add_cq(struct fdev *d, uint16_t qid, uint64_t iova, uint16_t size)
{
    return add_q(d, d->cq, qid, iova, size, 0, 16);
}

int fdev_set_cq_irq(struct fdev *d, uint16_t qid, int fd)
{
    if (qid == 0 || qid >= MAXQ)
        return -EINVAL;
    pthread_mutex_lock(&d->mu);
    d->cq[qid].irq_fd = fd;
    pthread_mutex_unlock(&d->mu);
    return 0;
}

int fdev_add_sq(struct fdev *d, uint16_t qid, uint64_t iova, uint16_t size, uint16_t cqid)
{
    if (cqid == 0 || cqid >= MAXQ)
        return -EINVAL;
    return add_q(d, d->sq, qid, iova, size, cqid, 64);
}

void fdev_del_q(struct fdev *d, uint16_t qid, int cq)
{
    if (qid == 0 || qid >= MAXQ)
        return;
    pthread_mutex_lock(&d->mu);
    (cq ? d->cq : d->sq)[qid].live = 0;
    pthread_mutex_unlock(&d->mu);
}

void fdev_reset(struct fdev *d)
{
    pthread_mutex_lock(&d->mu);
    for (unsigned q = 0; q < MAXQ; q++)
        d->sq[q].live = d->cq[q].live = 0;
    pthread_mutex_unlock(&d->mu);
}

void fdev_stats(struct fdev *d, struct fdev_stats *out)
{
    pthread_mutex_lock(&d->mu);
    *out = d->st;
    pthread_mutex_unlock(&d->mu);
}

uint64_t fdev_thread_cpu_ns(struct fdev *d)
{
    clockid_t cid;
    struct timespec ts;
    pthread_mutex_lock(&d->mu);
    uint64_t ns = d->cpu_done_ns;
    pthread_mutex_unlock(&d->mu);
    if (d->running && !pthread_getcpuclockid(d->thread, &cid) && !clock_gettime(cid, &ts))
        ns += (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    return ns;
}
