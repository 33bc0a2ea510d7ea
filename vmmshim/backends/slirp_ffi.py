"""cffi declarations (ABI mode) of the part of libslirp 4.x (``libslirp.h``) the slirp backend uses, and the
library's loading.

Declared: ``SlirpCb`` and ``SlirpConfig`` (up to the version-4 fields, so the layout is the whole struct of
libslirp 4.7; the backend fills in version 1 only, which every libslirp 4.x takes), ``slirp_new``,
``slirp_cleanup``, ``slirp_input``, ``slirp_pollfds_fill``/``slirp_pollfds_poll``, ``slirp_add_hostfwd``,
``slirp_connection_info`` and ``slirp_version_string``; ``g_free`` from GLib (libslirp's strings are GLib's). The
text was written from ``libslirp.h``'s field list; ``struct in6_addr`` is declared as four ``uint32_t`` (16
bytes, aligned 4, as glibc's and NetBSD's unions), and ``tests/unit/test_net_slirp.py`` pins the offsets and sizes
measured with gcc against Debian's ``libslirp-dev`` 4.7 on x86-64 (the same LP64 layout as NetBSD/amd64).

:func:`load` dlopens ``libslirp.so.0`` (the soname of Debian's ``libslirp0`` and pkgsrc's ``net/libslirp``; on
NetBSD also ``/usr/pkg/lib``) once; a missing library is an ``OSError`` whose one-line ``strerror`` names the
packages.

Not supported: the guestfwd/exec/unix forwards, IPv6 host forwards (``slirp_add_hostxfwd``), state save and
load, ``timer_new_opaque``/``init_completed`` (version-4 callbacks; left NULL).
"""

import errno
import threading

from cffi import FFI

CDEF = """
typedef struct Slirp Slirp;
struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };

typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(int id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    void *outbound_addr;
    void *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
char *slirp_connection_info(Slirp *slirp);
const char *slirp_version_string(void);
"""

GLIB_CDEF = "void g_free(void *mem);"

#: ``SlirpConfig.version`` the backend fills in (the fields of version 1 are all it sets).
CONFIG_VERSION = 1
#: ``SLIRP_POLL_*``
POLL_IN, POLL_OUT, POLL_PRI, POLL_ERR, POLL_HUP = 1, 2, 4, 8, 16
#: The ``timeout`` ``slirp_pollfds_fill`` leaves when nothing is due.
TIMEOUT_INFINITE = 0xFFFFFFFF
LIBNAMES = ("libslirp.so.0", "/usr/pkg/lib/libslirp.so.0")
GLIB_LIBNAMES = ("libglib-2.0.so.0", "/usr/pkg/lib/libglib-2.0.so.0")
MISSING = "libslirp.so.0 not found: install libslirp0 (Debian) or net/libslirp (pkgsrc)"

ffi = FFI()
ffi.cdef(CDEF)
ffi.cdef(GLIB_CDEF)

_lock = threading.Lock()
_loaded = {}


def _dlopen(names):
    last = None
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError as exc:
            last = exc
    raise last


def load():
    """``(lib, glib)``: libslirp (every declared function resolved) and GLib for ``g_free`` (None if it cannot be
    opened: the strings are then left unfreed). Raises ``OSError`` (ENOENT, :data:`MISSING`)."""
    with _lock:
        if "lib" not in _loaded:
            try:
                lib = _dlopen(LIBNAMES)
                for fn in ("slirp_new", "slirp_cleanup", "slirp_input", "slirp_pollfds_fill", "slirp_pollfds_poll",
                           "slirp_add_hostfwd", "slirp_connection_info", "slirp_version_string"):
                    getattr(lib, fn)
            except (OSError, AttributeError):
                raise OSError(errno.ENOENT, MISSING) from None
            try:
                glib = _dlopen(GLIB_LIBNAMES)
                glib.g_free
            except (OSError, AttributeError):
                glib = None
            _loaded.update(lib=lib, glib=glib)
        return _loaded["lib"], _loaded["glib"]


def version():
    """libslirp's version string (``"4.7.0"``); loads the library."""
    lib, _ = load()
    return ffi.string(lib.slirp_version_string()).decode()


def take_string(glib, p):
    """A GLib-allocated ``char *`` as ``str``, then freed."""
    if p == ffi.NULL:
        return ""
    try:
        return ffi.string(p).decode(errors="replace")
    finally:
        if glib is not None:
            glib.g_free(p)
