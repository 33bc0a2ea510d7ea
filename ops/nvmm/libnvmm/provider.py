"""The NetBSD provider: libnvmm user version 2 (NetBSD 10) through cffi in ABI mode.

Follows ``libnvmm(3)`` of NetBSD 10 (``lib/libnvmm/nvmm.h`` 1.19, ``NVMM_USER_VERSION`` 2) as summarised in
``shared/reference/anchors.md`` (b) and (c), and drives it the way QEMU's NVMM accelerator does (anchors (d)):

* ``ffi.dlopen("libnvmm.so")``, ``nvmm_init()``, then ``nvmm_capability()``: the kernel version must be 2 and
  ``state_size`` must be ``sizeof(struct nvmm_x64_state)`` (1008), else :class:`~ops.nvmm.ProviderUnavailable`
  with ``EPROGMISMATCH`` (``EPROTO`` where the platform has no ``EPROGMISMATCH``). A library without
  ``nvmm_vcpu_stop`` is user version 1 (NetBSD 9) and is refused the same way.
* ``Vcpu.state``, ``event`` and ``exit`` are views straight over libnvmm's memory (``vcpu->state`` and
  ``vcpu->event`` point into the comm page the kernel shares): ``getstate`` of cached state and ``setstate`` make
  no system call, and ``run`` copies nothing (``Exit.load`` reads the 8-byte reason).
* The assists call back into Python through two ``ffi.callback`` trampolines installed with
  ``NVMM_VCPU_CONF_CALLBACKS`` on every vCPU; they hand the Python callbacks a ``memoryview`` over ``io->data``
  or ``mem->data`` (valid only during the call). An exception raised by a callback is re-raised by
  ``assist_io``/``assist_mem`` once libnvmm returns (an IN or a read then sees zeros, never stale bytes).
* ``stop()`` is ``nvmm_vcpu_stop`` plus ``KICK_SIGNAL`` sent to the thread inside ``run``, whose handler does
  nothing: the flag makes the stop race-free, the signal pulls a running guest out (as QEMU's SIG_IPI).
* Errors are :class:`OSError` with libnvmm's ``errno`` (``ffi.errno``).

libnvmm ``abort()``s when the kernel refuses a ``gpa_map``/``gpa_unmap``; :class:`ops.nvmm.api.Machine` checks
alignment, protection, hva coverage and overlaps before it calls ``_gpa_map``, which leaves only kernel-side limits
(a gpa beyond the machine's guest-physical space) able to kill the process.

Not supported: ``nvmm_ctl``/``nvmm_root_init``, ``nvmm_vcpu_dump``, machine-level configuration (x86 defines
none), guest debugging (NVMM has no interface for it: ``GUEST_DEBUG_LIMITS``; the gdb stub can read and write the
guest, and answers steps and breakpoints as unsupported), libnvmm user version 1 (NetBSD 9) and the version-3 forks; a
``stop()`` cannot interrupt a running guest when the provider was first opened outside the main thread or
``KICK_SIGNAL`` has a foreign C-level handler.
Nothing here has run on NetBSD: it was checked against ``shared/reference/nvmm-abi.md`` on Linux only.
"""

import ctypes
import errno
import mmap
import os
import signal
import sys
import threading

from .. import ProviderUnavailable
from .. import api
from .. import capability as capmod
from .. import constants as C
from ..state import EVENT_SIZE, EXIT_SIZE, STATE_SIZE, Event, Exit, State
from .cdefs import LIBNAMES, ffi

DEV_NVMM = "/dev/nvmm"
KICK_SIGNAL = signal.SIGUSR1     # QEMU's SIG_IPI
EPROGMISMATCH = getattr(errno, "EPROGMISMATCH", errno.EPROTO)
_EPROG = "EPROGMISMATCH" if hasattr(errno, "EPROGMISMATCH") else "EPROGMISMATCH, EPROTO on this platform"

#: Every function the provider calls; a library lacking one of them is not user version 2.
FUNCTIONS = (
    "nvmm_init", "nvmm_capability", "nvmm_machine_create", "nvmm_machine_destroy", "nvmm_vcpu_create",
    "nvmm_vcpu_destroy", "nvmm_vcpu_configure", "nvmm_vcpu_getstate", "nvmm_vcpu_setstate", "nvmm_vcpu_inject",
    "nvmm_vcpu_run", "nvmm_vcpu_stop", "nvmm_hva_map", "nvmm_hva_unmap", "nvmm_gpa_map", "nvmm_gpa_unmap",
    "nvmm_gva_to_gpa", "nvmm_assist_io", "nvmm_assist_mem",
)

