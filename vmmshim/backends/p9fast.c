/*
 * vmmshim's compiled virtio-9p Tread and Twrite (built and loaded by p9fast.py; vmmshim's own code).
 *
 * Serves one 9P2000.L request (Plan 9's intro(5) and read(5) for the framing and Tread/Twrite, Linux's
 * include/net/9p/9p.h for the numbers) whose chain is one indirect table (VIRTIO 1.1 section 2.6.5.3) laid out as
 * Linux's net/9p/trans_virtio.c sends a zero-copy request: entry i chains to i + 1; the device-readable entries
 * first, holding the T-message (size[4] type[1] tag[2] fid[4] offset[8] count[4], split over any number of
 * descriptors), then for Twrite the data pages; then the device-writable entries, holding room for the R-message
 * (size[4] type[1] tag[2] count[4]) and, for Tread, the pages the data goes into. Every buffer lies in the first
 * RAM area. The fid is looked up in the caller's table (direct-mapped by fid % slots; the Python side binds a fid
 * when it opens a regular file and unbinds it before the file is closed), the data moves with one
 * preadv/pwritev straight between the file and guest memory, and the R-message header is written after it.
 *
 * The answer is the one the Python server (bhyve_devices/p9/server.py) gives, including how it bounds Tread's
 * count (by the room after the Rread header and by msize - 11), which segments it hands the kernel and that it
 * makes one transfer (a short one is answered as such). Whatever the Python server would answer with Rlerror, or
 * could not be sure to answer the same way, returns VMMSHIM_P9_FALLBACK before anything is read from the file or
 * written to the guest or the file: another message type, a fid not in the table or not open that way, a size
 * below the header, past the readable bytes or past msize, a Twrite count running past its message, an offset
 * past 2^63 - 1, more data segments than IOV_MAX, another table layout, a buffer outside RAM, less room than an
 * Rlerror. A host error from the transfer itself also returns it (nothing moved); Python then makes the call
 * again and answers Rlerror with its errno.
 *
 * The guest is hostile: each descriptor and the header bytes are copied once into locals (a compiler barrier
 * keeps the copy) and checked there; every range is checked against [ram, ram + ram_len) without overflow.
 *
 * Not supported: other 9P messages (Treaddir, Tgetattr... stay in Python), xattr fids, directories, direct
 * chains, a chain over more than one table, buffers in highmem, the 9P2000 and 9P2000.u dialects.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "fastpath.h"

#define F_KNOWN (F_NEXT | F_WRITE)
#define IOV_LIMIT 1024u             /* Linux's UIO_MAXIOV: more segments is EINVAL for Python's call too */
#define MAX_DESCS (IOV_LIMIT + 16u) /* a table it takes: the data segments and a few for the headers */
#define HDR_SIZE 7u                 /* size[4] type[1] tag[2] */
#define TRW_SIZE 23u                /* Tread, and Twrite before its data: + fid[4] offset[8] count[4] */
#define RHDR_SIZE 11u               /* Rread before its data, and all of Rwrite: + count[4] */
#define OFF_TYPE 4u                 /* the header's fields */
#define OFF_TAG 5u
#define OFF_FID 7u
#define OFF_OFFSET 11u
#define OFF_COUNT 19u
#define T_READ 116u
#define T_WRITE 118u
#define R_OF(t) ((t) + 1u)          /* an R-message's type is its T-message's + 1 */
#define ACCESS_READ 1u
#define ACCESS_WRITE 2u
#define OFFSET_MAX ((uint64_t)INT64_MAX)

#define VMMSHIM_P9_FALLBACK (-1)

#define barrier() __asm__ __volatile__("" ::: "memory")

struct vmmshim_p9_fid {
	uint32_t fid;
	int32_t fd;
	uint32_t access;            /* ACCESS_READ | ACCESS_WRITE; 0: an empty slot */
};

struct vmmshim_p9_out {
	uint32_t type;              /* T_READ or T_WRITE, when served */
	uint64_t bytes;             /* data bytes moved */
};



static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

/* the first n bytes of the segments (which hold at least n) into dst */
static void gather(const struct iovec *seg, uint8_t *dst, uint32_t n)
{
	uint32_t done = 0;

	for (; done < n; seg++) {
		size_t k = seg->iov_len < n - done ? seg->iov_len : n - done;

		memcpy(dst + done, seg->iov_base, k);
		done += (uint32_t)k;
	}
}

/* where the first n bytes of the segments (which hold at least n) lie, non-empty pieces only: how many */
static uint32_t head_pieces(const struct iovec *seg, uint32_t n, struct iovec *piece)
{
	uint32_t done = 0, k = 0;

	for (; done < n; seg++) {
		size_t len = seg->iov_len < n - done ? seg->iov_len : n - done;

		if (!len)
			continue;
		piece[k].iov_base = seg->iov_base;
		piece[k++].iov_len = len;
		done += (uint32_t)len;
	}
	return k;
}

