/*
 * vmmshim's compiled virtio-net data path over a Linux tap with IFF_VNET_HDR (built and loaded by netfast.py;
 * vmmshim's own code).
 *
 * Split virtqueues as VIRTIO 1.1 section 2.6 lays them out; virtio-net's receive and transmit rules of section
 * 5.1.6. The tap carries the virtio-net header with each frame (TUNSETVNETHDRSZ follows the negotiated length), so
 * a frame moves between the tap and guest memory with one readv or writev straight on the guest's buffers.
 *
 * The caller passes the queue as Python's Virtqueue holds it (ring addresses, size, features, last_avail,
 * used_idx) and takes the new indices back. Everything the guest wrote is read once into locals and checked
 * before use: the rings and every buffer lie in [ram, ram + ram_len) with no overflow in addr + len, the avail
 * index is at most size ahead, a head or next index is below its table's size, a chain is no longer than its
 * table. A chain this file does not serve -- a device-writable buffer in a transmit chain or a readable one in a
 * receive chain, an INDIRECT descriptor that is not the head's, a buffer outside the first RAM area, a bad index,
 * more than MAX_SEGS buffers -- stops the batch *before* it is popped (stop = STOP_PYTHON): the device's Python
 * path then takes that chain and answers it as the specification says (an error breaks the queue there).
 *
 * Not handled here: legacy devices without the tap's header, chains in highmem, the packed ring.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "fastpath.h"

#define MAX_SEGS 1024u              /* IOV_MAX on Linux */
#define HDR_NUM_BUFFERS 10u         /* virtio_net_hdr.num_buffers, in the 12-byte header */
#define HDR_MRG_LEN 12u
#define MAX_RETRIES 8u              /* looks again for chains posted while a held frame waited */


enum {
	STOP_EMPTY = 0,             /* transmit: the ring is empty; receive: no buffer posted */
	STOP_PYTHON = 1,            /* the next chain is left for the Python path, not popped */
	STOP_LIMIT = 2,             /* the batch limit was reached */
	STOP_NO_FRAME = 3,          /* receive: the tap has no frame waiting (EAGAIN) */
	STOP_EOF = 4,               /* receive: the tap read 0 or failed: its peer is gone */
	STOP_WAIT = 5,              /* receive: a frame is held until the driver posts more buffers */
};

#define FALLBACK (-1)               /* the rings are not in the first RAM area: nothing done */

struct vmmshim_net_out {
	uint64_t chains;            /* chains put in the used ring */
	uint64_t frames;            /* frames sent or delivered */
	uint64_t bytes;             /* their bytes, without the virtio-net header */
	uint64_t dropped;           /* frames dropped (a tap error, too little buffer space) */
	int32_t stop;               /* why the batch ended: STOP_* */
	int32_t error;              /* errno of the receive's failed read (STOP_EOF), else 0 */
	uint64_t held;              /* receive: the length of the frame held in the spill (with its header), or 0 */
};

/* how many chains wait; with EVENT_IDX an empty ring publishes avail_event and looks again (2.6.7.2) */
static uint32_t pending(uint8_t *ram, const struct vmmshim_vq *q, uint16_t last)
{
	uint16_t idx = load16(ram + q->avail + 2);

	if (idx == last && (q->flags & VQ_EVENT_IDX)) {
		store16(ram + q->used + 4 + 8 * (uint64_t)q->size, last);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		idx = load16(ram + q->avail + 2);
	}
	return (uint16_t)(idx - last);
}

/*
 * The buffers of the chain at head: writable (receive) or readable (transmit) ones only. Returns the number of
 * iovecs (0 is a valid empty chain) with *total their bytes, or -1 when the Python path must take the chain.
 */
static int walk(uint8_t *ram, uint64_t ram_len, const struct vmmshim_vq *q, uint16_t head, int want_write,
		struct iovec *iov, uint64_t *total)
{
	uint64_t table = q->desc;
	uint32_t tsize = q->size, i = head, n = 0;
	int nseg = 0, first = 1;
	struct vq_desc d;