#: Offsets this module relies on, re-checked before any comm page is touched (nvmm-abi.md).
_LAYOUT = {
    ("struct nvmm_x64_state", None): STATE_SIZE,
    ("struct nvmm_x86_event", None): EVENT_SIZE,
    ("struct nvmm_x86_exit", None): EXIT_SIZE,
    ("struct nvmm_comm_page", None): 1072,
    ("struct nvmm_comm_page", "state"): 32,
    ("struct nvmm_comm_page", "event"): 1048,
    ("struct nvmm_comm_page", "stop"): 1064,
    ("struct nvmm_vcpu", None): 56,
    ("struct nvmm_vcpu", "stop"): 48,
    ("struct nvmm_io", "data"): 32,
    ("struct nvmm_mem", "data"): 40,
}

#: NVMM has no guest-debug interface (no single-step, no exception intercept, no debug-register configuration in
#: ``nvmm_vcpu_configure``): no ``debug-*`` feature, and these limits (``Vcpu.set_guest_debug`` stays ENOTSUP).
GUEST_DEBUG_LIMITS = frozenset({api.LIMIT_GUEST_DEBUG, capmod.LIMIT_GUEST_DEBUG_INT3, capmod.LIMIT_GUEST_DEBUG_WATCH})

_PROT_TO_MMAP = ((C.NVMM_PROT_READ, mmap.PROT_READ), (C.NVMM_PROT_WRITE, mmap.PROT_WRITE),
                 (C.NVMM_PROT_EXEC, mmap.PROT_EXEC))


def _error(what):
    """The :class:`OSError` for a libnvmm call that returned -1 (reads ``errno`` at once)."""
    err = ffi.errno
    return api.nvmm_error(err or errno.EIO, what)


def check_layout():
    """Raises :class:`ProviderUnavailable` when cffi laid the declarations out unlike the measured ABI."""
    for (ctype, fieldname), want in _LAYOUT.items():
        got = ffi.sizeof(ctype) if fieldname is None else ffi.offsetof(ctype, fieldname)
        if got != want:
            where = ctype if fieldname is None else f"{ctype}.{fieldname}"
            raise ProviderUnavailable(EPROGMISMATCH, f"cffi lays out {where} at {got}, NetBSD 10 at {want} ({_EPROG})")


class LibnvmmProvider(api.Provider):
    """An opened libnvmm (``nvmm_init`` done). ``lib`` is the dlopened library, or a stand-in in tests."""

    name = "libnvmm"

    def __init__(self, lib, kick_signal=None):
        self.lib = lib
        self.kick_signal = kick_signal
        cap = ffi.new("struct nvmm_capability *")
        if lib.nvmm_capability(cap) == -1:
            raise _error("nvmm_capability")
        if cap.version != C.NVMM_KERN_VERSION or cap.state_size != STATE_SIZE:
            raise ProviderUnavailable(
                EPROGMISMATCH, f"NVMM kernel reports version {cap.version}, state_size {cap.state_size}; vmmshim "
                f"speaks version {C.NVMM_KERN_VERSION}, state_size {STATE_SIZE} (NetBSD 10) ({_EPROG})")
        md = cap.arch
        limits = set(GUEST_DEBUG_LIMITS)
        if not md.vcpu_conf_support & C.NVMM_CAP_ARCH_VCPU_CONF_CPUID:
            limits.add(api.LIMIT_CPUID_EXIT)
        if not md.vcpu_conf_support & C.NVMM_CAP_ARCH_VCPU_CONF_TPR:
            limits.add(api.LIMIT_TPR_EXIT)
        self._cap = api.Capability(
            version=cap.version, state_size=cap.state_size, max_machines=cap.max_machines,
            max_vcpus=cap.max_vcpus, max_ram=cap.max_ram,
            arch=api.CapMd(md.mach_conf_support, md.vcpu_conf_support, md.xcr0_mask, md.mxcsr_mask,
                           md.conf_cpuid_maxops),
            limits=frozenset(limits))
        self.vcpus = {}         # address of a struct nvmm_vcpu -> LibnvmmVcpu, for the assist trampolines
        try:
            self._io_cb = ffi.callback("void(struct nvmm_io *)", self._io_trampoline)
            self._mem_cb = ffi.callback("void(struct nvmm_mem *)", self._mem_trampoline)
        except MemoryError:
            raise ProviderUnavailable(errno.ENOMEM, "cffi cannot make callbacks (PaX MPROTECT refuses W+X memory): "
                                      "run `paxctl +m` on the python3.11 binary") from None
        self.cbs = ffi.new("struct nvmm_assist_callbacks *", {"io": self._io_cb, "mem": self._mem_cb})

    def capability(self):
        return self._cap

    def machine_create(self):
        return LibnvmmMachine(self)

    # -- assist trampolines (called by libnvmm inside nvmm_assist_io/_mem) ---------------------------------------
    def _io_trampoline(self, io):
        vcpu = self.vcpus.get(int(ffi.cast("uintptr_t", io.vcpu)))
        if vcpu is not None:
            is_in = bool(getattr(io, "in"))
            vcpu._callback(vcpu.cbs.io, io.port, is_in, is_in, io.data, io.size)

    def _mem_trampoline(self, mem):
        vcpu = self.vcpus.get(int(ffi.cast("uintptr_t", mem.vcpu)))
        if vcpu is not None:
            vcpu._callback(vcpu.cbs.mem, mem.gpa, bool(mem.write), not mem.write, mem.data, mem.size)


