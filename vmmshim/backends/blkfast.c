/*
 * vmmshim's compiled virtio-blk request (built and loaded by blkfast.py; vmmshim's own code).
 *
 * Serves one block request whose chain is one indirect table laid out as Linux's virtio_blk driver writes it
 * (VIRTIO 1.1 sections 2.6.5.3 and 5.2.6): entry i chains to i + 1, the 16-byte request header first, then the
 * data buffers (all device-writable for a read, all device-readable for a write), then the one-byte status, every
 * buffer inside the first RAM area. Anything else -- another layout, another request type, a range past the end
 * of the image, a read-only image, a buffer outside RAM -- returns VMMSHIM_BLK_FALLBACK before touching anything,
 * and the device's Python path walks the chain and answers it as the specification says.
 *
 * Each descriptor is read from guest memory once, into locals, and checked before use: the table and every
 * buffer must lie in [ram, ram + ram_len), with no overflow in addr + len.
 *
 * Not handled here: flush, get-id, discard, write-zeroes, direct chains, chains over highmem.
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "fastpath.h"

#define HDR_SIZE 16u
#define SECTOR 512u
#define T_IN 0u
#define T_OUT 1u
#define S_OK 0u
#define S_IOERR 1u
#define MAX_SEGS 1024u              /* IOV_MAX on Linux */

#define VMMSHIM_BLK_FALLBACK (-1)

struct vmmshim_blk_out {
	uint32_t type;              /* T_IN or T_OUT, when served */
	uint32_t status;            /* the status byte written */
	uint64_t bytes;             /* data bytes moved */
	int32_t error;              /* errno of a failed transfer (status IOERR), else 0 */
};

/*
 * Returns the used length to put in the used ring (the status byte counts) with the status byte written, or
 * VMMSHIM_BLK_FALLBACK with nothing read from the image, nothing written to the guest.
 */
int64_t vmmshim_blk_indirect(uint8_t *ram, uint64_t ram_len, uint64_t table, uint32_t tsize, int fd,
			     uint64_t capacity, int readonly, struct vmmshim_blk_out *out)
{
	struct iovec iov[MAX_SEGS];
	struct vq_desc d;
	uint64_t hdr_addr = 0, status_addr = 0, total = 0, sector, moved;
	uint32_t type, i, last, nseg = 0;
	uint8_t hdr[HDR_SIZE];
	int data_write = -1, err;

	if (tsize < 3 || tsize - 2 > MAX_SEGS || !in_ram(table, (uint64_t)tsize * DESC_SIZE, ram_len))
		return VMMSHIM_BLK_FALLBACK;
	last = tsize - 1;
	for (i = 0; i < tsize; i++) {
		memcpy(&d, ram + table + (uint64_t)i * DESC_SIZE, sizeof(d));
		if (!in_ram(d.addr, d.len, ram_len))
			return VMMSHIM_BLK_FALLBACK;
		if (i < last && (!(d.flags & F_NEXT) || d.next != i + 1))
			return VMMSHIM_BLK_FALLBACK;
		if (i == 0) {
			if (d.flags != F_NEXT || d.len != HDR_SIZE)
				return VMMSHIM_BLK_FALLBACK;
			hdr_addr = d.addr;
		} else if (i == last) {
			if (d.flags != F_WRITE || d.len != 1)
				return VMMSHIM_BLK_FALLBACK;
			status_addr = d.addr;
		} else {
			int w = d.flags == (F_NEXT | F_WRITE);

			if (!w && d.flags != F_NEXT)
				return VMMSHIM_BLK_FALLBACK;
			if (data_write < 0)
				data_write = w;
			else if (data_write != w)
				return VMMSHIM_BLK_FALLBACK;
			iov[nseg].iov_base = ram + d.addr;
			iov[nseg].iov_len = d.len;
			nseg++;
			total += d.len;
		}
	}
	memcpy(hdr, ram + hdr_addr, HDR_SIZE);         /* read once: type u32, reserved u32, sector u64 */
	memcpy(&type, hdr, sizeof(type));
	memcpy(&sector, hdr + 8, sizeof(sector));
	if (!((type == T_IN && data_write == 1) || (type == T_OUT && data_write == 0)))
		return VMMSHIM_BLK_FALLBACK;
	if (type == T_OUT && readonly)
		return VMMSHIM_BLK_FALLBACK;
	if (total % SECTOR || sector > capacity / SECTOR || total > capacity - sector * SECTOR)
		return VMMSHIM_BLK_FALLBACK;
	err = transfer_all(fd, type == T_OUT, iov, (int)nseg, sector * SECTOR, total, &moved);
	out->type = type;
	out->bytes = moved;
	out->error = err;
	out->status = err ? S_IOERR : S_OK;
	ram[status_addr] = (uint8_t)out->status;
	if (err || type == T_OUT)
		return 1;
	return (int64_t)total + 1;
}
