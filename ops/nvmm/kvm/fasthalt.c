/*
 * A guest's HLT slept in vmmshim's compiled KVM run loop (fastrun.c; vmmshim's own code).
 *
 * Without an in-kernel LAPIC, KVM returns a guest's HLT to user space (KVM_EXIT_HLT, KVM API), and the VMM waits
 * there for an interrupt the vCPU can take. Python's wait (ops/vmm_halt.py) ends with the waking thread's notify,
 * the vCPU's thread taking the GIL back and the ops layer's injection: in the nested lab milliseconds a wake, and
 * a guest that waits on a device wakes once per request or packet. Here the wait is in C, without the GIL: the
 * vCPU's thread polls an eventfd (struct vmmshim_intwin.wake_fd) while the slot is marked sleeping; the thread
 * that raises an interrupt posts it as a kick (intwin.py) and writes the eventfd; the loop injects the vector and
 * runs the guest on.
 *
 * Two ways in: a HLT exit inside the loop (HALT_AT_EXIT), slept when the guest has IF set, no injection waits
 * for Python's vlapic to accept it, Python asked for no window it posted nothing for, the guest's CR8 is the one
 * Python's vlapic agreed with, the guest has not ended an interrupt through its PV EOI word since, no posted port write waits in the coalesced ring and the idle fd (the doorbells a
 * halting vCPU serves itself) is not readable; and a run that Python starts asleep (HALT_NOW) once its
 * own HLT handling found nothing to do. A stop() (an NMI, a suspension, a debugger's hold, a kick that could not
 * post) ends the sleep for Python. The loop marks itself sleeping before it looks for a post, and the waking
 * thread looks for the mark after its post (vmmshim_intwin_wake, both sequentially consistent), so a wake
 * between the look and the poll is never lost.
 *
 * The VM's posted-write flush (vmmshim/fastpaths.py) goes off while every vCPU sleeps (here, for the VM's only
 * vCPU, when its sleep starts; else at the timer's next expiry); whenever a sleep here ends the loop starts it
 * again (struct vmmshim_waketimer), before the guest can write once more.
 *
 * Not handled here: MWAIT, a HLT with IF clear (the VM's halt), ExtINT and NMI wakes (Python's).
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fastrun.h"

/* sets the timer unless it is set: 1 (set now), 0 (it was), -errno */
int vmmshim_waketimer_arm(struct vmmshim_waketimer *t)
{
	uint32_t off = 0;

	if (!__atomic_compare_exchange_n(&t->armed, &off, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		return 0;
	return vmmshim_set_timer(t->tfd, vmmshim_now_ns() + t->period_ns) < 0 ? -errno : 1;
}

/* stops the timer (the caller then looks whether a vCPU runs, and arms it again if one does) */
int vmmshim_waketimer_off(struct vmmshim_waketimer *t)
{
	uint64_t ticks;

	if (vmmshim_set_timer(t->tfd, 0) < 0)
		return -errno;
	while (read(t->tfd, &ticks, sizeof(ticks)) == sizeof(ticks))
		;
	__atomic_store_n(&t->armed, 0, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return 0;
}

/* after a kick's post or a stop() (any thread): wakes the loop if it sleeps */
void vmmshim_intwin_wake(struct vmmshim_intwin *w)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST) && w->wake_fd >= 0)
		eventfd_write(w->wake_fd, 1);
}

