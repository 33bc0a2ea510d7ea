/*
 * vmmshim's compiled KVM run loop (built and loaded by fastrun.py; vmmshim's own code).
 *
 * KVM_RUN until an exit that user space has to see, answering in between the one-byte port reads whose value
 * the VM has published (Machine.answer_io): a polling driver's status register, such as a UART's LSR that a
 * kernel console reads once per character. Everything about kvm_run's layout comes from the caller (the
 * offsets that ops/nvmm/kvm/layouts.py declares), so this file needs no kernel header.
 *
 * It also serves the guest's IA32_TSC_DEADLINE writes while the vCPU's LAPIC timer is in TSC-deadline mode
 * (struct vmmshim_tscdl, Intel SDM vol. 3A 10.5.4.1): the write reaches user space through KVM's MSR filter, and
 * here it reads the guest TSC (KVM_GET_MSRS), sets a CLOCK_MONOTONIC timerfd to the deadline and completes the
 * WRMSR, without coming back to Python. The timer thread polls the timerfd and, when it is readable, takes the
 * deadline (vmmshim_tscdl_expire) and fires the LVT. A deadline already past, or a failed read, goes to Python.
 *
 * And it injects the interrupt that Python posted for the interrupt window (struct vmmshim_intwin): when the
 * guest opens its window (KVM_EXIT_IRQ_WINDOW_OPEN), the vector is still above the guest's CR8 and, where asked,
 * the guest has ended the interrupt in service through its PV EOI word, the loop injects it (KVM_INTERRUPT), arms
 * the PV EOI word where asked and runs the guest again. Python accepts the vector in its vlapic (IRR -> ISR) at
 * the next return (ops/nvmm/kvm/intwin.py). Anything else about the window goes to Python.
 *
 * And a guest's HLT is slept here when nothing waits for Python (fasthalt.c).
 *
 * An injection waits for Python's acceptance (WIN_TAKEN) until the run returns, so another thread's interrupt
 * could not be posted meanwhile; that thread may now accept it itself (vmmshim_intwin_take_over: the loop's
 * return waits for it) and post its own (vmmshim_intwin_release).
 *
 * And it answers the MMIO reads whose value the VM has published (Machine.answer_mmio, struct
 * vmmshim_mmio_answers): a read of 1, 2 or 4 bytes inside one aligned 32-bit register whose reads have no side
 * effect, such as the AHCI interrupt status an interrupt handler reads once per command.
 *
 * Not handled here: an ExtINT or NMI for the window, any other exit, string or wider port reads, port writes,
 * MMIO writes, MMIO reads wider than 4 bytes or across two registers (they return to the caller).
 */
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "fastrun.h"

