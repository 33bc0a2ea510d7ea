/*
 * vmmshim's compiled NVMe I/O queue pass (built and loaded by nvmefast.py; vmmshim's own code).
 *
 * Serves the leading run of an I/O submission queue's new entries that are plain reads and writes
 * (NVM Express Base Specification 1.4: 4.1 queues, 4.2 the submission entry, 4.3 PRP entries and lists, 4.6 the
 * completion entry and its phase tag, 6.9 Read, 6.15 Write), and posts their completions. It stops, leaving the
 * entry at the head for the controller's Python path, at the first entry that is anything else: another opcode,
 * a fused command, an SGL, another namespace, protection information, a FUA write, a write to a read-only image,
 * an LBA range past the namespace, a transfer over MDTS, a PRP that breaks 4.3's rules, any buffer or list page
 * outside the first RAM area, or a host I/O error (Python then tries the command again and answers the error).
 * It also stops when the completion queue is full (Python looks at the shadow head and stalls the queue) and
 * after max_n entries. So for every entry, the guest sees the answer the Python path would give.
 *
 * Each entry and each PRP list entry is read from guest memory once, into locals, and checked before use; the
 * queues, every list page and every buffer must lie in [ram, ram + ram_len), with no overflow in addr + len.
 * A completion is written with its status word (which holds the phase tag) stored last.
 *
 * Not supported here: Flush, Write Zeroes, Dataset Management, SGLs, metadata, the admin queue, queues or
 * buffers in highmem (all served by Python).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "fastpath.h"

#define SQE_SIZE 64u
#define CQE_SIZE 16u
#define PAGE 4096u
#define PAGE_MASK (PAGE - 1u)
#define PRP_ENTRY 8u
#define OP_WRITE 0x01u
#define OP_READ 0x02u
#define FLAGS_FUSE_MASK 0x03u
#define FLAGS_PSDT_SHIFT 6
#define NSID 1u
#define NLB_MASK 0xFFFFu
#define RW_FUA (1u << 30)
#define RW_PRINFO (0xFu << 26)
#define MAX_SEGS 1024u              /* IOV_MAX on Linux */

/* submission entry offsets (4.2) */
#define E_FLAGS 1
#define E_CID 2
#define E_NSID 4
#define E_PRP1 24
#define E_PRP2 32
#define E_CDW10 40
#define E_CDW11 44
#define E_CDW12 48

struct vmmshim_nvme_q {
	uint64_t sq_base;           /* guest address of the submission ring */
	uint32_t sq_size;
	uint32_t sq_head;           /* in: the next entry to fetch; out: after what was served */
	uint32_t sq_tail;
	uint32_t sqid;
	uint64_t cq_base;
	uint32_t cq_size;
	uint32_t cq_head;           /* the host's head, as the controller knows it */
	uint32_t cq_tail;           /* in/out */
	uint32_t cq_phase;          /* in/out */
	uint32_t max_n;
};

struct vmmshim_nvme_disk {
	int32_t fd;
	int32_t readonly;
	uint64_t nsze;              /* namespace size in blocks */
	uint32_t lba_shift;
	uint32_t max_transfer;      /* bytes (MDTS) */
};

struct vmmshim_nvme_out {
	uint64_t reads;
	uint64_t writes;
	uint64_t bytes_read;
	uint64_t bytes_written;
};

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
	return v;
}

/* one buffer of the transfer; 0 when it is not in RAM */
static int add_seg(uint8_t *ram, uint64_t ram_len, struct iovec *iov, uint32_t *n, uint64_t addr, uint64_t len)
{
	if (*n >= MAX_SEGS || !in_ram(addr, len, ram_len))
		return 0;
	iov[*n].iov_base = ram + addr;
	iov[*n].iov_len = len;
	(*n)++;
	return 1;
}

/* the buffers PRP1/PRP2 give for length bytes (4.3; lists chained as Linux's nvme_pci_setup_prps does); 0: fall back */
static int prp_iov(uint8_t *ram, uint64_t ram_len, uint64_t prp1, uint64_t prp2, uint64_t length,
		   struct iovec *iov, uint32_t *n)
{
	uint64_t first, rest, pages, ptr, left, i;

	*n = 0;
	if (prp1 & 0x3u)
		return 0;
	first = PAGE - (prp1 & PAGE_MASK);
	if (first > length)
		first = length;
	if (!add_seg(ram, ram_len, iov, n, prp1, first))
		return 0;
	rest = length - first;
	if (rest == 0)
		return 1;
	if (rest <= PAGE)
		return !(prp2 & PAGE_MASK) && add_seg(ram, ram_len, iov, n, prp2, rest);
	pages = (rest + PAGE_MASK) / PAGE;
	ptr = prp2;
	left = pages;
	for (i = 0; i <= pages && left; i++) {      /* each list page gives at least one entry, or the list loops */
		uint64_t room, take, j, e;

		if (ptr & (PRP_ENTRY - 1))
			return 0;
		room = (PAGE - (ptr & PAGE_MASK)) / PRP_ENTRY;
		if (!in_ram(ptr, (left <= room ? left : room) * PRP_ENTRY, ram_len))
			return 0;
		take = left <= room ? left : room - 1;
		for (j = 0; j < take; j++) {
			e = get64(ram + ptr + j * PRP_ENTRY);
			if (e & PAGE_MASK)
				return 0;
			if (!add_seg(ram, ram_len, iov, n, e, left == 1 && j == take - 1 ? rest - (pages - 1) * PAGE : PAGE))
				return 0;
			left--;
		}
		if (left)
			ptr = get64(ram + ptr + (room - 1) * PRP_ENTRY);
	}
	return left == 0;
}