/*
 * The segments seg[0..n) after their first skip bytes, cut to want bytes (0 < want <= total - skip), trimmed in
 * place, counted as the Python server's split_segments counts them: the segment that holds byte skip - 1 is left
 * out unless bytes of it remain; empty segments inside the range count; after it, they count only when the range
 * runs to the end (Python then passes the rest uncut). Returns how many, the first at *first.
 */
static uint32_t data_range(struct iovec *seg, uint32_t n, uint64_t skip, uint64_t want, uint64_t total,
			   uint32_t *first)
{
	uint64_t acc = 0, over;
	uint32_t i = 0, j;

	while (acc + seg[i].iov_len < skip)
		acc += seg[i++].iov_len;
	over = acc + seg[i].iov_len - skip;
	if (over == 0) {
		i++;
	} else {
		seg[i].iov_base = (uint8_t *)seg[i].iov_base + (seg[i].iov_len - over);
		seg[i].iov_len = over;
	}
	*first = i;
	if (want == total - skip)
		return n - i;
	acc = 0;
	for (j = i; acc + seg[j].iov_len < want; j++)
		acc += seg[j].iov_len;
	seg[j].iov_len = want - acc;
	return j - i + 1;
}

static ssize_t transfer(int fd, int is_write, const struct iovec *iov, uint32_t n, uint64_t off)
{
	ssize_t r;

	do
		r = is_write ? pwritev(fd, iov, (int)n, (off_t)off) : preadv(fd, iov, (int)n, (off_t)off);
	while (r < 0 && errno == EINTR);
	return r;
}

/*
 * Returns the used length to put in the used ring, with the data moved and the R-message written, or
 * VMMSHIM_P9_FALLBACK with nothing read from the file and nothing written to the guest or the file.
 */
int64_t vmmshim_p9_serve(uint8_t *ram, uint64_t ram_len, uint64_t table, uint32_t tsize, uint32_t msize,
			 const struct vmmshim_p9_fid *fids, uint32_t slots, struct vmmshim_p9_out *out)
{
	struct iovec seg[MAX_DESCS], reply_at[RHDR_SIZE];
	struct vmmshim_p9_fid f;
	struct vq_desc d;
	uint64_t avail = 0, room = 0, offset, want, moved = 0;
	uint32_t i, last, nr = 0, nw, size, type, fid, count, first, nseg, npiece, done;
	uint8_t hdr[TRW_SIZE], reply[RHDR_SIZE];
	uint16_t tag;
	int is_write;

	if (tsize < 2 || tsize > MAX_DESCS || !in_ram(table, (uint64_t)tsize * DESC_SIZE, ram_len))
		return VMMSHIM_P9_FALLBACK;
	if (!slots || slots & (slots - 1) || msize < TRW_SIZE)
		return VMMSHIM_P9_FALLBACK;
	last = tsize - 1;
	for (i = 0; i < tsize; i++) {
		memcpy(&d, ram + table + (uint64_t)i * DESC_SIZE, sizeof(d));
		barrier();
		if (d.flags & ~F_KNOWN || !in_ram(d.addr, d.len, ram_len))
			return VMMSHIM_P9_FALLBACK;
		if (i < last ? !(d.flags & F_NEXT) || d.next != i + 1 : d.flags & F_NEXT)
			return VMMSHIM_P9_FALLBACK;
		if (d.flags & F_WRITE) {
			room += d.len;
		} else {
			if (i != nr)            /* readable after writable */
				return VMMSHIM_P9_FALLBACK;
			avail += d.len;
			nr++;
		}
		seg[i].iov_base = ram + d.addr;
		seg[i].iov_len = d.len;
	}
	nw = tsize - nr;
	if (avail < TRW_SIZE || room < RHDR_SIZE)
		return VMMSHIM_P9_FALLBACK;
	gather(seg, hdr, TRW_SIZE);
	barrier();
	size = le32(hdr);
	type = hdr[OFF_TYPE];
	tag = (uint16_t)(hdr[OFF_TAG] | hdr[OFF_TAG + 1] << 8);
	fid = le32(hdr + OFF_FID);
	offset = (uint64_t)le32(hdr + OFF_OFFSET) | (uint64_t)le32(hdr + OFF_OFFSET + 4) << 32;
	count = le32(hdr + OFF_COUNT);
	if (size < TRW_SIZE || size > avail || size > msize || offset > OFFSET_MAX)
		return VMMSHIM_P9_FALLBACK;
	if (type != T_READ && type != T_WRITE)
		return VMMSHIM_P9_FALLBACK;
	is_write = type == T_WRITE;
	f = fids[fid & (slots - 1)];
	if (f.fid != fid || f.fd < 0 || !(f.access & (is_write ? ACCESS_WRITE : ACCESS_READ)))
		return VMMSHIM_P9_FALLBACK;
	if (is_write) {
		if (count > size - TRW_SIZE)
			return VMMSHIM_P9_FALLBACK;
		want = count;
	} else {
		want = count;
		if (want > room - RHDR_SIZE)
			want = room - RHDR_SIZE;
		if (want > msize - RHDR_SIZE)
			want = msize - RHDR_SIZE;
	}
	npiece = head_pieces(seg + nr, RHDR_SIZE, reply_at);   /* before data_range trims the writable segments */
	if (want) {
		struct iovec *data = is_write ? seg : seg + nr;
		ssize_t r;

		nseg = is_write ? data_range(data, nr, TRW_SIZE, want, avail, &first)
			     : data_range(data, nw, RHDR_SIZE, want, room, &first);
		if (nseg > IOV_LIMIT)
			return VMMSHIM_P9_FALLBACK;
		r = transfer(f.fd, is_write, data + first, nseg, offset);
		if (r < 0)
			return VMMSHIM_P9_FALLBACK;
		moved = (uint64_t)r;
	}
	put_le32(reply, RHDR_SIZE + (is_write ? 0 : (uint32_t)moved));
	reply[OFF_TYPE] = (uint8_t)R_OF(type);
	reply[OFF_TAG] = (uint8_t)tag;
	reply[OFF_TAG + 1] = (uint8_t)(tag >> 8);
	put_le32(reply + HDR_SIZE, (uint32_t)moved);
	for (i = 0, done = 0; i < npiece; done += (uint32_t)reply_at[i++].iov_len)
		memcpy(reply_at[i].iov_base, reply + done, reply_at[i].iov_len);
	out->type = type;
	out->bytes = moved;
	return RHDR_SIZE + (is_write ? 0 : (int64_t)moved);
}


