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
 * Not handled here: an ExtINT or NMI for the window, any other exit, string or wider port reads, port writes
 * (they return to the caller).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MSR_IA32_TSC 0x10u
#define MSR_IA32_TSC_DEADLINE 0x6E0u
#define NS_PER_S 1000000000ull
#define MAX_DELAY_NS (1ull << 62)   /* a deadline centuries away is armed this far (the timerfd's range) */

struct vmmshim_run_layout {
	unsigned long kvm_run;      /* the KVM_RUN request number */
	uint32_t reason_off;        /* kvm_run.exit_reason */
	uint32_t io_off;            /* kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64 */
	uint32_t exit_io;           /* KVM_EXIT_IO */
	uint32_t io_in;             /* KVM_EXIT_IO_IN */
	uint64_t data_off;          /* where KVM puts port data in the mapping */
	uint64_t run_size;          /* the mapping's size */
	uint32_t timing;            /* non-zero: keep the clock counters of vmmshim_run_stats (two clock reads
	                               per KVM_RUN, for bench/exit_profile.py) */
};

/* the counters a vCPU's loop keeps (read by Python at any time, for statistics) */
struct vmmshim_run_stats {
	uint64_t answered;          /* port reads answered here */
	uint64_t ns_in_run;         /* with timing: time inside KVM_RUN (the guest and the kernel), CLOCK_MONOTONIC */
	uint64_t ns_last_return;    /* with timing: when the last KVM_RUN returned; the caller's own clock after
	                               the call minus this is what the return cost (taking Python's GIL back) */
};

/* one vCPU's IA32_TSC_DEADLINE (Python: ops/nvmm/kvm/tscdeadline.py) */
struct vmmshim_tscdl {
	uint32_t enabled;           /* Python: the LVT timer is in TSC-deadline mode; the loop serves the writes */
	uint32_t msr_off;           /* kvm_run.msr: error u8 at +0, index u32 at +12, data u64 at +16 */
	uint32_t exit_wrmsr;        /* KVM_EXIT_X86_WRMSR */
	int32_t timerfd;            /* CLOCK_MONOTONIC, non-blocking */
	unsigned long get_msrs;     /* KVM_GET_MSRS */
	uint64_t tsc_hz;            /* the guest TSC's rate */
	uint64_t value;             /* the deadline armed (a guest TSC value; 0: none), read and taken atomically */
	uint64_t due_ns;            /* CLOCK_MONOTONIC when it falls due */
	uint64_t served;            /* writes the loop served */
};

/* one vCPU's interrupt for the window or a kick (Python: ops/nvmm/kvm/intwin.py) */
struct vmmshim_intwin {
	uint32_t state;             /* WIN_* bits and a vector: posted by Python before a run (or by another thread
	                               while the loop runs, WIN_KICK), WIN_TAKEN once injected; atomic */
	uint32_t hard;              /* Python's stop(): the next EINTR goes to Python */
	uint64_t pv_eoi;            /* the guest's PV EOI word in this process (4-byte aligned, in guest RAM), or 0 */
	unsigned long kvm_interrupt;    /* KVM_INTERRUPT */
	uint32_t exit_window;       /* KVM_EXIT_IRQ_WINDOW_OPEN */
	uint32_t window_off;        /* kvm_run.request_interrupt_window (u8); immediate_exit is the next byte */
	uint32_t ready_off;         /* kvm_run.ready_for_interrupt_injection (u8); if_flag is the next byte */
	uint32_t cr8_off;           /* kvm_run.cr8 (u64) */
	uint32_t result;            /* the loop: RES_EOI (the PV EOI was seen), RES_ARMED (the word armed again) */
	uint32_t kicks_posted;      /* another thread: kicks it posted (each with immediate_exit and a signal) */
	uint32_t kicks_seen;        /* the loop: kicks_posted when it last took an EINTR for them */
	uint32_t pad;
	uint64_t served;            /* interrupts the loop injected at a window */
	uint64_t served_kicks;      /* ... and at a kick */
};

#define WIN_VECTOR 0xFFu
#define WIN_POSTED 0x100u           /* a vector to inject */
#define WIN_TAKEN 0x200u            /* injected; Python's vlapic has not accepted it yet */
#define WIN_IN 0x400u               /* the loop runs (a kick may be posted only then) */
#define WIN_KICK 0x800u             /* posted by another thread */
#define WIN_AFTER_EOI 0x1000u       /* inject only once the guest cleared its PV EOI bit (ended the one in service) */
#define WIN_ARM 0x2000u             /* set the PV EOI bit after injecting (the vector's end goes through memory) */
#define WIN_AGAIN 0x4000u           /* ask for the window again after injecting (more waits for its end) */
#define WIN_MASKED 0x8000u          /* the loop: a kick's vector waits for the guest to set IF */
#define RES_EOI 1u
#define RES_ARMED 2u
#define PV_EOI_BIT 1u

