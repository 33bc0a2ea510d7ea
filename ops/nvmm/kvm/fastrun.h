/*
 * The structures vmmshim's compiled KVM run loop shares with Python (fastrun.py's CDEF declares the same) and
 * between its two files, fastrun.c (the loop) and fasthalt.c (HLT slept in the loop). vmmshim's own code.
 */
#ifndef VMMSHIM_FASTRUN_H
#define VMMSHIM_FASTRUN_H

#include <stdint.h>

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
	uint32_t exit_mmio;         /* KVM_EXIT_MMIO; kvm_run.mmio is at io_off: phys_addr u64, data[8], len u32,
	                               is_write u8 */
};

/*
 * One VM's published MMIO reads (Python: fastrun.py's MmioAnswers): pages of 4 KiB, each a table of the values
 * its 1024 aligned 32-bit registers read (-1: the read exits). A page is filled before npages counts it, and is
 * never taken back (its values go to -1 instead), so the loop reads it without a lock; each value is one atomic
 * load.
 */
#define MMIO_PAGES 16u
#define MMIO_PAGE_SHIFT 12u
#define MMIO_SLOTS 1024u

struct vmmshim_mmio_page {
	uint64_t gpa;               /* the page's guest-physical base */
	uint64_t values;            /* int64_t[MMIO_SLOTS] in this process */
};

struct vmmshim_mmio_answers {
	uint32_t npages;            /* pages in use (atomic: grows only) */
	uint32_t pad;
	struct vmmshim_mmio_page pages[MMIO_PAGES];
};

/* the counters a vCPU's loop keeps (read by Python at any time, for statistics) */
struct vmmshim_run_stats {
	uint64_t answered;          /* port reads answered here */
	uint64_t ns_in_run;         /* with timing: time inside KVM_RUN (the guest and the kernel), CLOCK_MONOTONIC */
	uint64_t ns_last_return;    /* with timing: when the last KVM_RUN returned; the caller's own clock after
	                               the call minus this is what the return cost (taking Python's GIL back) */
	uint64_t answered_mmio;     /* MMIO reads answered here */
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
	/* HLT slept in the loop (fasthalt.c) */
	uint32_t exit_hlt;          /* KVM_EXIT_HLT */
	uint32_t halt;              /* Python: HALT_AT_EXIT (a HLT exit may sleep here), HALT_NOW (sleep first) */
	int32_t wake_fd;            /* an eventfd written for a kick or stop while the loop sleeps */
	uint32_t sleeping;          /* the loop sleeps in a HLT (atomic; any thread reads it) */
	uint32_t ring_off;          /* the coalesced ring's header (first u32, last u32) in the mapping, or 0 */
	int32_t idle_fd;            /* readable: a HLT exit goes to Python (work its idle hook does), or -1 */
	uint32_t slept_out;         /* the loop: the last run's sleep ended for Python, the guest still halted */
	uint32_t cr8_seen;          /* Python: the guest's CR8 its vlapic agreed with (a HLT after a change is Python's) */
	uint64_t waketimer;         /* a struct vmmshim_waketimer * armed when a sleep ends, or 0 */
	uint64_t halts;             /* sleeps in the loop */
	uint64_t halt_wakes;        /* ... that ended with an injection here */
	uint32_t solo;              /* Python: the VM's only started vCPU (its sleep stops the wake timer) */
	uint32_t eoi_armed;         /* Python: its PV EOI bit (at pv_eoi) is armed for the one in service; a HLT
	                               after the guest cleared it is Python's */
	uint32_t pad2;
	uint64_t tick;              /* its struct vmmshim_tick once the ticker serves its deadline (a HLT after a
	                               tick the guest ended records it there and sleeps), or 0 */
};

#define HALT_AT_EXIT 1u
#define HALT_NOW 2u

