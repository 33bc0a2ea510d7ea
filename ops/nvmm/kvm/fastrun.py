"""The compiled KVM run loop (``fastrun.c``): built once with the host's C compiler, loaded with cffi in ABI mode.

It runs ``KVM_RUN`` again after each one-byte port read whose value the VM published (``Machine.answer_io``),
without coming back to Python (in the nested lab a kernel console's LSR read per character, each one an exit
handled in Python, was most of a boot's user-space time: docs/lab.md, "Timings measured"), and it serves the
guest's IA32_TSC_DEADLINE writes (``tscdeadline.py``), answers the MMIO reads the VM published
(``Machine.answer_mmio``: an AHCI interrupt handler's status registers), injects the interrupt posted for the
interrupt window (``intwin.py``), sleeps in a guest's HLT until a kick posts one (``fasthalt.c``) and posts the
guest's TSC-deadline ticks from a thread of its own (``fasttick.c``). The C files
need only libc (the kvm_run offsets come from ``layouts.py``), so a C compiler and libc's headers are all it takes
(``gcc``, ``libc6-dev``).

The library is built and cached by ``ops/native.py`` (by the hash of its source, under ``$VMMSHIM_CACHE``).
:func:`load` returns ``None`` (and :func:`unavailable` says why) when it cannot be built: the provider then
publishes nothing and every port read exits to Python as before. ``VMMSHIM_FASTRUN=0`` turns it off.

Not supported: other compilers than ``$CC`` (default ``cc``), hosts where cffi cannot ``dlopen``.
"""

import pathlib
import threading

from ... import native

SOURCE = tuple(pathlib.Path(__file__).with_name(n) for n in ("fastrun.c", "fasthalt.c", "fasttick.c",
                                                                            "fastrun.h"))
ENV_OFF = "VMMSHIM_FASTRUN"
MMIO_PAGES, MMIO_PAGE_SHIFT, MMIO_SLOTS = 16, 12, 1024     # fastrun.h's (tests/unit/test_fastrun.py checks)
CDEF = """
struct vmmshim_run_layout {
    unsigned long kvm_run;
    uint32_t reason_off;
    uint32_t io_off;
    uint32_t exit_io;
    uint32_t io_in;
    uint64_t data_off;
    uint64_t run_size;
    uint32_t timing;
    uint32_t exit_mmio;
};
struct vmmshim_mmio_page {
    uint64_t gpa;
    uint64_t values;
};
struct vmmshim_mmio_answers {
    uint32_t npages;
    uint32_t pad;
    struct vmmshim_mmio_page pages[MMIO_PAGES];
};
struct vmmshim_run_stats {
    uint64_t answered;
    uint64_t ns_in_run;
    uint64_t ns_last_return;
    uint64_t answered_mmio;
};
struct vmmshim_tscdl {
    uint32_t enabled;
    uint32_t msr_off;
    uint32_t exit_wrmsr;
    int32_t timerfd;
    unsigned long get_msrs;
    uint64_t tsc_hz;
    uint64_t value;
    uint64_t due_ns;
    uint64_t served;
};
struct vmmshim_intwin {
    uint32_t state;
    uint32_t hard;
    uint64_t pv_eoi;
    unsigned long kvm_interrupt;
    uint32_t exit_window;
    uint32_t window_off;
    uint32_t ready_off;
    uint32_t cr8_off;
    uint32_t result;
    uint32_t kicks_posted;
    uint32_t kicks_seen;
    uint32_t pad;
    uint64_t served;
    uint64_t served_kicks;
    uint32_t exit_hlt;
    uint32_t halt;
    int32_t wake_fd;
    uint32_t sleeping;
    uint32_t ring_off;
    int32_t idle_fd;
    uint32_t slept_out;
    uint32_t cr8_seen;
    uint64_t waketimer;
    uint64_t halts;
    uint64_t halt_wakes;
    uint32_t solo;
    uint32_t eoi_armed;
    uint32_t pad2;
    uint64_t tick;
};
struct vmmshim_tick {
    uint32_t plan;
    int32_t tid;
    int32_t sig;
    int32_t notify_fd;
    uint64_t run;
    uint64_t dl;
    uint64_t win;
    uint32_t fired;
    uint32_t fold_state;
    uint32_t fold_result;
    uint32_t folds;
    uint64_t posted;
    uint64_t handed;
};
struct vmmshim_waketimer {
    int32_t tfd;
    uint32_t armed;
    uint64_t period_ns;
};
int vmmshim_kvm_run(int fd, uint8_t *run, const struct vmmshim_run_layout *lay, const int16_t *answers,
                    const struct vmmshim_mmio_answers *mmio, struct vmmshim_run_stats *stats,
                    struct vmmshim_tscdl *tscdl, struct vmmshim_intwin *intwin);
int vmmshim_intwin_kick(struct vmmshim_intwin *w, uint32_t post);
uint32_t vmmshim_intwin_take_over(struct vmmshim_intwin *w);
int vmmshim_intwin_release(struct vmmshim_intwin *w, uint32_t post);
int vmmshim_intwin_again(struct vmmshim_intwin *w, uint32_t vector, uint32_t first, uint32_t flags);
void vmmshim_intwin_wake(struct vmmshim_intwin *w);
int vmmshim_waketimer_arm(struct vmmshim_waketimer *t);
int vmmshim_waketimer_off(struct vmmshim_waketimer *t);
int vmmshim_tscdl_open(void);
int vmmshim_tscdl_arm(int vcpu_fd, struct vmmshim_tscdl *d, uint64_t value);
int vmmshim_tscdl_set(struct vmmshim_tscdl *d, uint64_t value, uint64_t due_ns);
int vmmshim_tscdl_expire(struct vmmshim_tscdl *d);
int vmmshim_ticker_add(struct vmmshim_tick *t);
int vmmshim_ticker_remove(struct vmmshim_tick *t);
uint32_t vmmshim_tick_take_fired(struct vmmshim_tick *t);
void vmmshim_ticker_pause(int on);
""".replace("MMIO_PAGES", str(MMIO_PAGES))
NO_ANSWER = -1
PORTS = 0x10000
MMIO_REG = 4                    # bytes of one published MMIO register
#: vCPUs created while this is True keep the loop's clock counters (``bench/exit_profile.py`` sets it).
TIMING = False