/* struct kvm_msrs with one struct kvm_msr_entry */
struct one_msr {
	uint32_t nmsrs, pad;
	uint32_t index, reserved;
	uint64_t data;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int set_timer(int tfd, uint64_t due_ns)
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
	return set_timer(d->timerfd, value ? due_ns : 0) < 0 ? -errno : 0;
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
		if (set_timer(d->timerfd, 0) < 0)
			return -errno;
		return value ? 1 : 0;
	}
	delta = value - m.data;
	ns = d->tsc_hz ? (uint64_t)((unsigned __int128)delta * NS_PER_S / d->tsc_hz) : MAX_DELAY_NS;
	if (ns > MAX_DELAY_NS)
		ns = MAX_DELAY_NS;
	due = now_ns() + (ns ? ns : 1);
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
	if (now_ns() < due) {
		set_timer(d->timerfd, due);
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
static int pv_eoi_set(const struct vmmshim_intwin *w)
{
	const uint32_t *word = (const uint32_t *)(uintptr_t)w->pv_eoi;

	return word && (__atomic_load_n(word, __ATOMIC_ACQUIRE) & PV_EOI_BIT);
}

/* injects the posted vector if the guest takes interrupts now: 1 (done or not needed), 0 (Python decides) */
static int inject_posted(int fd, uint8_t *run, struct vmmshim_intwin *w, uint32_t s)
{
	uint32_t vector = s & WIN_VECTOR, res = 0;
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
	/* only this loop changes a posted state while WIN_IN is set: a plain store keeps WIN_IN */
	__atomic_store_n(&w->state, WIN_IN | WIN_TAKEN | vector, __ATOMIC_RELEASE);
	run[w->window_off] = (s & WIN_AGAIN) ? 1 : 0;
	return 1;
}

/* the window opened: 1 when the posted vector was injected (the guest runs again), 0 when Python takes the exit */
static int serve_window(int fd, uint8_t *run, struct vmmshim_intwin *w)
{
	uint32_t s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);

	if (!(s & WIN_POSTED) || !run[w->ready_off] || !run[w->ready_off + 1])
		return 0;
	if (!inject_posted(fd, run, w, s))
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
	if (__atomic_load_n(&w->hard, __ATOMIC_ACQUIRE)) {
		run[w->window_off + 1] = 1;     /* a stop() came meanwhile: keep its exit */
		return 0;
	}
	s = __atomic_load_n(&w->state, __ATOMIC_ACQUIRE);
	if (!(s & WIN_POSTED))
		return 1;               /* served already (at a window), or withdrawn: run on */
	if (run[w->ready_off] && run[w->ready_off + 1] && !(s & WIN_AFTER_EOI && pv_eoi_set(w))) {
		if (!inject_posted(fd, run, w, s))
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

/*
 * Returns 0 with an exit for the caller in kvm_run, or the errno of a failed KVM_RUN (EINTR after a kick).
 * answers[port] is the published value of a one-byte read of port, or -1; another thread may change it at
 * any time (each read of it is one atomic load). answers may be NULL (no port read is answered); tscdl may be
 * NULL (no IA32_TSC_DEADLINE write is served); intwin may be NULL (no interrupt is injected here).
 */
static int run_loop(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
		    struct vmmshim_run_stats *stats, struct vmmshim_tscdl *tscdl, struct vmmshim_intwin *intwin)
{
	for (;;) {
		uint32_t reason, count;
		uint16_t port;
		uint64_t off, t0;
		int16_t value;
		const uint8_t *io;
		int r;

		if (lay->timing) {
			t0 = now_ns();
			r = ioctl(fd, lay->kvm_run, 0);
			stats->ns_last_return = now_ns();
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

int vmmshim_kvm_run(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
		    struct vmmshim_run_stats *stats, struct vmmshim_tscdl *tscdl, struct vmmshim_intwin *intwin)
{
	int r;

	if (!intwin)
		return run_loop(fd, run, lay, answers, stats, tscdl, NULL);
	__atomic_fetch_or(&intwin->state, WIN_IN, __ATOMIC_ACQ_REL);
	r = run_loop(fd, run, lay, answers, stats, tscdl, intwin);
	__atomic_fetch_and(&intwin->state, ~WIN_IN, __ATOMIC_ACQ_REL);
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