/* a timer the loop starts when one of the VM's vCPUs leaves its sleep (Python: intwin.py's WakeTimer) */
struct vmmshim_waketimer {
	int32_t tfd;                /* CLOCK_MONOTONIC timerfd, non-blocking */
	uint32_t armed;             /* atomic: 1 while it is set */
	uint64_t period_ns;
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
#define WIN_BUSY 0x10000u           /* another thread accepts the loop's injection (TAKEN): the loop's return waits */
#define WIN_TICK 0x20000u           /* posted by the ticker (fasttick.c): the LVT timer's vector, which Python's
                                       vlapic has not seen fire */
#define RES_EOI 1u
#define RES_ARMED 2u
#define AGAIN_EDGE 1u               /* vmmshim_intwin_again's flags (intwin.py's AGAIN_*) */
#define AGAIN_IN_SERVICE 2u
#define PV_EOI_BIT 1u

/*
 * one vCPU's TSC-deadline expiry served by the process's ticker thread (fasttick.c; Python: tscdeadline.py's
 * TscDeadline.attach_ticker). The fold fields are written by the ticker while it holds the slot (WIN_BUSY) and
 * read by Python only while the slot is its own (the run returned, or Python holds it: take_over).
 */
struct vmmshim_tick {
	uint32_t plan;              /* Python, under its vlapic's lock: the LVT timer's vector and WIN_AFTER_EOI,
	                               WIN_ARM, posted as a kick when the deadline falls due; 0: Python fires it.
	                               Cleared for every other request (the vlapic's state moves) */
	int32_t tid;                /* the vCPU thread's kernel id (signalled as a kick) */
	int32_t sig;                /* the kick's signal */
	int32_t notify_fd;          /* an eventfd: a deadline fell due that Python fires (the timer thread reads it) */
	uint64_t run;               /* the vCPU's kvm_run mapping */
	uint64_t dl;                /* its struct vmmshim_tscdl */
	uint64_t win;               /* its struct vmmshim_intwin */
	uint32_t fired;             /* the ticker: a due deadline waits for Python (exchanged to 0 there) */
	uint32_t fold_state;        /* the ticker: the first injection it found ended in the guest (the slot's state
	                               then, WIN_TAKEN and a vector) that Python has not accepted; 0: none */
	uint32_t fold_result;       /* ... and that injection's RES_* */
	uint32_t folds;             /* injections found ended since Python last looked (fold_state's first) */
	uint64_t posted;            /* statistics: ticks posted as kicks */
	uint64_t handed;            /* ... and left to Python */
};

/* struct kvm_msrs with one struct kvm_msr_entry */
struct one_msr {
	uint32_t nmsrs, pad;
	uint32_t index, reserved;
	uint64_t data;
};

/* fastrun.c, for fasthalt.c and fasttick.c */
uint64_t vmmshim_now_ns(void);
int vmmshim_tscdl_expire(struct vmmshim_tscdl *d);
int vmmshim_set_timer(int tfd, uint64_t due_ns);
int vmmshim_pv_eoi_set(const struct vmmshim_intwin *w);
int vmmshim_inject_posted(int fd, uint8_t *run, struct vmmshim_intwin *w, uint32_t s);

/* fasthalt.c, for fastrun.c and Python */
int vmmshim_waketimer_arm(struct vmmshim_waketimer *t);
int vmmshim_waketimer_off(struct vmmshim_waketimer *t);
void vmmshim_intwin_wake(struct vmmshim_intwin *w);
int vmmshim_halt_at_exit(int fd, uint8_t *run, struct vmmshim_intwin *w);
int vmmshim_halt_sleep(int fd, uint8_t *run, struct vmmshim_intwin *w);

/* fasttick.c, for fasthalt.c */
int vmmshim_tick_fold_at_halt(struct vmmshim_intwin *w, uint32_t s);

/* fasttick.c, for Python */
int vmmshim_ticker_add(struct vmmshim_tick *t);
int vmmshim_ticker_remove(struct vmmshim_tick *t);
uint32_t vmmshim_tick_take_fired(struct vmmshim_tick *t);
void vmmshim_ticker_pause(int on);

#endif
