/* blocktarget's initiator data plane: `blocktarget perf` driving one I/O queue in C.
 *
 * Python (blocktarget/host/fastperf.py) keeps the control path: it connects (ICReq,
 * Fabrics Connect, Identify) with the host library, then lends the connected I/O
 * queue's socket and what was negotiated to bt_perf_run(), which runs a whole phase of
 * the workload (the timed run, the --verify prefill or read-back) with the GIL
 * released, and returns with nothing outstanding. perf.c says how; perf_pattern.c
 * holds the --verify block pattern and the latency histogram, both byte- and
 * bucket-identical to blocktarget/host/perf.py.
 *
 * The part between the two "cdef" marker lines is handed to cffi's cdef() verbatim
 * (see _fastpath_build.py): plain declarations only.
 */
#ifndef BT_PERF_H
#define BT_PERF_H

#include <stddef.h>
#include <stdint.h>

/* ---- cdef begin ---- */

/* LatencyHistogram's layout (perf.py): values below 128 ns exact, then 64 buckets per
   power of two, 36 * 64 buckets in all, the last one an overflow bucket. */
enum {
    BT_PERF_HIST_SUB_BITS = 6,
    BT_PERF_HIST_MAX_SHIFT = 34,
    BT_PERF_HIST_BUCKETS = 2304,
};

enum bt_perf_mode {
    BT_PERF_TIMED = 0,     /* the workload until duration_ns has passed (or stop) */
    BT_PERF_PREFILL = 1,   /* write generation 1 to every unit, in order, once */
    BT_PERF_READBACK = 2,  /* read and check every unit whose generation is not 0, 1 or
                              unknown, in order, once (verify of write workloads) */
};

/* why bt_perf_run stopped early (0: it did not) */
enum bt_perf_fatal {
    BT_PERF_OK = 0,
    BT_PERF_PROTOCOL = 1,  /* the controller broke the protocol (H2CTermReq sent if fes) */
    BT_PERF_TERMREQ = 2,   /* the controller sent C2HTermReq (fes, fei) */
    BT_PERF_CLOSED = 3,    /* the connection was closed or reset (err: errno, 0 = EOF) */
    BT_PERF_TIMEOUT = 4,   /* commands outstanding and none completed for timeout_ns */
    BT_PERF_ABORTED = 5,   /* stop was set to 2 */
    BT_PERF_NOMEM = 6,
    BT_PERF_BADCFG = 7,    /* msg says which field */
};

enum bt_perf_event_kind {
    BT_PERF_EV_STATUS = 1,  /* a command completed with a non-zero status */
    BT_PERF_EV_VERIFY = 2,  /* a read did not hold what was last written there */
};

/* one of the first ev_max things that went wrong (perf.py turns them into messages) */
struct bt_perf_event {
    uint32_t kind;      /* enum bt_perf_event_kind */
    uint32_t is_read;
    uint64_t unit;      /* within the slice (first_unit is not added) */
    uint32_t status;    /* NVMe status, 15-bit form (sct << 8 | sc) */
    uint32_t gen;       /* BT_PERF_EV_VERIFY: the generation expected */
};

/* one direction's totals; hist has BT_PERF_HIST_BUCKETS counters */
struct bt_perf_dir {
    uint64_t ops, bytes, errors;
    uint64_t lat_count, lat_total, lat_min, lat_max;  /* ns */
    uint64_t *hist;
};

struct bt_perf {
    /* the I/O queue, as the Python control path negotiated it */
    int fd;                 /* connected, non-blocking; borrowed (not closed here) */
    uint8_t hdgst, ddgst;   /* digests enabled by ICResp */
    uint8_t cpda;           /* the controller's PDU data alignment (0's based dwords) */
    uint8_t hpda;           /* ours, as our ICReq said: checked on received PDOs */
    uint32_t maxh2cdata;    /* largest H2CData payload */
    uint32_t icd_max;       /* in-capsule data the queue takes (IOCCSZ); 0 = all on R2T */
    uint32_t max_pdu;       /* largest PDU accepted from the controller */
    uint32_t qd;            /* commands in flight at most; CIDs 0..qd-1 */
    /* the workload */
    uint32_t mode;          /* enum bt_perf_mode */
    uint32_t nsid, lba_size, io_size;
    uint64_t first_unit;    /* this connection's slice of the namespace, in io_size units */
    uint64_t units;
    uint32_t read_share;    /* percent of reads */
    uint8_t random;         /* random offsets (else sequential, wrapping) */
    uint8_t verify;         /* --verify: stamped writes, every read checked against gens */
    uint8_t land;           /* receive read data into per-command buffers even without
                               verify (else payloads nobody reads are dropped unread) */
    uint8_t spin;           /* busy-poll the socket instead of sleeping in poll() (as
                               spdk_nvme_perf does): no wakeup in a completion's latency */
    uint32_t write_flags;   /* OR'ed into every write's CDW12 (FUA) */
    uint64_t seed;
    uint64_t duration_ns;   /* BT_PERF_TIMED */
    uint64_t timeout_ns;    /* outstanding commands and no completion for this long: fatal */
    uint32_t *gens;         /* verify: last acknowledged generation of each unit */
    uint32_t next_gen;      /* verify: generation of the next write (updated) */
    uint32_t pad1;
    const unsigned char *wbuf;  /* what writes carry without verify (io_size bytes) */
    int stop;               /* set by another thread: 1 = stop submitting and drain,
                               2 = return at once (the connection is then unusable) */
    /* results (live: another thread may read the counters while it runs) */
    struct bt_perf_dir rd, wr;
    uint64_t verified_reads, verify_failures;
    uint64_t elapsed_ns;
    uint64_t submitted;     /* commands sent, every mode */
    uint64_t completed;     /* commands completed, every mode */
    uint64_t syscalls_rx, syscalls_tx, polls;
    struct bt_perf_event *ev;   /* ev_max entries; ev_data: ev_max * io_size bytes, the */
    unsigned char *ev_data;     /* data of each BT_PERF_EV_VERIFY read */
    uint32_t ev_max, nev;
    int fatal;              /* enum bt_perf_fatal */
    int err;                /* BT_PERF_CLOSED: errno (0: orderly close) */
    uint32_t fes, fei;      /* TermReq fields (sent or received) */
    uint32_t term_sent;     /* an H2CTermReq went out */
    char msg[240];          /* BT_PERF_PROTOCOL/TIMEOUT/BADCFG: what happened */
};

/* Run one phase (p->mode) on p->fd; returns p->fatal. Never blocks longer than
   p->timeout_ns without a completion, and returns with no command outstanding unless
   p->fatal is set. */
int bt_perf_run(struct bt_perf *p);

/* the pieces perf.py has too, exposed for the differential tests */
void bt_perf_make_pattern(unsigned char *buf, uint64_t slba, uint32_t nlb,
                          uint32_t lba_size, uint32_t gen);
/* 0 when buf holds make_pattern(...), else 1 + index of the first bad block */
uint32_t bt_perf_check_pattern(const unsigned char *buf, uint64_t slba, uint32_t nlb,
                               uint32_t lba_size, uint32_t gen);
uint32_t bt_perf_hist_index(uint64_t v);
void bt_perf_hist_record(struct bt_perf_dir *d, uint64_t v);

/* ---- cdef end ---- */

#endif
