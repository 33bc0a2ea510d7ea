/*
 * What vmmshim's compiled data paths share (blkfast.c, nvmefast.c, ahcifast.c, p9fast.c, netfast.c; vmmshim's own
 * code, compiled into each of their libraries by ops/native.py): the check of a guest range against the first RAM
 * area, a whole preadv/pwritev, and the split virtqueue (VIRTIO 1.1 section 2.6: the descriptor, 2.6.5; the
 * available ring, 2.6.6; the used ring, 2.6.8; avail_event with VIRTIO_F_EVENT_IDX, 2.6.7.2) as the compiled virtio
 * paths own it between two Python looks (bhyve_devices/virtio/virtqueue.py hands its indices over and takes them
 * back).
 *
 * Everything here is static: each library keeps its own copy.
 *
 * Not here: the descriptor chain walks themselves (each device lays its requests out its own way), the packed
 * virtqueue.
 */
#ifndef VMMSHIM_FASTPATH_H
#define VMMSHIM_FASTPATH_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#define DESC_SIZE 16u
#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define MAX_TABLE 32768u            /* the largest queue or indirect table */
#define VQ_EVENT_IDX 1u             /* struct vmmshim_vq.flags: the driver accepted VIRTIO_F_EVENT_IDX */
#define VQ_INDIRECT 2u              /* ... VIRTIO_F_INDIRECT_DESC */

/* a descriptor, copied out of guest memory once and checked there */
struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

/* a queue's rings and indices, as Python hands them over (netfast.py, p9fast.py: the same layout) */
struct vmmshim_vq {
	uint64_t desc, avail, used; /* guest-physical ring addresses (offsets into ram) */
	uint32_t size;
	uint32_t flags;             /* VQ_EVENT_IDX, VQ_INDIRECT */
	uint32_t last_avail;        /* in and out */
	uint32_t used_idx;          /* in and out */
};

/* [addr, addr + len) lies inside [0, ram_len), without overflow */
static inline int in_ram(uint64_t addr, uint64_t len, uint64_t ram_len)
{
	return addr <= ram_len && len <= ram_len - addr;
}

/* the whole transfer of total bytes, retrying short ones (iov is consumed); 0, or an errno (EIO: nothing more
   moved, the end of the file); *moved gets what did move */
static inline int transfer_all(int fd, int write, struct iovec *iov, int n, uint64_t off, uint64_t total,
			       uint64_t *moved)
{
	*moved = 0;
	while (*moved < total) {
		ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (r == 0)
			return EIO;
		*moved += (uint64_t)r;
		off += (uint64_t)r;
		while (n > 0 && (size_t)r >= iov->iov_len) {
			r -= (ssize_t)iov->iov_len;
			++iov;
			--n;
		}
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + r;
			iov->iov_len -= (size_t)r;
		}
	}
	return 0;
}

static inline uint16_t load16(const uint8_t *p)
{
	return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store16(uint8_t *p, uint16_t v)
{
	__atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* the three rings inside RAM, suitably aligned, of a power-of-two size */
static inline int rings_in_ram(const struct vmmshim_vq *q, uint64_t ram_len)
{
	uint64_t n = q->size;

	if (n == 0 || n > MAX_TABLE || (n & (n - 1)) || (q->avail & 1) || (q->used & 3) || (q->desc & 15))
		return 0;
	return in_ram(q->desc, n * DESC_SIZE, ram_len) && in_ram(q->avail, 6 + 2 * n, ram_len) &&
	       in_ram(q->used, 6 + 8 * n, ram_len);
}

/* the chain at head goes in the used ring's entry used_idx (the caller stores the index after) */
static inline void put_used(uint8_t *ram, const struct vmmshim_vq *q, uint16_t used_idx, uint16_t head, uint32_t len)
{
	uint8_t *e = ram + q->used + 4 + 8 * (uint64_t)(used_idx % q->size);
	uint32_t id = head;

	memcpy(e, &id, 4);
	memcpy(e + 4, &len, 4);
}

/* a popped chain also moves avail_event on with EVENT_IDX, as the Python queue does */
static inline void popped(uint8_t *ram, const struct vmmshim_vq *q, uint16_t last)
{
	if (q->flags & VQ_EVENT_IDX)
		store16(ram + q->used + 4 + 8 * (uint64_t)q->size, last);
}

#endif
