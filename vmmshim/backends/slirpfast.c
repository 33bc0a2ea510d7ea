/*
 * vmmshim's compiled libslirp loop (built and loaded by slirp_fast.py; vmmshim's own code).
 *
 * The slirp backend's thread runs vmmshim_slirp_loop with Python's GIL released: it reads the guest's frames from
 * one end of a SOCK_SEQPACKET socketpair (the device writes them there with the tap's compiled path, netfast.c),
 * completes their checksums and hands them to slirp_input; it runs libslirp's poll cycle (slirp_pollfds_fill, poll,
 * slirp_pollfds_poll) and its timers; and libslirp's send_packet writes each frame for the guest, a virtio-net
 * header first, to another socketpair that the device reads as it reads a tap. Every libslirp callback is here,
 * so no frame and no poll costs Python anything.
 *
 * A frame from the guest (VIRTIO 1.1 5.1.6.2): NEEDS_CSUM is completed (RFC 1071 sum from csum_start, stored at
 * csum_start + csum_offset); a TCP GSO frame (TCPV4/TCPV6) goes to slirp_input whole, as one IP packet (libslirp
 * takes any length up to 64 KiB), when its IP length field describes the frame, as Linux writes it. A header that
 * points outside the frame, another GSO type, or a GSO frame whose lengths disagree is dropped and counted.
 *
 * The device's receive thread is woken once a round, not once a frame: a round that wrote frames for the guest
 * writes rx_signal_fd (an eventfd) before the loop blocks again, so a window's worth of segments that libslirp sends
 * in one go reaches the guest as one batch and one interrupt, instead of the first frame waking the device while
 * the rest are still being written (each wake-up a pass of the device's Python, each pass an interrupt).
 *
 * Bounds: the socketpairs' buffers. A frame for the guest that does not fit is dropped (rx_dropped; TCP resends
 * it), and the device's writes block (up to its send timeout) while this loop has not read the frames before.
 *
 * Not supported: segmenting a GSO frame in software (the Python backend does, vmmshim/backends/offload.py),
 * receive coalescing, more than MAX_FDS sockets polled at once (the others wait a round), MAX_TIMERS timers.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_FDS 512
#define MAX_TIMERS 16
#define FRAME_MAX (65536 + 64)
#define TX_BATCH 64                 /* guest frames taken per round before polling libslirp's sockets again */
#define HDR_MAX 12
#define F_NEEDS_CSUM 1u
#define F_DATA_VALID 2u
#define GSO_NONE 0u
#define GSO_TCPV4 1u
#define GSO_TCPV6 4u
#define GSO_ECN 0x80u
#define ETH_HLEN 14u
#define ETH_P_IP 0x0800u
#define ETH_P_IPV6 0x86DDu
#define ETH_P_8021Q 0x8100u
#define IPPROTO_TCP_ 6u
#define IPV6_HLEN 40u
#define TIMEOUT_INFINITE 0xFFFFFFFFu
/* libslirp's SLIRP_POLL_* bits */
#define S_IN 1
#define S_OUT 2
#define S_PRI 4
#define S_ERR 8
#define S_HUP 16

typedef void (*timer_cb)(void *opaque);

struct vmmshim_slirp_timer {
	timer_cb cb;
	void *cb_opaque;
	int64_t expire_ms;          /* -1: not armed */
	int used;
};

struct vmmshim_slirp {
	/* set by Python before the loop starts */
	void *slirp;
	void (*input)(void *slirp, const uint8_t *pkt, int len);
	void (*pollfds_fill)(void *slirp, uint32_t *timeout, int (*add_poll)(int, int, void *), void *opaque);
	void (*pollfds_poll)(void *slirp, int select_error, int (*get_revents)(int, void *), void *opaque);
	int32_t tx_fd;              /* the guest's frames (non-blocking) */
	int32_t rx_fd;              /* frames for the guest (non-blocking) */
	int32_t wake_fd;            /* read end of the wake pipe (non-blocking) */
	uint32_t hdr_len;           /* the virtio-net header's length (10 or 12); Python changes it */
	uint32_t guest_csum;        /* the driver accepted GUEST_CSUM: frames for it are marked DATA_VALID */
	uint32_t stop;              /* Python: end the loop */
	int32_t rx_signal_fd;       /* an eventfd written once a round that wrote frames for the guest, or -1 */
	uint32_t rx_written;        /* the loop's: a frame was written since the last signal */
	/* counters, read by Python */
	uint64_t tx_frames, tx_dropped, rx_frames, rx_dropped, guest_errors, polls;
	char last_error[256];
	/* the loop's own */
	struct pollfd pfd[MAX_FDS];
	int32_t npfd;
	struct vmmshim_slirp_timer timers[MAX_TIMERS];
	uint8_t buf[FRAME_MAX];
};

static int64_t clock_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