class LibnvmmMachine(api.Machine):
    """``struct nvmm_machine``; the base class keeps the hva/gpa bookkeeping and validates before libnvmm."""

    def __init__(self, provider):
        super().__init__(provider)
        self.lib = provider.lib
        self.c = ffi.new("struct nvmm_machine *")
        if self.lib.nvmm_machine_create(self.c) == -1:
            raise _error("nvmm_machine_create")

    def _hva_map(self, hva, size):
        if self.lib.nvmm_hva_map(self.c, hva, size) == -1:
            raise _error(f"nvmm_hva_map({hva:#x}, {size:#x})")

    def _hva_unmap(self, hva, size):
        if self.lib.nvmm_hva_unmap(self.c, hva, size) == -1:
            raise _error(f"nvmm_hva_unmap({hva:#x}, {size:#x})")

    def _gpa_map(self, hva, gpa, size, prot):
        # libnvmm takes PROT_* (mman.h) and converts; NVMM_PROT_USER has no PROT_* and is not a mapping right.
        mprot = 0
        for nvmm_bit, mmap_bit in _PROT_TO_MMAP:
            if prot & nvmm_bit:
                mprot |= mmap_bit
        if self.lib.nvmm_gpa_map(self.c, hva, gpa, size, mprot) == -1:
            raise _error(f"nvmm_gpa_map(gpa {gpa:#x}, size {size:#x})")

    def _gpa_unmap(self, area):
        if self.lib.nvmm_gpa_unmap(self.c, area.hva, area.start, area.size) == -1:
            raise _error(f"nvmm_gpa_unmap(gpa {area.start:#x}, size {area.size:#x})")

    def _vcpu_create(self, cpuid):
        return LibnvmmVcpu(self, cpuid)

    def _destroy(self):
        if self.lib.nvmm_machine_destroy(self.c) == -1:
            raise _error("nvmm_machine_destroy")