	*total = 0;
	for (;;) {
		memcpy(&d, ram + table + (uint64_t)i * DESC_SIZE, sizeof(d));
		if (d.flags & F_INDIRECT) {
			if (!first || !(q->flags & VQ_INDIRECT) || (d.flags & F_NEXT) || d.len == 0 ||
			    d.len % DESC_SIZE || d.len / DESC_SIZE > MAX_TABLE || !in_ram(d.addr, d.len, ram_len))
				return -1;
			table = d.addr;
			tsize = d.len / DESC_SIZE;
			i = 0;
			first = 0;
			continue;
		}
		first = 0;
		if (++n > tsize)
			return -1;                      /* longer than its table: a loop */
		if (!!(d.flags & F_WRITE) != want_write || !in_ram(d.addr, d.len, ram_len))
			return -1;
		if (d.len) {
			if ((uint32_t)nseg >= MAX_SEGS)
				return -1;
			iov[nseg].iov_base = ram + d.addr;
			iov[nseg].iov_len = d.len;
			nseg++;
			*total += d.len;
		}
		if (!(d.flags & F_NEXT))
			return nseg;
		if (d.next >= tsize)
			return -1;
		i = d.next;
	}
}

/* ---- transmit ---------------------------------------------------------------------------------------------- */
int vmmshim_net_tx(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, int fd, uint32_t hdr_len, uint32_t limit,
		   struct vmmshim_net_out *out)
{
	static __thread struct iovec iov[MAX_SEGS];
	uint16_t last = (uint16_t)q->last_avail, used = (uint16_t)q->used_idx;
	uint64_t total;
	uint32_t waiting;
	int nseg;

	memset(out, 0, sizeof(*out));
	if (!rings_in_ram(q, ram_len))
		return FALLBACK;
	for (;;) {
		uint16_t head;
		ssize_t r;

		if (out->chains >= limit) {
			out->stop = STOP_LIMIT;
			break;
		}
		waiting = pending(ram, q, last);
		if (waiting == 0) {
			out->stop = STOP_EMPTY;
			break;
		}
		if (waiting > q->size) {
			out->stop = STOP_PYTHON;
			break;
		}
		head = load16(ram + q->avail + 4 + 2 * (uint64_t)(last % q->size));
		if (head >= q->size) {
			out->stop = STOP_PYTHON;
			break;
		}
		nseg = walk(ram, ram_len, q, head, 0, iov, &total);
		if (nseg < 0) {
			out->stop = STOP_PYTHON;
			break;
		}
		last++;
		popped(ram, q, last);
		if (total < hdr_len) {
			out->dropped++;
		} else {
			do
				r = writev(fd, iov, nseg);
			while (r < 0 && errno == EINTR);
			if (r < 0 && errno != EAGAIN) {
				out->dropped++;         /* the tap refused it (a malformed GSO header: EINVAL) */
			} else {
				out->frames++;          /* EAGAIN: the tap's queue is full, the frame is lost on the wire */
				out->bytes += total - hdr_len;
			}
		}
		put_used(ram, q, used, head, 0);
		used++;
		store16(ram + q->used + 2, used);
		out->chains++;
	}
	q->last_avail = last;
	q->used_idx = used;
	return 0;
}

/* ---- receive ----------------------------------------------------------------------------------------------- */
/* writes len bytes at offset off of the buffers iov[0..n) */
static void scatter_at(struct iovec *iov, int n, uint64_t off, const uint8_t *src, uint64_t len)
{
	for (int k = 0; k < n && len; k++) {
		uint64_t l = iov[k].iov_len;

		if (off >= l) {
			off -= l;
			continue;
		}
		uint64_t c = l - off < len ? l - off : len;

		memcpy((uint8_t *)iov[k].iov_base + off, src, c);
		src += c;
		len -= c;
		off = 0;
	}
}

