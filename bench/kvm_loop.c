/*
 * The C peer of bench/exit_bench.py: the same long-mode guest loop (`out %al,(%dx); dec %rcx; jnz`) on raw
 * KVM ioctls, counting every port-I/O exit in a tiny "device". Built by the benchmark at run time.
 *
 * usage: kvm_loop N PORT   prints "exits=<n> seconds=<s>"
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (2u << 20)
#define PML4 0x3000
#define PDPT 0x4000
#define PD 0x5000
#define CODE 0x2000

static void die(const char *what) { perror(what); exit(4); }

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;
	int port = argc > 2 ? atoi(argv[2]) : 0x80;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) die("KVM_CREATE_VM");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem };
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
	/* one 2 MiB identity page */
	*(uint64_t *)(mem + PML4) = PDPT | 3;
	*(uint64_t *)(mem + PDPT) = PD | 3;
	*(uint64_t *)(mem + PD) = 0x83;
	/* loop: out %al,(%dx); dec %rcx; jnz loop; hlt */
	static const uint8_t code[] = { 0xee, 0x48, 0xff, 0xc9, 0x75, 0xfa, 0xf4 };
	memcpy(mem + CODE, code, sizeof(code));

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0) die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
	struct kvm_segment seg = { .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3, .present = 1,
				   .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1 };
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
	seg.selector = 0x08; seg.type = 0xb; seg.db = 0; seg.l = 1;
	sregs.cs = seg;
	sregs.cr3 = PML4;
	sregs.cr4 = 1u << 5;                                      /* PAE */
	sregs.cr0 = (1u << 31) | (1u << 0) | (1u << 5) | (1u << 4); /* PG PE NE ET */
	sregs.efer = (1u << 8) | (1u << 10);                      /* LME LMA */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE, .rflags = 2, .rcx = n, .rdx = port, .rsp = 0x1f0000 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

	long exits = 0, sum = 0;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == port) {
			sum += *((uint8_t *)run + run->io.data_offset);   /* the device: count and consume */
			exits++;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
		return 4;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("exits=%ld seconds=%.6f sum=%ld\n", exits,
	       (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, sum);
	return exits == n ? 0 : 4;
}