static int readable(int fd)
{
	struct pollfd p = { fd, POLLIN, 0 };

	return fd >= 0 && poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

/* no posted port write waits in the coalesced ring (it goes to its device when the run returns) */
static int ring_empty(const uint8_t *run, const struct vmmshim_intwin *w)
{
	const uint32_t *hdr = (const uint32_t *)(run + w->ring_off);

	return !w->ring_off || __atomic_load_n(&hdr[0], __ATOMIC_ACQUIRE) == __atomic_load_n(&hdr[1], __ATOMIC_ACQUIRE);
}

static int leave(struct vmmshim_intwin *w, int injected)
{
	uint64_t junk;

	__atomic_store_n(&w->sleeping, 0, __ATOMIC_SEQ_CST);
	if (w->waketimer)
		vmmshim_waketimer_arm((struct vmmshim_waketimer *)(uintptr_t)w->waketimer);
	if (read(w->wake_fd, &junk, sizeof(junk)) < 0)
		junk = 0;
	if (injected)
		++w->halt_wakes;
	return injected;
}

/*
 * Sleeps until a kick posts a vector the guest takes now: 1 (injected: run the guest), 0 (Python's: a stop(), or a
 * post the loop cannot inject here). The guest stands after its HLT with IF set (kvm_run tells of its last exit).
 */
int vmmshim_halt_sleep(int fd, uint8_t *run, struct vmmshim_intwin *w)
{
	struct pollfd p = { w->wake_fd, POLLIN, 0 };
	uint64_t junk;

	__atomic_store_n(&w->sleeping, 1, __ATOMIC_SEQ_CST);
	if (w->solo && w->waketimer)        /* every vCPU sleeps now: the timer goes off until one wakes */
		vmmshim_waketimer_off((struct vmmshim_waketimer *)(uintptr_t)w->waketimer);
	++w->halts;
	for (;;) {
		uint32_t posted, s;

		if (__atomic_load_n(&w->hard, __ATOMIC_SEQ_CST))
			return leave(w, 0);
		posted = __atomic_load_n(&w->kicks_posted, __ATOMIC_SEQ_CST);
		if (posted != w->kicks_seen) {
			w->kicks_seen = posted;
			s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
			if (s & WIN_POSTED) {
				if (!run[w->ready_off] || !run[w->ready_off + 1] ||
				    (s & WIN_AFTER_EOI && vmmshim_pv_eoi_set(w)))
					return leave(w, 0);
				run[w->window_off + 1] = 0;         /* the kick's immediate_exit */
				/* the store before the look at hard: else a stop()'s immediate_exit, stored after its
				   hard, could land before this clear and be lost while this look still saw no hard */
				__atomic_thread_fence(__ATOMIC_SEQ_CST);
				if (__atomic_load_n(&w->hard, __ATOMIC_SEQ_CST)) {
					run[w->window_off + 1] = 1;  /* a stop() came meanwhile: keep its exit */
					return leave(w, 0);
				}
				if (!vmmshim_inject_posted(fd, run, w, s))
					return leave(w, 0);
				++w->served_kicks;
				return leave(w, 1);
			}
			continue;               /* nothing posted for it any more: sleep on */
		}
		if (poll(&p, 1, -1) > 0 && read(w->wake_fd, &junk, sizeof(junk)) < 0)
			junk = 0;
	}
}

/* a HLT exit in the loop: 1 when it ended here with an injection (run the guest), 0 when Python takes it */
int vmmshim_halt_at_exit(int fd, uint8_t *run, struct vmmshim_intwin *w)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
	uint64_t cr8;

	if (!(w->halt & HALT_AT_EXIT) || w->wake_fd < 0 || !run[w->ready_off + 1])
		return 0;
	if (s & WIN_TAKEN) {
		/* a tick the ticker posted and the guest ended may be recorded for Python; else Python accepts first */
		if (!vmmshim_tick_fold_at_halt(w, s))
			return 0;
		s = WIN_IN;
	}
	if ((s & WIN_POSTED) && !(s & WIN_KICK)) {
		/* the window Python asked for is open at the HLT: inject what it posted for it */
		if (!run[w->ready_off] || (s & WIN_AFTER_EOI && vmmshim_pv_eoi_set(w)))
			return 0;
		if (!vmmshim_inject_posted(fd, run, w, s))
			return 0;
		++w->served;
		return 1;
	}
	memcpy(&cr8, run + w->cr8_off, sizeof(cr8));
	/* Python asked for the window with nothing posted (an ExtINT), or the guest moved its CR8 since Python's
	   vlapic looked (a held-back vector may be deliverable now): Python's HLT handling decides */
	if (run[w->window_off] || (cr8 & 0xF) != w->cr8_seen)
		return 0;
	/* the guest ended the interrupt in service through its PV EOI word: Python's vlapic learns it at its HLT
	   handling, and a vector that waited behind it may be deliverable now */
	if (w->eoi_armed && !vmmshim_pv_eoi_set(w))
		return 0;
	if (!ring_empty(run, w) || readable(w->idle_fd))
		return 0;
	return vmmshim_halt_sleep(fd, run, w);
}