/* reads len bytes at offset 0 of the buffers iov[0..n) into dst */
static void gather(const struct iovec *iov, int n, uint8_t *dst, uint64_t len)
{
	for (int k = 0; k < n && len; k++) {
		uint64_t c = iov[k].iov_len < len ? iov[k].iov_len : len;

		memcpy(dst, iov[k].iov_base, c);
		dst += c;
		len -= c;
	}
}

/*
 * With EVENT_IDX, avail_event becomes the avail index now, so the driver's next chain notifies: the device waits
 * for more chains than are posted (a frame held for mergeable buffers). Returns whether chains came meanwhile.
 */
static int ask_for_more(uint8_t *ram, const struct vmmshim_vq *q, uint16_t seen)
{
	uint16_t idx;

	if (!(q->flags & VQ_EVENT_IDX))
		return 0;
	store16(ram + q->used + 4 + 8 * (uint64_t)q->size, seen);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	idx = load16(ram + q->avail + 2);
	return idx != seen;
}

struct rx_state {
	uint8_t *ram;
	uint64_t ram_len;
	const struct vmmshim_vq *q;
	uint16_t last;              /* the next chain to look at */
	uint32_t n;                 /* chains the frame fills so far */
	uint16_t heads[MAX_TABLE];
	uint32_t lens[MAX_TABLE];
	struct iovec first[MAX_SEGS + 1];   /* the first chain's buffers (then, for a read, the spill) */
	int nfirst;
	struct iovec more[MAX_SEGS];        /* the buffers of a further chain */
	int nmore;
};

/*
 * Takes the chain at st->last for the frame: 1 taken (its buffers in first[] for the frame's first chain, else
 * in more[] with *cap their room), 0 none posted, -1 a chain for the Python path.
 */
static int take(struct rx_state *st, uint64_t *cap)
{
	const struct vmmshim_vq *q = st->q;
	uint32_t w = pending(st->ram, q, st->last);
	uint16_t head;
	int k;

	if (w == 0)
		return 0;
	if (w > q->size || st->n >= MAX_TABLE)
		return -1;
	head = load16(st->ram + q->avail + 4 + 2 * (uint64_t)(st->last % q->size));
	if (head >= q->size)
		return -1;
	k = walk(st->ram, st->ram_len, q, head, 1, st->n ? st->more : st->first, cap);
	if (k < 0)
		return -1;
	if (st->n == 0)
		st->nfirst = k;
	else
		st->nmore = k;
	popped(st->ram, q, (uint16_t)(st->last + 1));   /* as the Python queue's pop, also if it goes back */
	st->heads[st->n++] = head;
	st->last++;
	return 1;
}

/*
 * The rest of a frame, src[0..len), into further chains (MRG_RXBUF): 1 placed, 0 too few chains posted, -1 a
 * chain for the Python path.
 */
static int continue_frame(struct rx_state *st, const uint8_t *src, uint64_t len)
{
	while (len > 0) {
		uint64_t cap, c;
		int r = take(st, &cap);

		if (r <= 0)
			return r;
		c = cap < len ? cap : len;
		scatter_at(st->more, st->nmore, 0, src, c);
		st->lens[st->n - 1] = (uint32_t)c;
		src += c;
		len -= c;
	}
	return 1;
}

/* the frame's chains into the used ring, num_buffers in its header (the 12-byte one) */
static void commit(struct rx_state *st, uint16_t *used, uint32_t hdr_len)
{
	if (hdr_len == HDR_MRG_LEN) {
		uint16_t nb = (uint16_t)st->n;

		scatter_at(st->first, st->nfirst, HDR_NUM_BUFFERS, (const uint8_t *)&nb, 2);
	}
	for (uint32_t k = 0; k < st->n; k++) {
		put_used(st->ram, st->q, *used, st->heads[k], st->lens[k]);
		(*used)++;
	}
	store16(st->ram + st->q->used + 2, *used);
}

static __thread struct rx_state rx_st;