_library = native.LazyLibrary(SOURCE, "fastrun", CDEF, env_off=ENV_OFF)


def load():
    """``(ffi, lib)`` of the compiled loop, or ``None`` when it cannot be had (see :func:`unavailable`)."""
    return _library.get()


def unavailable():
    """Why :func:`load` returned ``None`` (``None`` when it did not)."""
    load()
    return _library.why


class Answers:
    """One VM's published port reads: a table of ``PORTS`` 16-bit cells, -1 where a read exits. Written from
    any thread (a cell at a time, under the GIL); the vCPUs' compiled loops read it with atomic loads."""

    def __init__(self, ffi):
        self.table = ffi.new("int16_t[]", PORTS)
        ffi.memmove(self.table, b"\xff" * (2 * PORTS), 2 * PORTS)
        self.count = 0              # ports published now: the vCPUs take the compiled loop while non-zero
        self._lock = threading.Lock()

    def set(self, port, value):
        with self._lock:
            old = self.table[port]
            self.table[port] = NO_ANSWER if value is None else value & 0xFF
            self.count += (value is not None) - (old != NO_ANSWER)


class MmioAnswers:
    """One VM's published MMIO reads (``struct vmmshim_mmio_answers``): up to ``MMIO_PAGES`` pages of 4 KiB, each
    the values of its aligned 32-bit registers (-1 where a read exits). A page is filled before it is counted and
    never taken back, so the vCPUs' compiled loops read it without a lock."""

    def __init__(self, ffi):
        self.ffi = ffi
        self.struct = ffi.new("struct vmmshim_mmio_answers *")
        self._values = {}           # page gpa -> its int64_t[MMIO_SLOTS] (kept alive as long as the VM)
        self.count = 0              # registers published now: the vCPUs take the compiled loop while non-zero
        self._lock = threading.Lock()

    def set(self, gpa, value):
        """Publishes ``value`` for the register at ``gpa`` (None withdraws it); False when no page is left."""
        page = gpa >> MMIO_PAGE_SHIFT << MMIO_PAGE_SHIFT
        with self._lock:
            values = self._values.get(page)
            if values is None:
                if value is None:
                    return True
                n = self.struct.npages
                if n >= MMIO_PAGES:
                    return False
                values = self.ffi.new("int64_t[]", MMIO_SLOTS)
                self.ffi.memmove(values, b"\xff" * (8 * MMIO_SLOTS), 8 * MMIO_SLOTS)
                self._values[page] = values
                slot = self.struct.pages[n]
                slot.gpa, slot.values = page, int(self.ffi.cast("uintptr_t", values))
                self.struct.npages = n + 1      # after the page is filled (a plain store; x86 keeps the order)
            i = (gpa - page) // MMIO_REG
            old = values[i]
            values[i] = NO_ANSWER if value is None else value & 0xFFFFFFFF
            self.count += (value is not None) - (old != NO_ANSWER)
            return True


def main():
    """``python3 -m ops.nvmm.kvm.fastrun``: builds the library (if it is not cached yet) and says where it is."""
    if load() is None:
        print(f"fastrun: unavailable: {unavailable()}")
        return 1
    print(f"fastrun: {_library.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
