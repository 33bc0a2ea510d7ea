/*
 * The ticker: a vCPU's TSC-deadline expiry delivered without Python (vmmshim's own code; Python's side is
 * tscdeadline.py's TscDeadline.attach_ticker).
 *
 * A guest that computes (a transfer's copies, a compressor) keeps its tick: Linux's TSC-deadline timer falls due
 * 250 or 1000 times a second. The compiled loop serves the guest's writes of IA32_TSC_DEADLINE (fastrun.c), but
 * each expiry woke Python's timer thread, whose vlapic fired the LVT and whose kick posted the vector: in the
 * nested lab about a millisecond of Python a tick on L1's one CPU (docs/lab.md). Here one thread of the process,
 * without the GIL, waits on every registered vCPU's deadline timerfd and, when one is due, posts the vector the
 * vlapic said the timer would deliver (struct vmmshim_tick.plan, Intel SDM vol. 3A 10.5.4.1 and 10.8.4) as a kick
 * (struct vmmshim_intwin, WIN_TICK): the loop injects it at the kick's EINTR as any kick's.
 *
 * Python's vlapic publishes the plan under its lock when nothing is requested and at most one edge-triggered
 * vector is in service, armed in the guest's PV EOI word (then the tick waits for its end: WIN_AFTER_EOI); every
 * other request clears it. The tick is posted when the slot is empty, or when it holds an injection Python has
 * not accepted yet (WIN_TAKEN) that the guest has ended through its PV EOI word (armed for it, now clear): the
 * ticker then takes the slot as another thread's take-over does (WIN_BUSY), records that injection for Python
 * (fold_state, fold_result, folds) and posts the tick without waiting. Python accepts and ends the recorded
 * injection before anything else it finds in the slot, and fires the LVT itself for a WIN_TICK post the loop
 * returned without injecting. Any other case (a post waiting, an injection still in service, no plan) leaves the
 * tick to Python: the ticker marks it fired and writes the vCPU's notify eventfd, which the timer thread watches.
 *
 * Not supported: periodic and one-shot LAPIC timers (Python's timer thread), more than 64 vCPUs' deadlines due
 * in one wake (the rest are served at the next).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fastrun.h"

#define TICKER_BATCH 64

static pthread_mutex_t ticker_lock = PTHREAD_MUTEX_INITIALIZER;
static int ticker_epfd = -1;
static pid_t ticker_pid;            /* the process that started the thread (a forked child starts its own) */
static unsigned ticker_count;       /* registered ticks */
static struct vmmshim_tick **ticker_ticks;
static unsigned ticker_cap;

/* the slot's new post is seen by the loop: its EINTR, or the end of its HLT sleep */
static void kick(struct vmmshim_tick *t, struct vmmshim_intwin *w)
{
	uint8_t *run = (uint8_t *)(uintptr_t)t->run;

	__atomic_fetch_add(&w->kicks_posted, 1, __ATOMIC_ACQ_REL);
	__atomic_store_n(&run[w->window_off + 1], 1, __ATOMIC_RELEASE);     /* immediate_exit */
	syscall(SYS_tgkill, getpid(), t->tid, t->sig);
	vmmshim_intwin_wake(w);
}

/* the slot held (WIN_BUSY) in state s with result res, its injection ended in the guest: recorded for Python */
static void record_fold(struct vmmshim_tick *t, uint32_t s, uint32_t res)
{
	if (!t->fold_state) {
		t->fold_state = s;
		t->fold_result = res;
	}
	++t->folds;
}