struct vmmshim_p9_totals {
	uint64_t served;
	uint64_t bytes_read;
	uint64_t bytes_written;
};

/*
 * The queue pass: a split virtqueue's available chains (VIRTIO 1.1 section 2.6: the descriptor table, the
 * available ring and the used ring at the guest addresses in q) served one after the other with vmmshim_p9_serve,
 * each put in the used ring (its index stored last, with release order), as the Python device would put it. It
 * stops, leaving the chain for the Python device, at the first chain that is not one INDIRECT descriptor whose
 * table lies in RAM or that vmmshim_p9_serve gives back, at an empty ring, at an avail index more than the queue
 * size ahead (Python reports it), and after max_n chains. With VQ_EVENT_IDX, avail_event is published after each
 * chain, as the Python queue does. Returns the chains served (q->last_avail and q->used_idx moved past them, t
 * counting them), or -1 when the rings are not in RAM or not a queue's (rings_in_ram: nothing done).
 */
int32_t vmmshim_p9_queue(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, uint32_t max_n, uint32_t msize,
			 const struct vmmshim_p9_fid *fids, uint32_t slots, struct vmmshim_p9_totals *t)
{
	struct vmmshim_p9_out out;
	uint32_t n = 0;

	if (!rings_in_ram(q, ram_len))
		return -1;
	while (n < max_n) {
		uint16_t last = (uint16_t)q->last_avail, idx, head;
		struct vq_desc d;
		int64_t len;

		idx = load16(ram + q->avail + 2);
		if (idx == last || (uint16_t)(idx - last) > q->size)
			break;
		memcpy(&head, ram + q->avail + 4 + 2 * (uint64_t)(last % q->size), sizeof(head));
		barrier();
		if (head >= q->size)
			break;
		memcpy(&d, ram + q->desc + (uint64_t)head * DESC_SIZE, sizeof(d));
		barrier();
		if (!(q->flags & VQ_INDIRECT) || d.flags != F_INDIRECT || !d.len || d.len % DESC_SIZE
		    || d.len / DESC_SIZE > MAX_TABLE || !in_ram(d.addr, d.len, ram_len))
			break;
		len = vmmshim_p9_serve(ram, ram_len, d.addr, d.len / DESC_SIZE, msize, fids, slots, &out);
		if (len < 0)
			break;
		put_used(ram, q, (uint16_t)q->used_idx, head, (uint32_t)len);
		q->used_idx = (q->used_idx + 1u) & 0xFFFFu;
		store16(ram + q->used + 2, (uint16_t)q->used_idx);
		q->last_avail = (q->last_avail + 1u) & 0xFFFFu;
		popped(ram, q, (uint16_t)q->last_avail);
		t->served++;
		if (out.type == T_READ)
			t->bytes_read += out.bytes;
		else
			t->bytes_written += out.bytes;
		n++;
	}
	return (int32_t)n;
}