/* ---- libslirp's callbacks (opaque: the struct vmmshim_slirp) -------------------------------------------------- */
ssize_t vmmshim_slirp_send_packet(const void *buf, size_t len, void *opaque)
{
	struct vmmshim_slirp *s = opaque;
	uint8_t hdr[HDR_MAX];
	struct iovec iov[2];
	struct msghdr msg;
	uint32_t hl = __atomic_load_n(&s->hdr_len, __ATOMIC_RELAXED);

	if (hl > HDR_MAX)
		hl = HDR_MAX;
	memset(hdr, 0, sizeof(hdr));
	if (__atomic_load_n(&s->guest_csum, __ATOMIC_RELAXED))
		hdr[0] = F_DATA_VALID;      /* libslirp's checksums are complete */
	iov[0].iov_base = hdr;
	iov[0].iov_len = hl;
	iov[1].iov_base = (void *)buf;
	iov[1].iov_len = len;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = iov;
	msg.msg_iovlen = 2;
	if (sendmsg(s->rx_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
		s->rx_dropped++;            /* the guest's side is full: lost on the wire, TCP resends it */
	} else {
		s->rx_frames++;
		s->rx_written = 1;
	}
	return (ssize_t)len;
}

void vmmshim_slirp_guest_error(const char *msg, void *opaque)
{
	struct vmmshim_slirp *s = opaque;

	s->guest_errors++;
	strncpy(s->last_error, msg, sizeof(s->last_error) - 1);
	s->last_error[sizeof(s->last_error) - 1] = 0;
}

int64_t vmmshim_slirp_clock_get_ns(void *opaque)
{
	(void)opaque;
	return clock_ns();
}

void *vmmshim_slirp_timer_new(timer_cb cb, void *cb_opaque, void *opaque)
{
	struct vmmshim_slirp *s = opaque;
	int i;

	for (i = 0; i < MAX_TIMERS; i++) {
		if (!s->timers[i].used) {
			s->timers[i].used = 1;
			s->timers[i].cb = cb;
			s->timers[i].cb_opaque = cb_opaque;
			s->timers[i].expire_ms = -1;
			return &s->timers[i];
		}
	}
	return NULL;                    /* libslirp then never arms it */
}

void vmmshim_slirp_timer_free(void *timer, void *opaque)
{
	(void)opaque;
	if (timer)
		((struct vmmshim_slirp_timer *)timer)->used = 0;
}

void vmmshim_slirp_timer_mod(void *timer, int64_t expire_ms, void *opaque)
{
	(void)opaque;
	if (timer)
		((struct vmmshim_slirp_timer *)timer)->expire_ms = expire_ms;
}

void vmmshim_slirp_poll_fd(int fd, void *opaque)
{
	(void)fd;
	(void)opaque;                   /* MSG_NOSIGNAL and Python's ignored SIGPIPE: nothing to set */
}

void vmmshim_slirp_notify(void *opaque)
{
	(void)opaque;                   /* the loop polls again after every call into libslirp */
}

/* poll(2)'s bits and libslirp's SLIRP_POLL_* for them */
static const struct {
	short poll;
	int slirp;
} POLL_BITS[] = {
	{ POLLIN, S_IN }, { POLLOUT, S_OUT }, { POLLPRI, S_PRI }, { POLLERR, S_ERR }, { POLLNVAL, S_ERR },
	{ POLLHUP, S_HUP },
};
#define N_POLL_BITS (sizeof(POLL_BITS) / sizeof(POLL_BITS[0]))

static int add_poll(int fd, int events, void *opaque)
{
	struct vmmshim_slirp *s = opaque;
	short ev = 0;
	size_t i;

	if (s->npfd >= MAX_FDS)
		return -1;                  /* not polled this round */
	for (i = 0; i < N_POLL_BITS; i++)
		if (events & POLL_BITS[i].slirp && POLL_BITS[i].slirp != S_ERR && POLL_BITS[i].slirp != S_HUP)
			ev |= POLL_BITS[i].poll;
	s->pfd[s->npfd].fd = fd;
	s->pfd[s->npfd].events = ev;
	s->pfd[s->npfd].revents = 0;
	return s->npfd++;
}

static int get_revents(int idx, void *opaque)
{
	struct vmmshim_slirp *s = opaque;
	int out = 0;
	size_t i;

	if (idx < 0 || idx >= s->npfd)
		return 0;
	for (i = 0; i < N_POLL_BITS; i++)
		if (s->pfd[idx].revents & POLL_BITS[i].poll)
			out |= POLL_BITS[i].slirp;
	return out;
}

/* ---- the guest's frames ---------------------------------------------------------------------------------------- */
static uint32_t ones_sum(const uint8_t *p, size_t n)
{
	uint64_t sum = 0;
	size_t i;

	for (i = 0; i + 1 < n; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (uint32_t)sum;
}

/* whether a TCP GSO frame's IP length field describes the whole frame (Linux writes it so up to 64 KiB) */
static int gso_whole(const uint8_t *f, size_t n, uint32_t gso)
{
	size_t l3 = ETH_HLEN;
	uint16_t type;

	if (n < ETH_HLEN)
		return 0;
	type = get16(f + 12);
	if (type == ETH_P_8021Q && n >= ETH_HLEN + 4) {
		type = get16(f + 16);
		l3 += 4;
	}
	if (gso == GSO_TCPV4 && type == ETH_P_IP && n >= l3 + 20)
		return f[l3] >> 4 == 4 && f[l3 + 9] == IPPROTO_TCP_ && get16(f + l3 + 2) == n - l3;
	if (gso == GSO_TCPV6 && type == ETH_P_IPV6 && n >= l3 + IPV6_HLEN)
		return f[l3] >> 4 == 6 && f[l3 + 6] == IPPROTO_TCP_ && get16(f + l3 + 4) == n - l3 - IPV6_HLEN;
	return 0;
}

/* one frame read from tx_fd (the header first): 1 handed to libslirp, 0 dropped */
static int guest_frame(struct vmmshim_slirp *s, uint8_t *b, size_t n, uint32_t hl)
{
	uint8_t *f = b + hl;
	size_t fl, at;
	uint32_t flags, gso, start, off, sum;

	if (n < hl + ETH_HLEN || hl < 10)
		return 0;
	fl = n - hl;
	flags = b[0];
	gso = b[1] & ~GSO_ECN;
	start = (uint32_t)b[6] | (uint32_t)b[7] << 8;
	off = (uint32_t)b[8] | (uint32_t)b[9] << 8;
	if (gso != GSO_NONE && !((gso == GSO_TCPV4 || gso == GSO_TCPV6) && gso_whole(f, fl, gso)))
		return 0;
	if (flags & F_NEEDS_CSUM) {
		at = (size_t)start + off;
		if (at + 2 > fl || start >= fl)
			return 0;
		sum = ones_sum(f + start, fl - start);
		sum = ~sum & 0xFFFF;
		if (!sum)
			sum = 0xFFFF;
		f[at] = (uint8_t)(sum >> 8);
		f[at + 1] = (uint8_t)sum;
	}
	s->input(s->slirp, f, (int)fl);
	return 1;
}

static void take_guest_frames(struct vmmshim_slirp *s)
{
	int i;

	for (i = 0; i < TX_BATCH; i++) {
		ssize_t n = recv(s->tx_fd, s->buf, sizeof(s->buf), MSG_DONTWAIT | MSG_TRUNC);
		uint32_t hl = __atomic_load_n(&s->hdr_len, __ATOMIC_RELAXED);

		if (n <= 0)
			return;
		if ((size_t)n > sizeof(s->buf) || !guest_frame(s, s->buf, (size_t)n, hl))
			s->tx_dropped++;
		else
			s->tx_frames++;
	}
}

static void fire_timers(struct vmmshim_slirp *s, int64_t now_ms)
{
	int i;

	for (i = 0; i < MAX_TIMERS; i++) {
		struct vmmshim_slirp_timer *t = &s->timers[i];

		if (t->used && t->expire_ms >= 0 && t->expire_ms <= now_ms) {
			t->expire_ms = -1;
			t->cb(t->cb_opaque);
		}
	}
}

static int poll_timeout(struct vmmshim_slirp *s, uint32_t slirp_ms, int64_t now_ms)
{
	int64_t ms = slirp_ms == TIMEOUT_INFINITE ? -1 : (int64_t)slirp_ms;
	int i;

	for (i = 0; i < MAX_TIMERS; i++) {
		const struct vmmshim_slirp_timer *t = &s->timers[i];

		if (t->used && t->expire_ms >= 0) {
			int64_t left = t->expire_ms > now_ms ? t->expire_ms - now_ms : 0;

			if (ms < 0 || left < ms)
				ms = left;
		}
	}
	return ms > 1000000 ? 1000000 : (int)ms;
}

/* before the loop blocks: the frames this round wrote for the guest are announced once, as one burst */
static void signal_rx(struct vmmshim_slirp *s)
{
	uint64_t one = 1;

	if (!s->rx_written || s->rx_signal_fd < 0)
		return;
	s->rx_written = 0;
	if (write(s->rx_signal_fd, &one, sizeof(one)) < 0)
		s->rx_written = 1;          /* EAGAIN: the counter is full, the device has a wake-up waiting anyway */
}

/* The backend's thread: until stop is set (and the wake pipe written). Returns 0, or an errno of poll. */
int vmmshim_slirp_loop(struct vmmshim_slirp *s)
{
	uint8_t drain[256];

	while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
		uint32_t timeout = TIMEOUT_INFINITE;
		int r, err = 0, wake_idx;

		take_guest_frames(s);
		fire_timers(s, clock_ns() / 1000000);
		s->npfd = 0;
		add_poll(s->tx_fd, S_IN, s);
		wake_idx = add_poll(s->wake_fd, S_IN, s);
		s->pollfds_fill(s->slirp, &timeout, add_poll, s);
		signal_rx(s);
		r = poll(s->pfd, (nfds_t)s->npfd, poll_timeout(s, timeout, clock_ns() / 1000000));
		if (r < 0) {
			if (errno != EINTR)
				return errno;
			err = 1;
			for (r = 0; r < s->npfd; r++)
				s->pfd[r].revents = 0;
		}
		s->polls++;
		s->pollfds_poll(s->slirp, err, get_revents, s);
		if (s->pfd[wake_idx].revents & POLLIN)
			while (read(s->wake_fd, drain, sizeof(drain)) > 0)
				;
	}
	return 0;
}