int vmmshim_net_rx(uint8_t *ram, uint64_t ram_len, struct vmmshim_vq *q, int fd, uint32_t hdr_len, int mrg,
		   uint8_t *spill, uint64_t spill_len, uint64_t held, uint32_t limit, struct vmmshim_net_out *out)
{
	struct rx_state *st = &rx_st;
	uint16_t used = (uint16_t)q->used_idx;
	uint32_t retries = 0;               /* looks again after asking for more chains, at most MAX_RETRIES */

	memset(out, 0, sizeof(*out));
	if (!rings_in_ram(q, ram_len) || held > spill_len)
		return FALLBACK;
	st->ram = ram;
	st->ram_len = ram_len;
	st->q = q;
	st->last = (uint16_t)q->last_avail;
	for (;;) {
		uint16_t start = st->last, seen = load16(ram + q->avail + 2);
		uint64_t room;
		ssize_t got;
		int r;

		if (out->frames + out->dropped >= limit) {
			out->stop = STOP_LIMIT;
			break;
		}
		st->n = 0;
		if (held) {
			/* a frame held for want of buffers goes first, whole, from the spill */
			r = take(st, &room);
			if (r == 1 && room < hdr_len)
				r = -1;
			if (r == 1) {
				uint64_t c = room < held ? room : held;

				scatter_at(st->first, st->nfirst, 0, spill, c);
				st->lens[0] = (uint32_t)c;
				r = c == held ? 1 : mrg ? continue_frame(st, spill + c, held - c) : -1;
			}
			if (r == 1) {
				commit(st, &used, hdr_len);
				out->chains += st->n;
				out->frames++;
				out->bytes += held - hdr_len;
				held = 0;
				continue;
			}
			st->last = start;
			if (r == 0 && ask_for_more(ram, q, seen) && retries++ < MAX_RETRIES)
				continue;
			out->stop = r == 0 ? STOP_WAIT : STOP_PYTHON;
			break;
		}
		r = take(st, &room);
		if (r <= 0 || room < hdr_len) {
			st->last = start;
			out->stop = r == 0 ? STOP_EMPTY : STOP_PYTHON;
			break;
		}
		st->first[st->nfirst].iov_base = spill;
		st->first[st->nfirst].iov_len = spill_len;
		do
			got = readv(fd, st->first, st->nfirst + 1);
		while (got < 0 && errno == EINTR);
		if (got < 0 && errno == EAGAIN) {
			st->last = start;
			out->stop = STOP_NO_FRAME;
			break;
		}
		if (got <= 0) {
			st->last = start;
			out->stop = STOP_EOF;
			out->error = got < 0 ? errno : 0;
			break;
		}
		if ((uint64_t)got < hdr_len) {
			st->last = start;
			out->dropped++;                 /* not even a header: the chain stays posted */
			continue;
		}
		if ((uint64_t)got <= room) {
			st->lens[0] = (uint32_t)got;
		} else if (!mrg) {
			st->last = start;               /* larger than a buffer, as a NIC without mergeable buffers */
			out->dropped++;
			continue;
		} else {
			st->lens[0] = (uint32_t)room;
			r = continue_frame(st, spill, (uint64_t)got - room);
			if (r != 1) {
				/* too few chains posted (or one for Python): the frame is held, whole, in the spill, and
				   its chains go back */
				memmove(spill + room, spill, (uint64_t)got - room);
				gather(st->first, st->nfirst, spill, room);
				held = (uint64_t)got;
				st->last = start;
				if (r == 0 && ask_for_more(ram, q, seen) && retries++ < MAX_RETRIES)
					continue;
				out->stop = r == 0 ? STOP_WAIT : STOP_PYTHON;
				break;
			}
		}
		commit(st, &used, hdr_len);
		out->chains += st->n;
		out->frames++;
		out->bytes += (uint64_t)got - hdr_len;
	}
	q->last_avail = st->last;
	q->used_idx = used;
	out->held = held;
	return 0;
}