/* one read or write entry served (its completion is the caller's); 0: leave it to Python, nothing moved */
static int serve_one(uint8_t *ram, uint64_t ram_len, const uint8_t *e, const struct vmmshim_nvme_disk *d,
		     struct vmmshim_nvme_out *out)
{
	struct iovec iov[MAX_SEGS];
	uint32_t n, c12 = get32(e + E_CDW12), nlb = (c12 & NLB_MASK) + 1u;
	uint64_t slba = ((uint64_t)get32(e + E_CDW11) << 32) | get32(e + E_CDW10), length, moved;
	uint8_t op = e[0], flags = e[E_FLAGS];
	int write = op == OP_WRITE;

	if ((op != OP_READ && !write) || flags & FLAGS_FUSE_MASK || flags >> FLAGS_PSDT_SHIFT)
		return 0;
	if (get32(e + E_NSID) != NSID || c12 & RW_PRINFO || (write && (c12 & RW_FUA || d->readonly)))
		return 0;
	if (slba > d->nsze || nlb > d->nsze - slba)
		return 0;
	length = (uint64_t)nlb << d->lba_shift;
	if (length > d->max_transfer)
		return 0;
	if (!prp_iov(ram, ram_len, get64(e + E_PRP1), get64(e + E_PRP2), length, iov, &n))
		return 0;
	if (transfer_all(d->fd, write, iov, (int)n, slba << d->lba_shift, length, &moved))
		return 0;
	if (write) {
		out->writes++;
		out->bytes_written += length;
	} else {
		out->reads++;
		out->bytes_read += length;
	}
	return 1;
}

static void post(uint8_t *cqe, uint16_t sqhd, uint16_t sqid, uint16_t cid, uint16_t phase)
{
	uint32_t zero = 0;
	uint16_t status = phase & 1u;       /* Successful Completion, and the phase tag */

	memcpy(cqe, &zero, 4);              /* DW0: command specific, 0 for reads and writes */
	memcpy(cqe + 4, &zero, 4);
	memcpy(cqe + 8, &sqhd, 2);
	memcpy(cqe + 10, &sqid, 2);
	memcpy(cqe + 12, &cid, 2);
	__atomic_store_n((uint16_t *)(cqe + 14), status, __ATOMIC_RELEASE);
}

/*
 * The queue pass: returns how many entries were served and completed (q->sq_head, q->cq_tail and q->cq_phase
 * moved past them), or -1 when the queues themselves are not in RAM (nothing done).
 */
int32_t vmmshim_nvme_drain(uint8_t *ram, uint64_t ram_len, struct vmmshim_nvme_q *q,
			   const struct vmmshim_nvme_disk *d, struct vmmshim_nvme_out *out)
{
	uint8_t e[SQE_SIZE];
	int32_t served = 0;

	if (!q->sq_size || !q->cq_size || q->sq_head >= q->sq_size || q->sq_tail >= q->sq_size
	    || q->cq_tail >= q->cq_size || q->cq_head >= q->cq_size
	    || !in_ram(q->sq_base, (uint64_t)q->sq_size * SQE_SIZE, ram_len)
	    || !in_ram(q->cq_base, (uint64_t)q->cq_size * CQE_SIZE, ram_len))
		return -1;
	while (q->sq_head != q->sq_tail && (uint32_t)served < q->max_n
	       && (q->cq_tail + 1u) % q->cq_size != q->cq_head) {
		uint32_t next = (q->sq_head + 1u) % q->sq_size;
		uint16_t cid;

		memcpy(e, ram + q->sq_base + (uint64_t)q->sq_head * SQE_SIZE, SQE_SIZE);     /* read once */
		if (!serve_one(ram, ram_len, e, d, out))
			break;
		memcpy(&cid, e + E_CID, sizeof(cid));
		q->sq_head = next;
		post(ram + q->cq_base + (uint64_t)q->cq_tail * CQE_SIZE, (uint16_t)next, (uint16_t)q->sqid, cid,
		     (uint16_t)q->cq_phase);
		if (++q->cq_tail == q->cq_size) {
			q->cq_tail = 0;
			q->cq_phase ^= 1u;
		}
		served++;
	}
	return served;
}