class LibnvmmVcpu(api.Vcpu):
    """``struct nvmm_vcpu``: ``state``/``event`` are the comm page, ``exit`` is libnvmm's exit buffer."""

    def __init__(self, machine, cpuid):
        lib = machine.lib
        c = ffi.new("struct nvmm_vcpu *")
        if lib.nvmm_vcpu_create(machine.c, cpuid, c) == -1:
            raise _error(f"nvmm_vcpu_create({cpuid})")
        super().__init__(machine, cpuid, ffi.buffer(c.state, STATE_SIZE), ffi.buffer(c.event, EVENT_SIZE),
                         Exit(ffi.buffer(c.exit, EXIT_SIZE)))
        self.c, self._mc, self._provider = c, machine.c, machine.provider
        self._addr = int(ffi.cast("uintptr_t", c))
        self._getstate, self._setstate = lib.nvmm_vcpu_getstate, lib.nvmm_vcpu_setstate
        self._run, self._inject, self._stop = lib.nvmm_vcpu_run, lib.nvmm_vcpu_inject, lib.nvmm_vcpu_stop
        self._lib = lib
        self._cb_error = None
        self._running_in = None     # thread ident while inside nvmm_vcpu_run
        self._provider.vcpus[self._addr] = self
        if lib.nvmm_vcpu_configure(self._mc, c, C.NVMM_VCPU_CONF_CALLBACKS, self._provider.cbs) == -1:
            exc = _error("nvmm_vcpu_configure(NVMM_VCPU_CONF_CALLBACKS)")
            self._destroy()
            raise exc

    # -- state, events, run ------------------------------------------------------------------------------------
    def getstate(self, flags):
        if self._getstate(self._mc, self.c, flags) == -1:
            raise _error(f"nvmm_vcpu_getstate({flags:#x})")

    def setstate(self, flags):
        if self._setstate(self._mc, self.c, flags) == -1:
            raise _error(f"nvmm_vcpu_setstate({flags:#x})")

    def inject(self):
        if self._inject(self._mc, self.c) == -1:
            raise _error("nvmm_vcpu_inject")

    def run(self):
        self._running_in = threading.get_ident()
        try:
            rc = self._run(self._mc, self.c)
        finally:
            self._running_in = None
        if rc == -1:
            if ffi.errno != errno.EINTR:
                raise _error("nvmm_vcpu_run")
            self.c.exit.reason = C.NVMM_VCPU_EXIT_NONE     # a signal before entry: the caller just loops
        return self.exit.load()

    def tsc_frequency(self):
        """NVMM runs the guest's TSC at the host's rate: NetBSD's ``machdep.tsc_freq``."""
        return tsc_freq_sysctl()

    def stop(self):
        """``nvmm_vcpu_stop`` (the next or current run returns STOPPED) plus a kick of the running thread."""
        if self.destroyed:
            return
        if self._stop(self.c) == -1:
            raise _error("nvmm_vcpu_stop")
        tid, sig = self._running_in, self._provider.kick_signal
        if tid is not None and sig is not None and tid != threading.get_ident():
            try:
                signal.pthread_kill(tid, sig)
            except (OSError, ValueError):
                pass            # the thread left run() meanwhile: the stop flag still holds

    def clear_stop(self):
        """Clears the comm page's ``stop`` flag (``nvmm_vcpu.stop`` points at it; ``nvmm_vcpu_stop`` sets it)."""
        if not self.destroyed:
            self.c.stop[0] = 0

    # -- assists -----------------------------------------------------------------------------------------------
    def _callback(self, fn, where, flag, fills, data, size):
        """Called from a trampoline: runs ``fn(where, flag, view)`` (``fills``: an IN or a read, the callback
        provides the bytes), keeping its exception for the assist to raise."""
        view = memoryview(ffi.buffer(data, size))
        try:
            if fn is None:
                raise api.nvmm_error(errno.EINVAL, "assist without a callback (configure NVMM_VCPU_CONF_CALLBACKS)")
            fn(where, flag, view)
        except BaseException as exc:  # noqa: B036 - carried across the C frame, re-raised by the assist
            if fills:
                ffi.memmove(data, bytes(size), size)
            if self._cb_error is None:
                self._cb_error = exc
        finally:
            try:
                view.release()
            except BufferError:
                pass

    def _assist(self, fn, name):
        self._cb_error = None
        rc = fn(self._mc, self.c)
        exc = _error(name) if rc == -1 else None
        cb_error, self._cb_error = self._cb_error, None
        if cb_error is not None:
            raise cb_error
        if exc is not None:
            raise exc

    def assist_io(self):
        if self.cbs.io is None:
            raise api.nvmm_error(errno.EINVAL, "assist_io without an io callback (NVMM_VCPU_CONF_CALLBACKS)")
        self._assist(self._lib.nvmm_assist_io, "nvmm_assist_io")

    def assist_mem(self):
        if self.cbs.mem is None:
            raise api.nvmm_error(errno.EINVAL, "assist_mem without a mem callback (NVMM_VCPU_CONF_CALLBACKS)")
        self._assist(self._lib.nvmm_assist_mem, "nvmm_assist_mem")

    # -- configuration and page walk ----------------------------------------------------------------------------
    def _configure(self, op, conf):
        if op == C.NVMM_VCPU_CONF_CPUID:
            if not isinstance(conf, api.ConfCpuid):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_CPUID takes a ConfCpuid")
            c = ffi.new("struct nvmm_vcpu_conf_cpuid *")
            c.mask, c.exit, c.leaf = int(bool(conf.mask)), int(bool(conf.exit)), conf.leaf
            regs_set, regs_del = c.u.mask.set, getattr(c.u.mask, "del")
            regs_set.eax, regs_set.ebx, regs_set.ecx, regs_set.edx = conf.set
            regs_del.eax, regs_del.ebx, regs_del.ecx, regs_del.edx = conf.del_
        elif op == C.NVMM_VCPU_CONF_TPR:
            if not isinstance(conf, api.ConfTpr):
                raise api.nvmm_error(errno.EINVAL, "NVMM_VCPU_CONF_TPR takes a ConfTpr")
            c = ffi.new("struct nvmm_vcpu_conf_tpr *")
            c.exit_changed = int(bool(conf.exit_changed))
        else:
            raise api.nvmm_error(errno.EINVAL, f"vCPU configuration op {op} is not defined")
        if self._lib.nvmm_vcpu_configure(self._mc, self.c, op, c) == -1:
            raise _error(f"nvmm_vcpu_configure({op})")

    def gva_to_gpa(self, gva):
        """libnvmm's own walk (``nvmm_gva_to_gpa``): ``(gpa, prot)``, ``EFAULT`` when it fails."""
        gpa, prot = ffi.new("gpaddr_t *"), ffi.new("nvmm_prot_t *")
        if self._lib.nvmm_gva_to_gpa(self._mc, self.c, gva, gpa, prot) == -1:
            raise _error(f"nvmm_gva_to_gpa({gva:#x})")
        return gpa[0], prot[0]

    def _destroy(self):
        self._provider.vcpus.pop(self._addr, None)
        rc = self._lib.nvmm_vcpu_destroy(self._mc, self.c)
        exc = _error("nvmm_vcpu_destroy") if rc == -1 else None
        # The comm page is unmapped now: point the views at private memory so a stale use cannot fault.
        self.state, self.event, self.exit = State(), Event(), Exit()
        if exc is not None:
            raise exc