/* 1 when the tick was posted to the loop, 0 when Python fires it */
static int post_tick(struct vmmshim_tick *t)
{
	struct vmmshim_intwin *w = (struct vmmshim_intwin *)(uintptr_t)t->win;
	uint32_t plan = __atomic_load_n(&t->plan, __ATOMIC_ACQUIRE), s, res;

	if (!plan || t->tid <= 0)
		return 0;
	s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
	if (s == WIN_IN) {
		if (!__atomic_compare_exchange_n(&w->state, &s, WIN_IN | WIN_KICK | WIN_POSTED | WIN_TICK | plan, 0,
						 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
			return 0;
		kick(t, w);
		return 1;
	}
	if ((s & ~(WIN_VECTOR | WIN_TICK)) != (WIN_IN | WIN_TAKEN) || !(plan & WIN_ARM))
		return 0;
	/* an injection Python has not accepted: fold it if the guest has ended it */
	if (!__atomic_compare_exchange_n(&w->state, &s, s | WIN_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return 0;
	res = w->result;
	/* a record waiting for Python is followed only by ticks posted after it (no end before them) */
	if (!(res & RES_ARMED) || vmmshim_pv_eoi_set(w) ||
	    (t->fold_state && (!(s & WIN_TICK) || (res & RES_EOI))) || !__atomic_load_n(&t->plan, __ATOMIC_ACQUIRE)) {
		__atomic_store_n(&w->state, s, __ATOMIC_RELEASE);      /* still in service, or a second record */
		return 0;
	}
	record_fold(t, s, res);
	/* nothing is in service any more: the tick goes in without waiting for an end */
	__atomic_store_n(&w->state, WIN_IN | WIN_KICK | WIN_POSTED | WIN_TICK | (plan & (WIN_VECTOR | WIN_ARM)),
			 __ATOMIC_RELEASE);
	kick(t, w);
	return 1;
}

/*
 * The loop, at a guest's HLT, its slot holding a tick it injected (state s: WIN_IN | WIN_TAKEN | WIN_TICK and the
 * vector, without RES_EOI in its result) that the guest has ended through its PV EOI word: records the tick as the
 * ticker's folds are recorded and empties the slot, so that the HLT may be slept here. A tick never touched the
 * vlapic's IRR or ISR, so Python's vlapic stays true meanwhile. 1 when recorded, 0 when Python takes the HLT.
 */
int vmmshim_tick_fold_at_halt(struct vmmshim_intwin *w, uint32_t s)
{
	struct vmmshim_tick *t = (struct vmmshim_tick *)(uintptr_t)w->tick;
	uint32_t res;

	if (!t || (s & ~WIN_VECTOR) != (WIN_IN | WIN_TAKEN | WIN_TICK))
		return 0;
	if (!__atomic_compare_exchange_n(&w->state, &s, s | WIN_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return 0;       /* the ticker or a kicking thread has it */
	res = w->result;
	if ((res & (RES_ARMED | RES_EOI)) != RES_ARMED || vmmshim_pv_eoi_set(w) ||
	    (t->fold_state && !(t->fold_state & WIN_TICK))) {
		__atomic_store_n(&w->state, s, __ATOMIC_RELEASE);
		return 0;
	}
	record_fold(t, s, res);
	__atomic_store_n(&w->state, WIN_IN, __ATOMIC_RELEASE);
	return 1;
}

static void tick_due(struct vmmshim_tick *t)
{
	if (!vmmshim_tscdl_expire((struct vmmshim_tscdl *)(uintptr_t)t->dl))
		return;
	if (post_tick(t)) {
		++t->posted;
		return;
	}
	++t->handed;
	__atomic_store_n(&t->fired, 1, __ATOMIC_RELEASE);
	eventfd_write(t->notify_fd, 1);
}

static int registered(const struct vmmshim_tick *t)
{
	unsigned i;

	for (i = 0; i < ticker_count; i++)
		if (ticker_ticks[i] == t)
			return 1;
	return 0;
}

static void *ticker_main(void *arg)
{
	struct epoll_event ev[TICKER_BATCH];
	int epfd = (int)(intptr_t)arg, n, i;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);     /* the process's signals are its other threads' */
	for (;;) {
		n = epoll_wait(epfd, ev, TICKER_BATCH, -1);
		if (n < 0 && errno != EINTR)
			return NULL;
		pthread_mutex_lock(&ticker_lock);
		for (i = 0; i < n; i++) {
			struct vmmshim_tick *t = ev[i].data.ptr;

			if (registered(t))      /* not removed since epoll_wait returned */
				tick_due(t);
		}
		pthread_mutex_unlock(&ticker_lock);
	}
}

/* starts the thread in this process if it is not running: 0 or -errno (the lock held) */
static int start(void)
{
	pthread_t th;
	pthread_attr_t attr;
	int epfd, r;

	if (ticker_epfd >= 0 && ticker_pid == getpid())
		return 0;
	ticker_count = 0;           /* a forked child: its parent's registrations are not its own */
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		return -errno;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	r = pthread_create(&th, &attr, ticker_main, (void *)(intptr_t)epfd);
	pthread_attr_destroy(&attr);
	if (r) {
		close(epfd);
		return -r;
	}
	ticker_epfd = epfd;
	ticker_pid = getpid();
	return 0;
}

/* Python, for a tick the ticker left to it: 1 once per such tick */
uint32_t vmmshim_tick_take_fired(struct vmmshim_tick *t)
{
	return __atomic_exchange_n(&t->fired, 0, __ATOMIC_ACQ_REL);
}

/* Python, around a checkpoint's look at deadlines and vlapics: 1 holds the ticker off (no deadline is taken, no
   tick posted meanwhile), 0 lets it go on */
void vmmshim_ticker_pause(int on)
{
	if (on)
		pthread_mutex_lock(&ticker_lock);
	else
		pthread_mutex_unlock(&ticker_lock);
}

/* the ticker serves t's deadline timerfd from now on: 0 or -errno */
int vmmshim_ticker_add(struct vmmshim_tick *t)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = t };
	struct vmmshim_tscdl *d = (struct vmmshim_tscdl *)(uintptr_t)t->dl;
	int r;

	pthread_mutex_lock(&ticker_lock);
	r = start();
	if (!r && ticker_count == ticker_cap) {
		unsigned cap = ticker_cap ? 2 * ticker_cap : 8;
		struct vmmshim_tick **more = realloc(ticker_ticks, cap * sizeof(*more));

		if (more) {
			ticker_ticks = more;
			ticker_cap = cap;
		} else {
			r = -ENOMEM;
		}
	}
	if (!r && epoll_ctl(ticker_epfd, EPOLL_CTL_ADD, d->timerfd, &ev) < 0)
		r = -errno;
	if (!r)
		ticker_ticks[ticker_count++] = t;
	pthread_mutex_unlock(&ticker_lock);
	return r;
}

/* the ticker forgets t: once this returns it neither reads nor writes t (0, or -ENOENT if it did not know it) */
int vmmshim_ticker_remove(struct vmmshim_tick *t)
{
	struct vmmshim_tscdl *d = (struct vmmshim_tscdl *)(uintptr_t)t->dl;
	unsigned i;
	int r = -ENOENT;

	pthread_mutex_lock(&ticker_lock);
	for (i = 0; i < ticker_count; i++) {
		if (ticker_ticks[i] != t)
			continue;
		ticker_ticks[i] = ticker_ticks[--ticker_count];
		epoll_ctl(ticker_epfd, EPOLL_CTL_DEL, d->timerfd, NULL);
		r = 0;
		break;
	}
	pthread_mutex_unlock(&ticker_lock);
	return r;
}