uint64_t vmmshim_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int vmmshim_set_timer(int tfd, uint64_t due_ns)
{
	struct itimerspec its;

	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = (time_t)(due_ns / NS_PER_S);
	its.it_value.tv_nsec = (long)(due_ns % NS_PER_S);
	return timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

/* a CLOCK_MONOTONIC timerfd for vmmshim_tscdl.timerfd, or -errno */
int vmmshim_tscdl_open(void)
{
	int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

/* sets the deadline `value` (0: none) due at CLOCK_MONOTONIC `due_ns` as it is (a restored checkpoint's) */
int vmmshim_tscdl_set(struct vmmshim_tscdl *d, uint64_t value, uint64_t due_ns)
{
	if (!due_ns)
		due_ns = 1;
	__atomic_store_n(&d->due_ns, due_ns, __ATOMIC_RELEASE);
	__atomic_store_n(&d->value, value, __ATOMIC_RELEASE);
	return vmmshim_set_timer(d->timerfd, value ? due_ns : 0) < 0 ? -errno : 0;
}

/*
 * Arms the deadline `value` (a guest TSC value; 0 disarms), reading the guest TSC through vcpu_fd (the vCPU
 * must not be running). Returns 0 (armed or disarmed), 1 when the deadline has passed already (nothing armed:
 * the caller fires the timer), or -errno.
 */
int vmmshim_tscdl_arm(int vcpu_fd, struct vmmshim_tscdl *d, uint64_t value)
{
	struct one_msr m = { 1, 0, MSR_IA32_TSC, 0, 0 };
	uint64_t delta, ns, due;

	if (value) {
		if (ioctl(vcpu_fd, d->get_msrs, &m) != 1)
			return -(errno ? errno : EIO);
	}
	if (!value || value <= m.data) {
		__atomic_store_n(&d->value, 0, __ATOMIC_RELEASE);
		if (vmmshim_set_timer(d->timerfd, 0) < 0)
			return -errno;
		return value ? 1 : 0;
	}
	delta = value - m.data;
	ns = d->tsc_hz ? (uint64_t)((unsigned __int128)delta * NS_PER_S / d->tsc_hz) : MAX_DELAY_NS;
	if (ns > MAX_DELAY_NS)
		ns = MAX_DELAY_NS;
	due = vmmshim_now_ns() + (ns ? ns : 1);
	return vmmshim_tscdl_set(d, value, due);
}

/*
 * The timer thread, when the timerfd is readable: 1 if the armed deadline has fallen due and is taken now (the
 * caller fires the LVT; the MSR reads 0 from now on), 0 if there is none or it was moved (a rearm by the vCPU).
 */
int vmmshim_tscdl_expire(struct vmmshim_tscdl *d)
{
	uint64_t ticks, v, due;

	while (read(d->timerfd, &ticks, sizeof(ticks)) == sizeof(ticks))
		;
	v = __atomic_load_n(&d->value, __ATOMIC_ACQUIRE);
	if (!v)
		return 0;
	due = __atomic_load_n(&d->due_ns, __ATOMIC_ACQUIRE);
	if (vmmshim_now_ns() < due) {
		vmmshim_set_timer(d->timerfd, due);
		return 0;
	}
	return __atomic_compare_exchange_n(&d->value, &v, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) ? 1 : 0;
}

/* an IA32_TSC_DEADLINE write served here: 1 (the exit is complete), 0 (Python takes it) */
static int serve_tsc_deadline(int fd, uint8_t *run, struct vmmshim_tscdl *d)
{
	uint32_t index;
	uint64_t value;

	memcpy(&index, run + d->msr_off + 12, sizeof(index));
	if (index != MSR_IA32_TSC_DEADLINE)
		return 0;
	memcpy(&value, run + d->msr_off + 16, sizeof(value));
	if (vmmshim_tscdl_arm(fd, d, value) != 0)
		return 0;
	run[d->msr_off] = 0;        /* kvm_run.msr.error: KVM completes the WRMSR at the next KVM_RUN */
	++d->served;
	return 1;
}

/* whether the guest's PV EOI bit is still set (it has not ended the one interrupt in service) */
int vmmshim_pv_eoi_set(const struct vmmshim_intwin *w)
{
	const uint32_t *word = (const uint32_t *)(uintptr_t)w->pv_eoi;

	return word && (__atomic_load_n(word, __ATOMIC_ACQUIRE) & PV_EOI_BIT);
}

/* injects the posted vector if the guest takes interrupts now: 1 (done or not needed), 0 (Python decides) */
int vmmshim_inject_posted(int fd, uint8_t *run, struct vmmshim_intwin *w, uint32_t s)
{
	uint32_t vector = s & WIN_VECTOR, res = 0, cur;
	uint64_t cr8;
	uint32_t *word = (uint32_t *)(uintptr_t)w->pv_eoi;

	memcpy(&cr8, run + w->cr8_off, sizeof(cr8));
	if ((vector >> 4) <= (cr8 & 0xF))
		return 0;               /* the guest raised its CR8 meanwhile */
	if (s & (WIN_AFTER_EOI | WIN_ARM) && !word)
		return 0;
	if (s & WIN_AFTER_EOI) {
		if (__atomic_load_n(word, __ATOMIC_ACQUIRE) & PV_EOI_BIT)
			return 0;       /* the guest has not ended the one in service */
		res |= RES_EOI;
	}
	if (ioctl(fd, w->kvm_interrupt, &vector) < 0)
		return 0;
	if (s & WIN_ARM) {
		__atomic_fetch_or(word, PV_EOI_BIT, __ATOMIC_ACQ_REL);
		res |= RES_ARMED;
	}
	w->result = res;
	/* only this loop changes a posted state while WIN_IN is set, but for vmmshim_intwin_again: a change of it
	   asks for the window again, where Python finds what that thread's request left in the IRR */
	cur = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
	while (!__atomic_compare_exchange_n(&w->state, &cur, WIN_IN | WIN_TAKEN | (s & WIN_TICK) | vector, 0,
					    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		;
	run[w->window_off] = (s & WIN_AGAIN || cur != s) ? 1 : 0;
	return 1;
}

/* the window opened: 1 when the posted vector was injected (the guest runs again), 0 when Python takes the exit */
static int serve_window(int fd, uint8_t *run, struct vmmshim_intwin *w)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);

	if (!(s & WIN_POSTED) || !run[w->ready_off] || !run[w->ready_off + 1])
		return 0;
	if (!vmmshim_inject_posted(fd, run, w, s))
		return 0;
	++w->served;
	return 1;
}

/*
 * KVM_RUN returned EINTR: 1 when it was another thread's kick for an interrupt it posted (injected now, or at
 * the window, which is asked for), 0 when Python takes it (its stop(), or a signal nobody posted for).
 */
static int serve_kick(int fd, uint8_t *run, struct vmmshim_intwin *w)
{
	uint32_t posted = __atomic_load_n(&w->kicks_posted, __ATOMIC_ACQUIRE), s;

	if (__atomic_load_n(&w->hard, __ATOMIC_ACQUIRE) || posted == w->kicks_seen)
		return 0;
	w->kicks_seen = posted;
	run[w->window_off + 1] = 0;         /* immediate_exit */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);    /* ... stored before hard is looked at (see fasthalt.c) */
	if (__atomic_load_n(&w->hard, __ATOMIC_ACQUIRE)) {
		run[w->window_off + 1] = 1;     /* a stop() came meanwhile: keep its exit */
		return 0;
	}
	s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
	if (!(s & WIN_POSTED))
		return 1;               /* served already (at a window), or withdrawn: run on */
	if (run[w->ready_off] && run[w->ready_off + 1] && !(s & WIN_AFTER_EOI && vmmshim_pv_eoi_set(w))) {
		if (!vmmshim_inject_posted(fd, run, w, s))
			return 0;
		++w->served_kicks;
		return 1;
	}
	/* interrupts are off, or the one in service has not ended: inject when the guest opens its window */
	if (!run[w->ready_off + 1])
		__atomic_fetch_or(&w->state, WIN_MASKED, __ATOMIC_ACQ_REL);    /* the guest's IF holds it back */
	run[w->window_off] = 1;
	return 1;
}

/* an MMIO exit: 1 when it was a read of a published register (answered in kvm_run.mmio.data), 0 otherwise */
static int answer_mmio(uint8_t *mmio, const struct vmmshim_mmio_answers *a)
{
	uint64_t gpa, page;
	uint32_t len, n, i, shift;
	int64_t value;
	const int64_t *values;

	memcpy(&gpa, mmio, sizeof(gpa));
	memcpy(&len, mmio + 16, sizeof(len));
	if (mmio[20] || !(len == 1 || len == 2 || len == 4) || (gpa & 3) + len > 4)
		return 0;
	page = gpa >> MMIO_PAGE_SHIFT << MMIO_PAGE_SHIFT;
	n = __atomic_load_n(&a->npages, __ATOMIC_ACQUIRE);
	if (n > MMIO_PAGES)
		return 0;
	for (i = 0; i < n; i++) {
		if (a->pages[i].gpa != page)
			continue;
		values = (const int64_t *)(uintptr_t)a->pages[i].values;
		value = __atomic_load_n(&values[(gpa - page) >> 2], __ATOMIC_ACQUIRE);
		if (value < 0)
			return 0;
		shift = 8 * (uint32_t)(gpa & 3);
		value = (int64_t)(((uint64_t)value >> shift) & (len == 4 ? 0xFFFFFFFFu : (1u << (8 * len)) - 1));
		memset(mmio + 8, 0, 8);
		memcpy(mmio + 8, &value, len);      /* little-endian, as the guest's load takes it */
		return 1;
	}
	return 0;
}

/*
 * Returns 0 with an exit for the caller in kvm_run, or the errno of a failed KVM_RUN (EINTR after a kick).
 * answers[port] is the published value of a one-byte read of port, or -1; another thread may change it at
 * any time (each read of it is one atomic load). answers may be NULL (no port read is answered); mmio may be NULL
 * (no MMIO read is answered); tscdl may be NULL (no IA32_TSC_DEADLINE write is served); intwin may be NULL (no
 * interrupt is injected here).
 */
static int run_loop(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
		    const struct vmmshim_mmio_answers *mmio, struct vmmshim_run_stats *stats,
		    struct vmmshim_tscdl *tscdl, struct vmmshim_intwin *intwin)
{
	for (;;) {
		uint32_t reason, count;
		uint16_t port;
		uint64_t off, t0;
		int16_t value;
		const uint8_t *io;
		int r;

		if (lay->timing) {
			t0 = vmmshim_now_ns();
			r = ioctl(fd, lay->kvm_run, 0);
			stats->ns_last_return = vmmshim_now_ns();
			stats->ns_in_run += stats->ns_last_return - t0;
		} else {
			r = ioctl(fd, lay->kvm_run, 0);
		}
		if (r < 0) {
			if (errno == EINTR && intwin && serve_kick(fd, run, intwin))
				continue;
			return errno;
		}
		memcpy(&reason, run + lay->reason_off, sizeof(reason));
		if (tscdl && reason == tscdl->exit_wrmsr && __atomic_load_n(&tscdl->enabled, __ATOMIC_RELAXED)) {
			if (serve_tsc_deadline(fd, run, tscdl))
				continue;
			return 0;
		}
		if (intwin && reason == intwin->exit_window) {
			if (serve_window(fd, run, intwin))
				continue;
			return 0;
		}
		if (intwin && reason == intwin->exit_hlt) {
			if (vmmshim_halt_at_exit(fd, run, intwin))
				continue;
			return 0;
		}
		if (reason == lay->exit_mmio && mmio) {
			if (!answer_mmio(run + lay->io_off, mmio))
				return 0;
			++stats->answered_mmio;
			continue;
		}
		if (reason != lay->exit_io || !answers)
			return 0;
		io = run + lay->io_off;
		memcpy(&port, io + 2, sizeof(port));
		memcpy(&count, io + 4, sizeof(count));
		memcpy(&off, io + 8, sizeof(off));
		if (io[0] != lay->io_in || io[1] != 1 || count != 1 || off != lay->data_off || off >= lay->run_size)
			return 0;
		value = __atomic_load_n(&answers[port], __ATOMIC_ACQUIRE);
		if (value < 0)
			return 0;
		run[off] = (uint8_t)value;
		++stats->answered;
	}
}

/* the loop returns: WIN_IN cleared, once no other thread holds a take-over (vmmshim_intwin_take_over) */
static void leave_loop(struct vmmshim_intwin *w)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);

	for (;;) {
		if (s & WIN_BUSY) {
			sched_yield();
			s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
			continue;
		}
		if (__atomic_compare_exchange_n(&w->state, &s, s & ~WIN_IN, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
			return;
	}
}

int vmmshim_kvm_run(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
		    const struct vmmshim_mmio_answers *mmio, struct vmmshim_run_stats *stats,
		    struct vmmshim_tscdl *tscdl, struct vmmshim_intwin *intwin)
{
	int r;

	if (!intwin)
		return run_loop(fd, run, lay, answers, mmio, stats, tscdl, NULL);
	__atomic_fetch_or(&intwin->state, WIN_IN, __ATOMIC_ACQ_REL);
	intwin->slept_out = 0;
	if (intwin->halt & HALT_NOW) {
		/* Python handled the guest's HLT and found nothing to do: sleep here, then run the guest */
		intwin->halt &= ~HALT_NOW;
		if (intwin->wake_fd >= 0 && !vmmshim_halt_sleep(fd, run, intwin)) {
			intwin->slept_out = 1;
			leave_loop(intwin);
			return EINTR;
		}
	}
	r = run_loop(fd, run, lay, answers, mmio, stats, tscdl, intwin);
	leave_loop(intwin);
	return r;
}

/*
 * Another thread posts `post` (a vector and WIN_* conditions) for the loop running now: 1 when posted (the caller
 * then sets immediate_exit and signals the vCPU's thread), 0 when the loop is not running or holds a post already.
 */
int vmmshim_intwin_kick(struct vmmshim_intwin *w, uint32_t post)
{
	uint32_t expect = WIN_IN;

	if (!__atomic_compare_exchange_n(&w->state, &expect, WIN_IN | WIN_KICK | WIN_POSTED | post, 0,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return 0;
	__atomic_fetch_add(&w->kicks_posted, 1, __ATOMIC_ACQ_REL);
	return 1;
}

/*
 * Another thread's request while the loop holds `vector` posted, not injected: the post becomes `first`'s (the
 * same, or a higher vector requested now) and, with WIN_ARM, asks the window again once injected (WIN_AGAIN), so
 * Python comes back in time for what waits below without a kick (without WIN_ARM the guest's EOI exits). `flags`:
 * AGAIN_EDGE, `first` is edge-triggered (else WIN_ARM is dropped); AGAIN_IN_SERVICE, `first` is in service and
 * requested again (the post must wait for its end, WIN_AFTER_EOI). 1 when done, 0 (the caller kicks) otherwise.
 */
int vmmshim_intwin_again(struct vmmshim_intwin *w, uint32_t vector, uint32_t first, uint32_t flags)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE), n;

	for (;;) {
		if ((s & (WIN_IN | WIN_POSTED | WIN_BUSY)) != (WIN_IN | WIN_POSTED) || (s & WIN_VECTOR) != vector)
			return 0;
		if (first != vector && (s & WIN_TICK))
			return 0;
		if ((flags & AGAIN_IN_SERVICE) && !(s & WIN_AFTER_EOI))
			return 0;
		n = (s & ~WIN_VECTOR) | (first & WIN_VECTOR);
		if (!(flags & AGAIN_EDGE))
			n &= ~WIN_ARM;
		if (n & WIN_ARM)
			n |= WIN_AGAIN;
		if (n == s || __atomic_compare_exchange_n(&w->state, &s, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
			return 1;
	}
}

/*
 * Another thread, while the loop runs holding an injection Python's vlapic has not accepted (WIN_TAKEN, nothing
 * posted): marks the slot WIN_BUSY, so that the loop's return waits while the caller accepts that vector itself
 * (its vlapic's lock held) and then posts the next one with vmmshim_intwin_release. Returns the state taken over
 * (the vector in WIN_VECTOR; the injection's RES_* are in result), or 0 when the slot is not in that state.
 */
uint32_t vmmshim_intwin_take_over(struct vmmshim_intwin *w)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);

	if ((s & ~(WIN_VECTOR | WIN_TICK)) != (WIN_IN | WIN_TAKEN))
		return 0;
	if (!__atomic_compare_exchange_n(&w->state, &s, s | WIN_BUSY, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return 0;
	return s;
}

/*
 * Ends a take-over: posts `post` as vmmshim_intwin_kick does (1: the caller then sets immediate_exit and signals
 * the vCPU's thread), or, with 0, leaves the slot empty (0). WIN_IN stays: the loop had not returned.
 */
int vmmshim_intwin_release(struct vmmshim_intwin *w, uint32_t post)
{
	if (!post) {
		__atomic_store_n(&w->state, WIN_IN, __ATOMIC_RELEASE);
		return 0;
	}
	__atomic_store_n(&w->state, WIN_IN | WIN_KICK | WIN_POSTED | post, __ATOMIC_RELEASE);
	__atomic_fetch_add(&w->kicks_posted, 1, __ATOMIC_ACQ_REL);
	return 1;
}
