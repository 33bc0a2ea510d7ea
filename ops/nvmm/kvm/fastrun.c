/*
 * vmmshim's compiled KVM run loop (built and loaded by fastrun.py; vmmshim's own code).
 *
 * KVM_RUN until an exit that user space has to see, answering in between the one-byte port reads whose value
 * the VM has published (Machine.answer_io): a polling driver's status register, such as a UART's LSR that a
 * kernel console reads once per character. Everything about kvm_run's layout comes from the caller (the
 * offsets that ops/nvmm/kvm/layouts.py declares), so this file needs no kernel header.
 *
 * Not handled here: any other exit, string or wider port reads, port writes (they return to the caller).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

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

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * Returns 0 with an exit for the caller in kvm_run, or the errno of a failed KVM_RUN (EINTR after a kick).
 * answers[port] is the published value of a one-byte read of port, or -1; another thread may change it at
 * any time (each read of it is one atomic load).
 */
int vmmshim_kvm_run(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
		    struct vmmshim_run_stats *stats)
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
		if (r < 0)
			return errno;
		memcpy(&reason, run + lay->reason_off, sizeof(reason));
		if (reason != lay->exit_io)
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
