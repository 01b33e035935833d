/* The GIL sampler of a reactor thread (bt_gil.h says why).
 *
 * One real-time signal serves every sampler of the process: each timer carries its
 * sampler in the signal's value and is aimed at its own thread (SIGEV_THREAD_ID), so the
 * handler always runs on the thread it samples and is the only writer of its counts.
 * SA_RESTART: system calls the signal interrupts are restarted where the kernel can;
 * the rest (epoll_wait) return EINTR, which the event loop and net.c retry.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* (SIGEV_THREAD_ID) */
#endif
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bt_gil.h"

#ifndef sigev_notify_thread_id  /* (older glibc names it only by its union member) */
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* CPython's own check: does the calling thread hold the GIL? (It reads the thread state
   of the GIL's holder and this thread's own: no lock, safe in a signal handler.) */
extern int PyGILState_Check(void);

#define MAGIC 0x47494c53u  /* a live sampler */

_Static_assert(sizeof(timer_t) <= sizeof(((struct bt_gil_sampler *)0)->timer),
               "timer_t does not fit the sampler");

static int sig_no(void)
{
    return SIGRTMAX - 5;  /* (SIGRTMIN's first ones are glibc's and threading libraries') */
}

static void on_sample(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_code != SI_TIMER)
        return;
    struct bt_gil_sampler *s = si->si_value.sival_ptr;
    if (s == NULL || s->magic != MAGIC || !s->running)
        return;
    int saved = errno;
    /* the periods this sample stands for: the timer is checked at the kernel's tick,
       which may be longer than the period (the overrun counts the periods missed) */
    uint64_t w = 1u + (uint64_t)(si->si_overrun > 0 ? si->si_overrun : 0);
    s->samples += w;
    if (PyGILState_Check())
        s->held += w;
    errno = saved;
}

static int install(void)
{
    /* (reactor threads may get here at once: both then install the same handler, the
       second finding the first's, which it accepts) */
    static volatile int done;
    if (done)
        return 0;
    struct sigaction old;
    if (sigaction(sig_no(), NULL, &old) != 0)
        return -errno;
    if ((old.sa_flags & SA_SIGINFO) ? old.sa_sigaction != on_sample
                                    : old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
        return -EBUSY;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sample;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(sig_no(), &sa, NULL) != 0)
        return -errno;
    done = 1;
    return 0;
}

struct bt_gil_sampler *bt_gil_sampler_start(uint32_t period_us, int *err)
{
    int rc = install();
    if (rc != 0) {
        *err = rc;
        return NULL;
    }
    struct bt_gil_sampler *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    struct sigevent ev;
    memset(&ev, 0, sizeof(ev));
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = sig_no();
    ev.sigev_value.sival_ptr = s;
    ev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    timer_t t;
    if (timer_create(CLOCK_THREAD_CPUTIME_ID, &ev, &t) != 0) {
        *err = -errno;
        free(s);
        return NULL;
    }
    memcpy(s->timer, &t, sizeof(t));
    s->period_us = period_us ? period_us : 1000;
    s->magic = MAGIC;
    s->running = 1;
    struct itimerspec its;
    its.it_interval.tv_sec = s->period_us / 1000000u;
    its.it_interval.tv_nsec = (long)(s->period_us % 1000000u) * 1000;
    its.it_value = its.it_interval;
    if (timer_settime(t, 0, &its, NULL) != 0) {
        *err = -errno;
        timer_delete(t);
        s->running = 0;  /* (kept: see bt_gil_sampler_stop) */
        return NULL;
    }
    return s;
}

void bt_gil_sampler_stop(struct bt_gil_sampler *s)
{
    if (s == NULL || !s->running)
        return;
    s->running = 0;
    timer_t t;
    memcpy(&t, s->timer, sizeof(t));
    timer_delete(t);
}
