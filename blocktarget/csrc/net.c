/* A reactor's socket poller for the lanes' connections (bt_net.h says why).
 *
 * Ownership: a connection is lent to C only in its steady state (nvme/netpoll.py decides
 * when: what makes lane.usable() true, nothing queued on the transport), with its
 * transport paused for reading. From then on C alone reads and writes the fd, and
 * everything sent on it goes through the one queue here, the Python path's output too
 * (bt_net_write), so the two never overtake each other. C gives the socket back
 * (detaches) at the first input the lane does not take, at the end of the stream or a
 * socket error, and whenever Python asks; the unsent output then goes to the transport
 * before anything else, and the transport reads again. C never closes the fd: the
 * transport owns it.
 *
 * Flow control as the Python path's: output queued beyond the transport's high mark
 * stops reading (the input not yet run waits in `pend`), the low mark resumes it, and
 * Python hears of both (its stall watch closes a connection whose host never reads).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* (ppoll) */
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "bt_lane.h"
#include "bt_net.h"
#include "lane_int.h"

#define RBUF (256u << 10)      /* one receive: as the event loop's own read size */
#define BATCH 64               /* commands per lane call: output is sent between calls */
#define MAX_OUT (1u << 20)     /* output bytes per lane call (fastlane.MAX_OUT) */
#define IOV 64                 /* pieces per sendmsg */
#define IOV_DIRECT 512         /* pieces per sendmsg of a read sent from where it lies
                                  (below the kernel's UIO_MAXIOV, 1024) */

static size_t total_len(const struct iovec *v, unsigned k)
{
    size_t n = 0;
    for (unsigned i = 0; i < k; i++)
        n += v[i].iov_len;
    return n;
}
#define EVENTS 64
/* epoll data of what is not a connection (a bt_conn pointer, 16-byte aligned, so the
   low bits clear): RING_TAG, an io_uring ring's eventfd (its index above TAG_SHIFT);
   with IRQ_TAG too, an NVMe queue's interrupt eventfd (the fd above TAG_SHIFT);
   TIMER_TAG, the host wait's bound (n->tfd) */
#define RING_TAG 1u
#define IRQ_TAG 2u
#define TIMER_TAG 4u
#define TAG_SHIFT 3

struct bt_net *bt_net_new(void)
{
    struct bt_net *n = calloc(1, sizeof(*n));
    if (n == NULL)
        return NULL;
    n->epfd = epoll_create1(EPOLL_CLOEXEC);
    n->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    n->rbuf = malloc(RBUF);
    struct epoll_event e = {0};
    e.events = EPOLLIN;
    e.data.u64 = TIMER_TAG;
    if (n->epfd < 0 || n->tfd < 0 || n->rbuf == NULL
            || epoll_ctl(n->epfd, EPOLL_CTL_ADD, n->tfd, &e) != 0) {
        if (n->epfd >= 0)
            close(n->epfd);
        if (n->tfd >= 0)
            close(n->tfd);
        free(n->rbuf);
        free(n);
        return NULL;
    }
    n->rcap = RBUF;
    n->win_ns = UINT64_MAX;  /* (the whole window until the host's pace is known) */
    n->loop_fd = -1;
    return n;
}

void bt_net_free(struct bt_net *n)
{
    if (n == NULL)
        return;
    for (uint32_t i = 0; i < n->nnvmeqs; i++)
        if (n->nvme_efd[i] >= 0)
            close(n->nvme_efd[i]);
    close(n->epfd);
    close(n->tfd);
    free(n->rbuf);
    free(n);
}

static void mark_ready(struct bt_conn *c)
{
    if (!c->on_ready) {
        c->on_ready = 1;
        c->next_ready = c->net->ready;
        c->net->ready = c;
        c->net->nready++;
    }
}

/* After C did something for a connection: Python hears of the connection only if it
   must act (events and hand-backs mark it themselves), and of I/O started once for all
   of them; the counters it folds later. */
static void served(struct bt_conn *c)
{
    struct bt_lane *l = c->lane;
    if (l->submitted != c->seen_submitted) {
        c->seen_submitted = l->submitted;
        c->net->lane_started = 1;
    }
}

void net_budget(struct bt_conn *c, int64_t d)
{
    c->net->bud_delta += d;
}

/* The epoll interest of an attached connection: input unless paused, output while
   some is queued and the socket refused it. */
static void watch(struct bt_conn *c)
{
    if (!c->attached)
        return;
    struct epoll_event e = {0};
    e.events = (c->paused ? 0 : EPOLLIN) | (c->epout ? EPOLLOUT : 0) | EPOLLRDHUP;
    e.data.ptr = c;
    epoll_ctl(c->net->epfd, EPOLL_CTL_MOD, c->fd, &e);
}

struct bt_conn *bt_net_attach(struct bt_net *n, int fd, struct bt_lane *l, void *handle,
                              size_t high, size_t low)
{
    struct bt_conn *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->fd = fd;
    c->lane = l;
    c->handle = handle;
    c->high = high;
    c->low = low;
    c->net = n;
    struct epoll_event e = {0};
    e.events = EPOLLIN | EPOLLRDHUP;
    e.data.ptr = c;
    if (epoll_ctl(n->epfd, EPOLL_CTL_ADD, fd, &e) != 0) {
        int err = errno;
        free(c);
        errno = err;
        return NULL;
    }
    c->attached = 1;
    l->conn = c;
    c->seen_submitted = l->submitted;
    n->nconns++;
    return c;
}

/* Keep input not yet run: it goes before the next receive (or to Python). */
static int stash(struct bt_conn *c, const unsigned char *in, size_t len)
{
    unsigned char *p = realloc(c->pend, c->pend_len + len);
    if (p == NULL)
        return -1;
    memcpy(p + c->pend_len, in, len);
    c->pend = p;
    c->pend_len += len;
    return 0;
}

void bt_net_detach(struct bt_conn *c)
{
    if (!c->attached)
        return;
    c->attached = 0;
    epoll_ctl(c->net->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    c->net->nconns--;
    if (c->lane != NULL && c->lane->conn == c)
        c->lane->conn = NULL;
    if (c->pend_len) {
        /* input the lane has not seen: the Python path's now, after any hand */
        unsigned char *h = realloc(c->hand, c->hand_len + c->pend_len);
        if (h != NULL) {
            memcpy(h + c->hand_len, c->pend, c->pend_len);
            c->hand = h;
            c->hand_len += c->pend_len;
            c->ev |= BT_NET_HAND;
        }
        free(c->pend);
        c->pend = NULL;
        c->pend_len = 0;
    }
}

unsigned bt_net_take(struct bt_conn *c, struct bt_chunk *out, unsigned max)
{
    unsigned n = c->qn < max ? c->qn : max;
    for (unsigned i = 0; i < n; i++) {
        out[i] = c->q[c->qhead + i];
        if (i == 0 && c->qoff) {
            out[0].start += c->qoff;
            out[0].len -= c->qoff;
            c->qoff = 0;
        }
        c->out_bytes -= out[i].len;
    }
    c->qhead += n;
    c->qn -= n;
    return n;
}

void bt_net_conn_free(struct bt_conn *c)
{
    if (c == NULL)
        return;
    bt_net_detach(c);
    if (c->on_ready) {
        struct bt_conn **pp = &c->net->ready;
        while (*pp != NULL && *pp != c)
            pp = &(*pp)->next_ready;
        if (*pp == c) {
            *pp = c->next_ready;
            c->net->nready--;
        }
    }
    for (uint32_t i = 0; i < c->qn; i++)
        chunk_release(&c->q[c->qhead + i]);
    free(c->q);
    free(c->pend);
    free(c->hand);
    free(c);
}

/* room for k more queued pieces; 0: out of memory */
static int q_room(struct bt_conn *c, uint32_t k)
{
    if (c->qhead + c->qn + k <= c->qcap)
        return 1;
    if (c->qhead) {  /* slide what is left to the front first */
        memmove(c->q, c->q + c->qhead, c->qn * sizeof(*c->q));
        c->qhead = 0;
        if (c->qn + k <= c->qcap)
            return 1;
    }
    uint32_t cap = c->qcap ? c->qcap * 2 : 64;
    while (cap < c->qn + k)
        cap *= 2;
    struct bt_chunk *q = realloc(c->q, cap * sizeof(*q));
    if (q == NULL)
        return 0;
    c->q = q;
    c->qcap = cap;
    return 1;
}

/* A socket error or the peer gone: C lets go of the socket and Python's transport,
   reading again, meets the same condition and ends the connection as it always does. */
static void failed(struct bt_conn *c)
{
    c->ev |= BT_NET_EOF;
    mark_ready(c);
    bt_net_detach(c);
}

static void hand_back(struct bt_conn *c, unsigned char *first, size_t nfirst,
                      const unsigned char *rest, size_t nrest);
static void flow(struct bt_conn *c);

/* One non-blocking sendmsg of `v`: the bytes sent, 0 when the socket is full (counted
   as blocked), -1 when the connection failed (failed() has run). */
static ssize_t send_some(struct bt_conn *c, struct iovec *v, unsigned k)
{
    for (;;) {
        struct msghdr m = {0};
        m.msg_iov = v;
        m.msg_iovlen = k;
        ssize_t r = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r > 0) {
            c->sends++;
            c->tx_bytes += (uint64_t)r;
            return r;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 || errno == EAGAIN || errno == EWOULDBLOCK) {
            c->blocked++;
            return 0;
        }
        failed(c);
        return -1;
    }
}

/* Send what is queued, as far as the socket takes it; then the flow control. */
static void send_queue(struct bt_conn *c)
{
    while (c->qn && c->attached) {
        struct iovec iov[IOV];
        unsigned k = c->qn < IOV ? c->qn : IOV;
        for (unsigned i = 0; i < k; i++) {
            struct bt_chunk *ch = &c->q[c->qhead + i];
            size_t off = i == 0 ? c->qoff : 0;
            iov[i].iov_base = ch->start + off;
            iov[i].iov_len = ch->len - off;
        }
        ssize_t r = send_some(c, iov, k);
        if (r < 0)
            return;
        if (r == 0)
            break;
        c->out_bytes -= (size_t)r;
        size_t left = (size_t)r;
        while (left) {
            struct bt_chunk *ch = &c->q[c->qhead];
            size_t rest = ch->len - c->qoff;
            if (left < rest) {
                c->qoff += left;
                c->blocked++;
                break;
            }
            left -= rest;
            chunk_release(ch);
            c->qoff = 0;
            c->qhead++;
            c->qn--;
        }
    }
    flow(c);
}

/* After a send: EPOLLOUT while output waits, and the transport's marks (pause and
   resume reading, which Python hears of). */
static void flow(struct bt_conn *c)
{
    if (!c->attached)
        return;
    uint8_t epout = c->qn != 0;
    uint8_t paused = c->paused;
    if (!paused && c->out_bytes > c->high) {
        paused = 1;
        c->ev = (c->ev & ~(uint32_t)BT_NET_RESUMED) | BT_NET_PAUSED;
        mark_ready(c);
    } else if (paused && c->out_bytes <= c->low) {
        paused = 0;
        c->ev = (c->ev & ~(uint32_t)BT_NET_PAUSED) | BT_NET_RESUMED;
        mark_ready(c);
    }
    if (epout != c->epout || paused != c->paused) {
        c->epout = epout;
        c->paused = paused;
        watch(c);
    }
}

/* The lane's output joins the queue (nothing copied). 0, or -1 out of memory. */
static int take_lane_output(struct bt_conn *c)
{
    struct bt_lane *l = c->lane;
    while (l->out_len || l->nchunks) {
        if (!q_room(c, 16))
            return -1;
        unsigned n = bt_lane_take_chunks(l, c->q + c->qhead + c->qn, 16);
        if (n == 0)
            return l->out_len || l->nchunks ? -1 : 0;
        for (unsigned i = 0; i < n; i++)
            c->out_bytes += c->q[c->qhead + c->qn + i].len;
        c->qn += n;
    }
    return 0;
}

int net_send_ready(struct bt_conn *c)
{
    if (!c->attached || take_lane_output(c) != 0)
        return 0;
    send_queue(c);
    return c->attached && c->qn == 0;
}

int net_send_now(struct bt_conn *c, const struct iovec *iov, unsigned niov)
{
    unsigned i = 0;             /* the first piece not wholly sent, */
    size_t off = 0;             /* and how much of it was */
    while (i < niov) {
        struct iovec v[IOV_DIRECT];
        unsigned k = niov - i < IOV_DIRECT ? niov - i : IOV_DIRECT;
        memcpy(v, iov + i, k * sizeof(*v));
        v[0].iov_base = (unsigned char *)v[0].iov_base + off;
        v[0].iov_len -= off;
        size_t want = total_len(v, k);
        ssize_t r = send_some(c, v, k);
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        for (size_t left = (size_t)r; left;) {
            size_t rest = iov[i].iov_len - off;
            if (left < rest) {
                off += left;
                break;
            }
            left -= rest;
            off = 0;
            i++;
        }
        if ((size_t)r < want) {
            c->blocked++;
            break;  /* the socket is full: the rest is copied below */
        }
    }
    if (i < niov) {
        /* the rest into the queue, copied now: the caller's memory is not ours to keep */
        size_t rest = iov[i].iov_len - off;
        for (unsigned j = i + 1; j < niov; j++)
            rest += iov[j].iov_len;
        unsigned char *copy = malloc(rest);
        if (copy == NULL || !q_room(c, 1)) {
            free(copy);
            failed(c);  /* (part of a PDU sent: the stream cannot go on without the rest) */
            return -1;
        }
        unsigned char *d = copy;
        memcpy(d, (unsigned char *)iov[i].iov_base + off, iov[i].iov_len - off);
        d += iov[i].iov_len - off;
        for (unsigned j = i + 1; j < niov; j++) {
            memcpy(d, iov[j].iov_base, iov[j].iov_len);
            d += iov[j].iov_len;
        }
        c->q[c->qhead + c->qn++] = (struct bt_chunk){copy, copy, rest, 0};
        c->out_bytes += rest;
    }
    flow(c);
    return 0;
}

int bt_net_flush(struct bt_conn *c)
{
    int rc = take_lane_output(c);
    send_queue(c);
    return rc;
}

void net_lane_output(struct bt_conn *c)
{
    if (c->attached)
        bt_net_flush(c);
}

void net_lane_done(struct bt_conn *c)
{
    if (!c->attached)
        return;
    bt_net_flush(c);
    if (!c->attached)
        return;  /* (failed sending: reported already) */
    served(c);
    if (c->lane->redo)
        hand_back(c, NULL, 0, NULL, 0);  /* the Python path runs the queue for now */
}

int bt_net_add_ring(struct bt_net *n, struct bt_uring *u, int efd)
{
    for (uint32_t i = 0; i < n->nrings; i++)
        if (n->rings[i] == u)
            return 0;
    if (n->nrings == sizeof(n->rings) / sizeof(n->rings[0]))
        return -1;
    if (efd >= 0) {
        struct epoll_event e = {0};
        e.events = EPOLLIN;
        e.data.u64 = ((uint64_t)n->nrings << TAG_SHIFT) | RING_TAG;
        if (epoll_ctl(n->epfd, EPOLL_CTL_ADD, efd, &e) != 0)
            return -1;
    }
    n->ring_efd[n->nrings] = efd;
    n->rings[n->nrings++] = u;
    return 0;
}

void bt_net_drop_ring(struct bt_net *n, struct bt_uring *u)
{
    for (uint32_t i = 0; i < n->nrings; i++)
        if (n->rings[i] == u) {
            if (n->ring_efd[i] >= 0)
                epoll_ctl(n->epfd, EPOLL_CTL_DEL, n->ring_efd[i], NULL);
            uint32_t last = --n->nrings;
            if (i != last) {  /* the last one moves into the hole: its tag too */
                n->rings[i] = n->rings[last];
                n->ring_efd[i] = n->ring_efd[last];
                if (n->ring_efd[i] >= 0) {
                    struct epoll_event e = {0};
                    e.events = EPOLLIN;
                    e.data.u64 = ((uint64_t)i << TAG_SHIFT) | RING_TAG;
                    epoll_ctl(n->epfd, EPOLL_CTL_MOD, n->ring_efd[i], &e);
                }
            }
            return;
        }
}

int bt_net_add_nvmeq(struct bt_net *n, struct bt_nvmeq *q)
{
    for (uint32_t i = 0; i < n->nnvmeqs; i++)
        if (n->nvmeqs[i] == q)
            return 0;
    if (n->nnvmeqs == sizeof(n->nvmeqs) / sizeof(n->nvmeqs[0]))
        return -1;
    int fd = -1;
    if (q->irq_efd >= 0) {
        fd = fcntl(q->irq_efd, F_DUPFD_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        struct epoll_event e = {0};
        e.events = EPOLLIN;
        e.data.u64 = ((uint64_t)fd << TAG_SHIFT) | IRQ_TAG | RING_TAG;
        if (epoll_ctl(n->epfd, EPOLL_CTL_ADD, fd, &e) != 0) {
            close(fd);
            return -1;
        }
    }
    n->nvme_efd[n->nnvmeqs] = fd;
    n->nvmeqs[n->nnvmeqs++] = q;
    return 0;
}

void bt_net_drop_nvmeq(struct bt_net *n, struct bt_nvmeq *q)
{
    for (uint32_t i = 0; i < n->nnvmeqs; i++)
        if (n->nvmeqs[i] == q) {
            int fd = n->nvme_efd[i];
            if (fd >= 0) {
                epoll_ctl(n->epfd, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
            uint32_t last = --n->nnvmeqs;
            n->nvmeqs[i] = n->nvmeqs[last];
            n->nvme_efd[i] = n->nvme_efd[last];
            return;
        }
}

int bt_net_write(struct bt_conn *c, const unsigned char *p, size_t n)
{
    if (n == 0)
        return 0;
    /* the lane's output so far goes first: it was produced first */
    if (take_lane_output(c) != 0 || !q_room(c, 1))
        return -1;
    unsigned char *copy = malloc(n);
    if (copy == NULL)
        return -1;
    memcpy(copy, p, n);
    c->q[c->qhead + c->qn++] = (struct bt_chunk){copy, copy, n};
    c->out_bytes += n;
    send_queue(c);
    return 0;
}

/* Give the rest of the input to the Python path (first: a capsule the lane carried and
   gave back, to be handled before it) and let go of the socket. */
static void hand_back(struct bt_conn *c, unsigned char *first, size_t nfirst,
                      const unsigned char *rest, size_t nrest)
{
    size_t total = c->hand_len + nfirst + nrest;
    unsigned char *h = realloc(c->hand, total ? total : 1);
    if (h == NULL) {
        /* nothing can be handed without memory: end the connection rather than lose
           bytes of the stream */
        free(first);
        failed(c);
        return;
    }
    if (c->hand_len == 0)
        c->hand_first = nfirst;
    if (nfirst)
        memcpy(h + c->hand_len, first, nfirst);
    if (nrest)
        memcpy(h + c->hand_len + nfirst, rest, nrest);
    free(first);
    c->hand = h;
    c->hand_len = total;
    c->ev |= BT_NET_HAND;
    mark_ready(c);
    bt_net_detach(c);
}

/* Run received bytes through the lane, sending its output between batches. Input that
   cannot be run now (output over the high mark) is kept in pend; input the lane does
   not take goes to Python with the socket. */
static void consume(struct bt_conn *c, const unsigned char *in, size_t len)
{
    struct bt_lane *l = c->lane;
    struct bt_net *n = c->net;
    size_t pos = 0;
    while (pos < len && c->attached) {
        if (c->paused) {
            if (stash(c, in + pos, len - pos) != 0)
                failed(c);
            return;
        }
        l->bud_used = n->bud_used;
        l->bud_limit = n->bud_limit;
        size_t t;
        unsigned ncmds = 0;
        if (l->carry_len) {
            unsigned char *handed;
            size_t nhanded;
            t = bt_lane_carry(l, in + pos, len - pos, 1, &handed, &nhanded, &ncmds);
            n->bud_used = l->bud_used;
            c->pdus += ncmds;
            pos += t;
            if (nhanded) {
                take_lane_output(c);
                send_queue(c);
                if (handed == NULL) {
                    failed(c);  /* (no memory for the capsule's bytes) */
                    return;
                }
                hand_back(c, handed, nhanded, in + pos, len - pos);
                return;
            }
        } else if (l->rx_left || l->rx_dleft) {
            t = bt_lane_rx(l, in + pos, len - pos);
            n->bud_used = l->bud_used;
            pos += t;
        } else {
            t = bt_lane_run(l, in + pos, len - pos, BATCH, MAX_OUT, &ncmds);
            n->bud_used = l->bud_used;
            c->pdus += ncmds;
            pos += t;
            if (t == 0) {
                take_lane_output(c);
                send_queue(c);
                if (c->attached)
                    hand_back(c, NULL, 0, in + pos, len - pos);
                return;
            }
        }
        if (take_lane_output(c) != 0) {
            failed(c);
            return;
        }
        send_queue(c);
        if (l->redo) {
            /* a command failed in the lane: the Python path does it again and, while
               it has a command outstanding, runs everything after it too */
            if (c->attached)
                hand_back(c, NULL, 0, in + pos, len - pos);
            return;
        }
    }
}

static inline uint64_t now_ns(void)
{
    return lane_now_ns();
}

/* the calling thread's CPU time: a system call (0.4 us on this VM kind, where the
   monotonic clock's vDSO read is 0.06), so read in one call or device wait of CPU_SAMPLE
   (bt_net.h, cpu_ns) */
static uint64_t cpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One connection the poller reported: output first (it may lift a pause), then input
   kept from before, then a receive. */
static void serve(struct bt_conn *c, uint32_t events)
{
    struct bt_net *n = c->net;
    uint64_t t0 = now_ns();
    if (c->qn && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
        send_queue(c);
    if (c->attached && !c->paused && c->pend_len) {
        unsigned char *p = c->pend;
        size_t len = c->pend_len;
        c->pend = NULL;
        c->pend_len = 0;
        consume(c, p, len);
        free(p);
    }
    int rounds = 4;  /* a socket with more queued than one buffer: a few more reads */
    while (c->attached && !c->paused && !c->pend_len && rounds--
           && (events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP))) {
        ssize_t r = recv(c->fd, n->rbuf, n->rcap, MSG_DONTWAIT);
        if (r > 0) {
            c->reads++;
            c->rx_bytes += (uint64_t)r;
            consume(c, n->rbuf, (size_t)r);
            if ((size_t)r < n->rcap)
                break;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        failed(c);  /* end of stream or an error: the transport's to find and report */
        break;
    }
    if (c->attached)
        served(c);
    c->busy_ns += now_ns() - t0;
}

/* the connections to report to Python (up to max handles; the rest stay) */
static unsigned take_ready(struct bt_net *n, void **ready, unsigned max)
{
    unsigned k = 0;
    while (n->ready != NULL && k < max) {
        struct bt_conn *c = n->ready;
        n->ready = c->next_ready;
        c->next_ready = NULL;
        c->on_ready = 0;
        n->nready--;
        ready[k++] = c->handle;
    }
    return k;
}

/* Lane commands at an NVMe queue pair of the poller (their completions are all that
   the lanes wait for when no socket and no ring has anything) */
static int device_busy(const struct bt_net *n)
{
    for (uint32_t r = 0; r < n->nnvmeqs; r++)
        if (n->nvmeqs[r]->lane_inflight)
            return 1;
    return 0;
}

/* Lane commands at a queue pair without an interrupt: only polling finds their
   completions (the others' wake the epoll set) */
static int device_busy_polled(const struct bt_net *n)
{
    for (uint32_t r = 0; r < n->nnvmeqs; r++)
        if (n->nvmeqs[r]->lane_inflight && n->nvme_efd[r] < 0)
            return 1;
    return 0;
}

#define CPU_SAMPLE 16u

/* Give the CPU up for `slice` ns, or until a socket or ring has something. Its CPU
   cost is read in every CPU_SAMPLE-th slice and in every slice of a sampled call
   (`exact`: that call's CPU less its slices' is its awake share), the mean of those
   counted for the rest. */
static int device_wait(struct bt_net *n, uint64_t slice, int exact)
{
    if (!n->slack_set) {
        /* (the default 50 us slack would make every slice a 50 us one: this thread is
           a reactor, whose timers want to be on time anyway) */
        prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
        n->slack_set = 1;
    }
    struct pollfd p = {n->epfd, POLLIN, 0};
    uint64_t ns = slice < 999999999u ? slice : 999999999u;
    struct timespec ts = {0, (long)ns};
    int read = exact || n->dev_waits % CPU_SAMPLE == 0;
    uint64_t c0 = read ? cpu_now_ns() : 0;
    int woke = ppoll(&p, 1, &ts, NULL);
    if (read) {
        uint64_t d = cpu_now_ns() - c0;
        n->dw_samp_cpu_ns += d;
        n->dw_samp++;
        n->dev_wait_cpu_ns += d;
    } else if (n->dw_samp) {
        n->dev_wait_cpu_ns += n->dw_samp_cpu_ns / n->dw_samp;
    }
    n->dev_waits++;
    return woke;  /* 0: the slice ran out with no socket or ring ready */
}

/* A host wait lasts at most to the end of the call's time budget (budget_ns from its
   start), the bound the loop's timers already had: the wait only spares the loop's own
   sleep and wake-up within it. The bound is a timer in the epoll set (n->tfd), armed
   once per call, not a timeout per wait: a timed sleep costs the thread a timer set-up
   and cancel each time, which on this VM kind made the reactor's CPU per QD1 command
   1.5x the event loop's (bench/RESULTS.md). */

static void turn_timer(struct bt_net *n, uint64_t at)
{
    struct itimerspec it = {{0, 0}, {(time_t)(at / 1000000000u), (long)(at % 1000000000u)}};
    timerfd_settime(n->tfd, at ? TFD_TIMER_ABSTIME : 0, &it, NULL);
    n->turn_armed = at != 0;
}

/* The host's next command came `gap` ns after the last work (bt_net.h, host_gap_ns). */
static void host_gap(struct bt_net *n, uint64_t gap)
{
    uint64_t cap = 4 * n->host_wait_ns;
    if (cap && gap > cap)
        gap = cap;
    n->host_gap_ns = n->host_gap_ns ? (3 * n->host_gap_ns + gap) / 4 : gap;
}

/* Something for Python already (what bt_net_poll's return value would report): no
   host wait then, the call returns */
static int python_waits(const struct bt_net *n)
{
    return n->nready || (n->lane_started && !n->starts_reaped)
           || (n->bud_delta < 0 && n->bud_limit == 0);  /* (budget back, others wait) */
}

/* Sleep until C's epoll set has something (1: a command, a completion, or the turn
   timer, armed here for `turn` if it is not yet) or the event loop's fd has (0). */
static int host_wait(struct bt_net *n, uint64_t turn)
{
    struct pollfd p[2] = {{n->epfd, POLLIN, 0}, {n->loop_fd, POLLIN, 0}};
    if (!n->turn_armed)
        turn_timer(n, turn);
    n->host_waits++;
    /* (the loop's epoll set holds ours: it is readable while ours is, so ours is looked
       at first; once ours is drained the loop's is readable only for its own. A signal
       that interrupts the sleep (the GIL sampler's timer) is no reason to return: wait
       again; one for Python writes the loop's wake-up fd, which ends the wait then.) */
    int r;
    do
        r = poll(p, 2, -1);
    while (r < 0 && errno == EINTR);
    if (r > 0) {
        if (p[0].revents & (POLLIN | POLLERR | POLLHUP))
            return 1;
        n->host_loop_wakes++;
    }
    return 0;
}

/* A window shorter than this catches no host's next command worth the spinning: 0. */
#define WIN_MIN_NS 5000u

/* The host's next command came `gap` ns after the last work, with nothing at a device
   meanwhile: the window follows (bt_net.h, win_adapt). */
static void window_gap(struct bt_net *n, uint64_t gap)
{
    uint64_t max = n->spin_max_ns;
    if (gap <= max) {
        if (n->win_ns < max) {
            uint64_t w = n->win_ns * 2, want = gap + gap / 4;
            w = w > want ? w : want;
            w = w > WIN_MIN_NS ? w : WIN_MIN_NS;
            n->win_ns = w < max ? w : max;
            n->win_grows++;
        }
    } else if (n->win_ns) {
        n->win_ns /= 2;
        if (n->win_ns < WIN_MIN_NS)
            n->win_ns = 0;
        n->win_shrinks++;
    }
}

uint64_t bt_net_poll(struct bt_net *n, void **ready, unsigned max, unsigned *nready,
                     uint64_t budget_ns, uint64_t spin_ns)
{
    struct epoll_event ev[EVENTS];
    int exact = n->polls % CPU_SAMPLE == 0;
    uint64_t c0 = exact ? cpu_now_ns() : 0;
    uint64_t t0 = now_ns(), last = t0, t = t0, prev, idle = 0;
    uint64_t before = 0, after = 0, slept = 0, slice = n->dev_wait_ns;
    uint64_t win = spin_ns;
    if (n->win_adapt) {
        if (n->win_ns > n->spin_max_ns)
            n->win_ns = n->spin_max_ns;
        if (n->win_ns < win)
            win = n->win_ns;
    }
    n->win_used_ns = win;
    uint64_t wcpu0 = n->dev_wait_cpu_ns;
    n->polls++;
    int quiet = 0;  /* the last device-wait slice ran out: the epoll set has nothing */
    int waited = 0;  /* this round follows a host wait */
    while ((n->nconns || n->nrings || n->nnvmeqs) && n->nready + EVENTS <= max) {
        prev = t;
        int k = quiet ? 0 : epoll_wait(n->epfd, ev, EVENTS, 0);
        quiet = 0;
        if (k < 0 && errno != EINTR)
            break;
        if (k < 0)
            k = 0;
        int wakes = 0, input = 0;
        for (int i = 0; i < k; i++) {
            uint64_t tag = ev[i].data.u64;
            if (tag & TIMER_TAG) {  /* the turn is over (the host wait's bound) */
                uint64_t v;
                ssize_t r = read(n->tfd, &v, sizeof(v));
                (void)r;
                n->turn_armed = 0;
                wakes++;
                continue;
            }
            if (tag & RING_TAG) {
                /* completions posted (a ring's, or an NVMe queue's interrupt): reaped
                   below; the counter only wakes us */
                uint64_t v;
                int fd = (int)(tag >> TAG_SHIFT);
                if (tag & IRQ_TAG)
                    n->irq_wakes++;
                else
                    fd = n->ring_efd[fd];
                ssize_t r = read(fd, &v, sizeof(v));
                (void)r;
                wakes++;
                continue;
            }
            struct bt_conn *c = ev[i].data.ptr;
            if (!c->attached)
                continue;   /* let go of earlier in this call */
            input = 1;
            before += c->pdus;
            serve(c, ev[i].events);
            after += c->pdus;
        }
        int python = 0, python_nvme = 0;
        unsigned reaped = 0;
        for (uint32_t r = 0; r < n->nrings; r++)
            reaped += be_uring_reap_lanes(n->rings[r], &python);
        for (uint32_t r = 0; r < n->nnvmeqs; r++)
            reaped += be_nvme_reap_lanes(n->nvmeqs[r], &python_nvme);
        t = now_ns();
        if (python || python_nvme) {
            n->python_cqe = (uint8_t)((python ? 1 : 0) | (python_nvme ? 2 : 0));
            break;  /* Python's own completions wait: its turn */
        }
        /* a ring's wake-up is no work by itself: its completions count as they are
           reaped (io_uring signals completions the last round's sweep took already,
           e.g. reads done inline at submission, and one more round found nothing) */
        k += (int)reaped - wakes;
        if (waited && k > 0)
            n->host_catches++;  /* (a wait the timer ended is not one) */
        waited = 0;
        if (input && n->last_work_ns && !n->gap_dev) {
            if (n->win_adapt)
                window_gap(n, prev - n->last_work_ns);
            host_gap(n, prev - n->last_work_ns);
        }
        if (k > 0) {
            last = t;
            n->last_work_ns = t;
            n->gap_dev = 0;
        } else {
            idle += t - prev;
        }
        int busy = k <= 0 && n->nnvmeqs && device_busy(n);
        int dev = busy && spin_ns && n->dev_wait_ns;
        if (busy)
            n->gap_dev = 1;  /* (waiting for the device, not for the host) */
        /* Nothing to do but wait: the window ran out (or there is none) with nothing
           at a polled device; or, with no window, this round's work is done and
           nothing is at a device (more input already there keeps the epoll fd
           readable, and a host at QD1 saves the round that would find nothing). */
        int waiting = (k <= 0 && !dev && t - last >= win)
                      || (k > 0 && !win && !(n->nnvmeqs && device_busy(n)));
        if (waiting) {
            /* the host wait (bt_net.h): sleep here rather than in the event loop */
            uint64_t turn = t0 + budget_ns;
            if (n->host_wait_ns && n->loop_fd >= 0 && n->host_gap_ns <= n->host_wait_ns
                    && t < turn && !device_busy_polled(n) && !python_waits(n)) {
                uint64_t s0 = t;
                int ours = host_wait(n, turn);
                t = now_ns();
                slept += t - s0;
                if (ours) {
                    waited = 1;
                    continue;
                }
            }
            break;
        }
        if (t - t0 >= budget_ns)
            break;
        if (k > 0) {
            slice = n->dev_wait_ns;
        } else if (dev) {
            uint64_t s0 = t;
            /* every busy queue interrupts: one sleep, to the end of the budget, woken
               by the completion's eventfd (or a socket's input) */
            uint64_t left = budget_ns - (t - t0);
            uint64_t s = device_busy_polled(n) ? slice : left > slice ? left : slice;
            quiet = device_wait(n, s, exact) == 0;
            t = now_ns();
            slept += t - s0;
            if (t - last >= spin_ns && slice < 8 * n->dev_wait_ns)
                slice *= 2;  /* (past the window: a slow device, waited for coarser) */
        }
    }
    if (n->turn_armed)
        turn_timer(n, 0);  /* (a call that ended before its turn: no late wake-up) */
    /* (lane commands at an interrupting queue wake the epoll set: the event loop
       waits for them, no further call is needed) */
    n->dev_pending = (uint8_t)(spin_ns && n->dev_wait_ns && device_busy_polled(n));
    n->tail_idle_ns = t - last;
    /* the call's CPU time awake (its device-wait slices' own CPU counted apart): read
       in a sampled call, else its wall time awake at the sampled calls' CPU/wall */
    uint64_t wall = now_ns() - t0 - slept, waits = n->dev_wait_cpu_ns - wcpu0, awake;
    if (exact) {
        uint64_t cpu = cpu_now_ns() - c0;
        awake = cpu > waits ? cpu - waits : 0;
        n->samp_cpu_ns += awake;
        n->samp_wall_ns += wall;
    } else if (n->samp_wall_ns) {
        awake = (uint64_t)((double)wall * (double)n->samp_cpu_ns / (double)n->samp_wall_ns);
    } else {
        awake = wall;
    }
    if (awake > wall)
        awake = wall;
    n->cpu_ns += awake + waits;
    /* (idle was measured in wall time awake: the same share of the CPU time awake) */
    n->idle_ns += wall ? (uint64_t)((double)idle * (double)awake / (double)wall) : 0;
    *nready = take_ready(n, ready, max);
    n->pdus += after - before;
    if (n->lane_started && n->quiet_starts && !device_busy_polled(n))
        n->lane_started = 0;  /* (done within the call, or to be woken by an interrupt) */
    uint64_t attn = 0;
    if (n->python_cqe)
        attn |= BT_NET_PYTHON_CQE;
    if (*nready)
        attn |= BT_NET_READY;
    if (n->lane_started)
        attn |= BT_NET_STARTED;
    if (n->bud_delta)
        attn |= BT_NET_BUDGET;
    if (after != before)
        attn |= BT_NET_PDUS;
    if (n->tail_idle_ns < win)
        attn |= BT_NET_SHORT;
    if (n->dev_pending)
        attn |= BT_NET_DEV;
    return attn;
}

unsigned bt_net_reap(struct bt_net *n, void **ready, unsigned max, unsigned *nready)
{
    int python = 0;
    unsigned reaped = 0;
    for (uint32_t r = 0; r < n->nnvmeqs; r++)
        reaped += be_nvme_reap_lanes(n->nvmeqs[r], &python);
    if (python)
        n->python_cqe |= 2;
    *nready = take_ready(n, ready, max);
    return reaped;
}