# -- opening -------------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_provider = None


def _kick_handler(signum, frame):
    """Does nothing: the signal only has to pull the vCPU thread out of the guest."""


def install_kick(sig=KICK_SIGNAL):
    """Installs the no-op handler for ``sig`` unless a Python handler is already there; returns ``sig``, or None
    when signals cannot kick (not the main thread, or a handler installed outside Python)."""
    try:
        current = signal.getsignal(sig)
        if current in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(sig, _kick_handler)
        elif current is None:
            return None
        return sig
    except ValueError:
        return None


def tsc_freq_sysctl():
    """``sysctlbyname("machdep.tsc_freq")`` (NetBSD, uint64 Hz), or None where there is no such sysctl."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "sysctlbyname", None)
    if fn is None:
        return None
    value, size = ctypes.c_uint64(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint64))
    if fn(b"machdep.tsc_freq", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        return None
    return value.value or None


def dlopen():
    """``ffi.dlopen`` of libnvmm, with every function of user version 2 resolved."""
    for name in LIBNAMES:
        try:
            lib = ffi.dlopen(name)
            break
        except OSError:
            continue
    else:
        raise ProviderUnavailable(errno.ENOENT, f"libnvmm.so not found: the libnvmm provider needs NetBSD 10 "
                                  f"(this is {sys.platform})")
    for fn in FUNCTIONS:
        try:
            getattr(lib, fn)
        except (AttributeError, NotImplementedError):
            raise ProviderUnavailable(EPROGMISMATCH, f"libnvmm lacks {fn}: user version 1 (NetBSD 9) or older; "
                                      f"vmmshim needs user version 2 (NetBSD 10) ({_EPROG})") from None
    return lib


def _init(lib):
    if lib.nvmm_init() != -1:
        return
    err = ffi.errno
    if err in (errno.EACCES, errno.EPERM):
        msg = f"permission denied on {DEV_NVMM}: add the user to the 'nvmm' group and log in again"
    elif err in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        msg = f"{DEV_NVMM} has no driver: `modload nvmm` as root (needs a CPU with VMX or SVM)"
    elif err == EPROGMISMATCH:
        msg = f"the NVMM kernel version differs from libnvmm's ({_EPROG})"
    else:
        msg = f"nvmm_init failed: {os.strerror(err)}"
    raise ProviderUnavailable(err or errno.EIO, msg)


def open_provider():
    """``nvmm_init`` + ``nvmm_capability``, once per process (libnvmm's init is not re-entrant)."""
    global _provider
    with _lock:
        if _provider is None:
            check_layout()
            lib = dlopen()
            if not os.path.exists(DEV_NVMM):
                raise ProviderUnavailable(errno.ENODEV, f"no {DEV_NVMM}: `modload nvmm` as root (NetBSD 10)")
            _init(lib)
            _provider = LibnvmmProvider(lib, install_kick())
        return _provider
