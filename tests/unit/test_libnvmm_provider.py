"""The libnvmm provider: how it fails where libnvmm is absent and its logic over a stand-in library (the live run,
NetBSD 10 only, is ``test_libnvmm_live.py``).

``FakeLib`` plays libnvmm's part with the real cffi structures: a comm page per vCPU, ``vcpu->state/event/exit``
pointers into it, the CONF_CALLBACKS copy into ``vcpu->cbs``, and assists that call ``vcpu->cbs.io/mem`` through
the function pointers, i.e. through the provider's ``ffi.callback`` trampolines. It checks the provider's wiring,
not libnvmm's behaviour.

Not covered here: NetBSD itself (the live tests have never run; nothing in this project has).
"""

import ctypes
import errno
import mmap
import signal
import threading
import time

import pytest

from ops.nvmm import ProviderUnavailable, available_providers, nvmm_init
from ops.nvmm import api
from ops.nvmm import capability as capmod
from ops.nvmm import constants as C
from ops.nvmm.libnvmm import provider as P
from ops.nvmm.libnvmm.cdefs import ffi


def _libnvmm_reason():
    try:
        nvmm_init("libnvmm")
        return None
    except ProviderUnavailable as exc:
        return exc.strerror


LIVE_REASON = _libnvmm_reason()


# -- absent libnvmm ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(LIVE_REASON is None, reason="libnvmm is present here")
def test_nvmm_init_raises_one_line():
    with pytest.raises(ProviderUnavailable) as info:
        nvmm_init("libnvmm")
    exc = info.value
    assert exc.errno in (errno.ENOENT, errno.ENODEV, errno.EACCES, P.EPROGMISMATCH)
    assert "\n" not in str(exc) and exc.strerror and exc.__context__ is None
    assert available_providers()["libnvmm"] == exc.strerror


def test_open_provider_messages(monkeypatch):
    monkeypatch.setattr(P, "_provider", None)
    monkeypatch.setattr(P, "dlopen", lambda: FakeLib(init_errno=errno.EACCES))
    monkeypatch.setattr(P.os.path, "exists", lambda path: True)
    with pytest.raises(ProviderUnavailable, match="'nvmm' group") as info:
        P.open_provider()
    assert info.value.errno == errno.EACCES
    monkeypatch.setattr(P.os.path, "exists", lambda path: path != P.DEV_NVMM)
    with pytest.raises(ProviderUnavailable, match="modload nvmm"):
        P.open_provider()
    assert P._provider is None


@pytest.mark.parametrize("version,state_size", [(1, 1008), (3, 1008), (2, 1024)])
def test_version_and_state_size_mismatch(version, state_size):
    with pytest.raises(ProviderUnavailable) as info:
        P.LibnvmmProvider(FakeLib(version=version, state_size=state_size))
    assert info.value.errno == P.EPROGMISMATCH and "EPROGMISMATCH" in str(info.value)
    assert "\n" not in str(info.value)


def test_layout_check_passes():
    P.check_layout()


# -- the provider over a stand-in libnvmm --------------------------------------------------------------------------
class FakeLib:
    """Enough of libnvmm's behaviour, over the real structures, to drive the provider."""

    def __init__(self, version=2, state_size=1008, conf_support=3, init_errno=0):
        self.version, self.state_size, self.conf_support, self.init_errno = version, state_size, conf_support, \
            init_errno
        self.keep, self.calls, self.syscalls, self.exits = {}, [], 0, []

    def _fail(self, err):
        ffi.errno = err
        return -1

    def nvmm_init(self):
        return self._fail(self.init_errno) if self.init_errno else 0

    def nvmm_capability(self, cap):
        cap.version, cap.state_size, cap.max_machines, cap.max_vcpus = self.version, self.state_size, 8, 4
        cap.max_ram, cap.arch.vcpu_conf_support, cap.arch.conf_cpuid_maxops = 1 << 36, self.conf_support, 16
        return 0

    def nvmm_machine_create(self, mach):
        mach.machid = 1
        return 0

    def __getattr__(self, name):            # the memory calls and destroys: recorded, succeed
        if not name.startswith("nvmm_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args)) or 0

    def nvmm_vcpu_create(self, mach, cpuid, vcpu):
        page, exit_ = ffi.new("struct nvmm_comm_page *"), ffi.new("struct nvmm_x86_exit *")
        self.keep[cpuid] = page, exit_
        vcpu.cpuid, vcpu.exit = cpuid, exit_
        vcpu.state, vcpu.event = ffi.addressof(page, "state"), ffi.addressof(page, "event")
        vcpu.stop = ffi.addressof(page, "stop")
        page.state.gprs[C.NVMM_X64_GPR_RIP] = 0xFFF0
        return 0

    def page(self, vcpu):
        return self.keep[vcpu.cpuid][0]

    def nvmm_vcpu_configure(self, mach, vcpu, op, conf):
        if op == C.NVMM_VCPU_CONF_CALLBACKS:
            vcpu.cbs = conf[0]
        else:
            self.calls.append(("configure", op, bytes(ffi.buffer(conf))))
        return 0

    def nvmm_vcpu_getstate(self, mach, vcpu, flags):
        page = self.page(vcpu)
        if flags & ~page.state_cached:
            self.syscalls += 1
            page.state_cached |= flags
        return 0

    def nvmm_vcpu_setstate(self, mach, vcpu, flags):
        page = self.page(vcpu)
        page.state_commit |= flags
        page.state_cached |= flags
        return 0

    def nvmm_vcpu_inject(self, mach, vcpu):
        self.page(vcpu).event_commit = True
        return 0

    def nvmm_vcpu_run(self, mach, vcpu):
        page = self.page(vcpu)
        page.state_commit, page.state_cached = 0, 0
        if self.exits:
            self.exits.pop(0)(vcpu.exit)
            return 0
        deadline = time.monotonic() + 5
        while not vcpu.stop[0] and time.monotonic() < deadline:
            time.sleep(0.001)
        vcpu.stop[0] = 0
        vcpu.exit.reason = C.NVMM_VCPU_EXIT_STOPPED
        return 0

    def nvmm_vcpu_stop(self, vcpu):
        vcpu.stop[0] = 1
        return 0

    def nvmm_assist_io(self, mach, vcpu):
        ex = vcpu.exit
        if ex.reason != C.NVMM_VCPU_EXIT_IO:
            return self._fail(errno.EINVAL)
        gprs = vcpu.state.gprs
        data = ffi.new("uint8_t[8]", list(gprs[C.NVMM_X64_GPR_RAX].to_bytes(8, "little")))
        io = ffi.new("struct nvmm_io *", {"mach": mach, "vcpu": vcpu, "port": ex.u.io.port,
                                          "size": ex.u.io.operand_size, "data": data})
        setattr(io, "in", getattr(ex.u.io, "in"))
        vcpu.cbs.io(io)
        if getattr(ex.u.io, "in"):
            gprs[C.NVMM_X64_GPR_RAX] = int.from_bytes(bytes(data)[:io.size], "little")
        gprs[C.NVMM_X64_GPR_RIP] = ex.u.io.npc
        return 0

    def nvmm_assist_mem(self, mach, vcpu):
        ex = vcpu.exit
        data = ffi.new("uint8_t[4]", [1, 2, 3, 4])
        mem = ffi.new("struct nvmm_mem *", {"mach": mach, "vcpu": vcpu, "gpa": ex.u.mem.gpa,
                                            "write": ex.u.mem.prot == C.NVMM_PROT_WRITE, "size": 4, "data": data})
        vcpu.cbs.mem(mem)
        vcpu.state.gprs[C.NVMM_X64_GPR_RAX] = int.from_bytes(bytes(data), "little")
        return 0

    def nvmm_gva_to_gpa(self, mach, vcpu, gva, gpa, prot):
        if gva >= 1 << 47:
            return self._fail(errno.EFAULT)
        gpa[0], prot[0] = gva & 0xFFFF_FFFF, C.NVMM_PROT_ALL
        return 0


def io_exit(port, is_in, size, npc):
    def fill(ex):
        ex.reason, ex.u.io.port, ex.u.io.operand_size, ex.u.io.npc = C.NVMM_VCPU_EXIT_IO, port, size, npc
        setattr(ex.u.io, "in", is_in)
    return fill


@pytest.fixture
def fake():
    lib = FakeLib()
    prov = P.LibnvmmProvider(lib)
    mach = prov.machine_create()
    vcpu = mach.vcpu_create(0)
    yield lib, prov, mach, vcpu
    mach.destroy()


def test_capability(fake):
    _, prov, _, _ = fake
    cap = prov.capability()
    assert (cap.version, cap.state_size, cap.max_vcpus, cap.arch.conf_cpuid_maxops) == (2, 1008, 4, 16)
    assert cap.limits == P.GUEST_DEBUG_LIMITS
    assert P.LibnvmmProvider(FakeLib(conf_support=0)).capability().limits == \
        {api.LIMIT_CPUID_EXIT, api.LIMIT_TPR_EXIT} | P.GUEST_DEBUG_LIMITS


def test_no_guest_debugging(fake):
    """NVMM v2 has no single-step, exception intercept or debug-register configuration: the capability lists every
    guest-debug limit and no debug feature, and ``set_guest_debug`` asking for anything is ENOTSUP."""
    _, prov, _, vcpu = fake
    cap = prov.capability()
    assert {api.LIMIT_GUEST_DEBUG, capmod.LIMIT_GUEST_DEBUG_INT3, capmod.LIMIT_GUEST_DEBUG_WATCH} <= cap.limits
    assert not {f for f in cap.features if f.startswith("debug-")}
    vcpu.set_guest_debug()
    for kw in ({"step": True}, {"sw_bp": True}, {"hw": [(0x1000, 0, 1)]}):
        with pytest.raises(OSError) as info:
            vcpu.set_guest_debug(**kw)
        assert info.value.errno == errno.ENOTSUP


def test_state_is_the_comm_page(fake):
    lib, _, _, vcpu = fake
    page = lib.page(vcpu.c)
    vcpu.getstate(C.NVMM_X64_STATE_GPRS)
    vcpu.getstate(C.NVMM_X64_STATE_GPRS)
    assert lib.syscalls == 1 and vcpu.state.gprs[C.NVMM_X64_GPR_RIP] == 0xFFF0
    vcpu.state.gprs[C.NVMM_X64_GPR_RIP] = 0x1000
    vcpu.setstate(C.NVMM_X64_STATE_GPRS)
    assert page.state.gprs[C.NVMM_X64_GPR_RIP] == 0x1000 and page.state_commit == C.NVMM_X64_STATE_GPRS
    vcpu.event.set(C.NVMM_VCPU_EVENT_INTR, 0x20)
    vcpu.inject()
    assert page.event.vector == 0x20 and page.event_commit


def test_run_and_io_assist(fake):
    lib, _, _, vcpu = fake
    seen = []

    def io(port, is_in, data):
        seen.append((port, is_in, bytes(data)))
        if is_in:
            data[:] = b"\x34\x12"
    vcpu.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=io))
    vcpu.state.gprs[C.NVMM_X64_GPR_RAX] = 0x42
    lib.exits += [io_exit(0x80, False, 1, 0x1002), io_exit(0x60, True, 2, 0x1004)]
    ex = vcpu.run()
    assert ex is vcpu.exit and ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x80
    vcpu.assist_io()
    assert vcpu.run().io.in_
    vcpu.assist_io()
    assert seen == [(0x80, False, b"\x42"), (0x60, True, b"\x42\x00")]
    assert vcpu.state.gprs[C.NVMM_X64_GPR_RAX] == 0x1234 and vcpu.state.gprs[C.NVMM_X64_GPR_RIP] == 0x1004


def test_mem_assist_passes_is_write(fake):
    lib, _, _, vcpu = fake
    seen = []

    def mem(gpa, is_write, data):
        seen.append((gpa, is_write, bytes(data)))
        if not is_write:
            data[:] = b"\xaa\xbb\xcc\xdd"
    vcpu.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(mem=mem))
    for prot in (C.NVMM_PROT_WRITE, C.NVMM_PROT_READ):
        vcpu.c.exit.reason, vcpu.c.exit.u.mem.gpa, vcpu.c.exit.u.mem.prot = C.NVMM_VCPU_EXIT_MEMORY, 0xFEC0_0000, prot
        vcpu.assist_mem()
    assert seen == [(0xFEC0_0000, True, b"\x01\x02\x03\x04"), (0xFEC0_0000, False, b"\x01\x02\x03\x04")]
    assert vcpu.state.gprs[C.NVMM_X64_GPR_RAX] == 0xDDCCBBAA


def test_callback_exception_is_reraised_and_in_data_zeroed(fake):
    lib, _, _, vcpu = fake

    def io(port, is_in, data):
        raise ValueError("device on fire")
    vcpu.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=io))
    vcpu.state.gprs[C.NVMM_X64_GPR_RAX] = 0xFFFF
    lib.exits.append(io_exit(0x71, True, 1, 0x1002))
    vcpu.run()
    with pytest.raises(ValueError, match="on fire"):
        vcpu.assist_io()
    assert vcpu.state.gprs[C.NVMM_X64_GPR_RAX] == 0
    vcpu.c.exit.reason = C.NVMM_VCPU_EXIT_HALTED
    with pytest.raises(OSError) as info:            # libnvmm's errno comes back as OSError
        vcpu.assist_io()
    assert info.value.errno == errno.EINVAL


def test_assist_without_callback_never_reaches_libnvmm(fake):
    _, _, _, vcpu = fake
    with pytest.raises(OSError) as info:
        vcpu.assist_mem()
    assert info.value.errno == errno.EINVAL


def test_configure_cpuid_and_tpr(fake):
    lib, _, _, vcpu = fake
    vcpu.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=1, mask=True, set=(0, 0, 0, 0x4000),
                                                         del_=(0, 0, 1 << 21, 0)))
    vcpu.configure(C.NVMM_VCPU_CONF_TPR, api.ConfTpr(exit_changed=True))
    (_, op1, raw1), (_, op2, raw2) = [c for c in lib.calls if c[0] == "configure"]
    assert (op1, op2) == (C.NVMM_VCPU_CONF_CPUID, C.NVMM_VCPU_CONF_TPR)
    words = [int.from_bytes(raw1[i:i + 4], "little") for i in range(0, 40, 4)]
    assert words == [0b01, 1, 0, 0, 0, 0x4000, 0, 0, 1 << 21, 0]
    assert raw2 == b"\x01\x00\x00\x00"
    with pytest.raises(OSError):
        vcpu.configure(C.NVMM_VCPU_CONF_MI_BEGIN, None)


def test_memory_calls_and_prot(fake):
    lib, _, mach, _ = fake
    buf = mmap.mmap(-1, 0x4000)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    mach.hva_map(hva, 0x4000)
    mach.gpa_map(hva, 0x10000, 0x2000, C.NVMM_PROT_READ | C.NVMM_PROT_EXEC | C.NVMM_PROT_USER)
    mach.gpa_unmap(hva, 0x10000, 0x2000)
    names = [(c[0], c[1][1:]) for c in lib.calls if c[0].startswith("nvmm_")]
    assert names == [("nvmm_hva_map", (hva, 0x4000)),
                     ("nvmm_gpa_map", (hva, 0x10000, 0x2000, mmap.PROT_READ | mmap.PROT_EXEC)),
                     ("nvmm_gpa_unmap", (hva, 0x10000, 0x2000))]
    mach.hva_unmap(hva, 0x4000)


def test_gva_to_gpa(fake):
    _, _, _, vcpu = fake
    assert vcpu.gva_to_gpa(0x1_2345_6789) == (0x2345_6789, C.NVMM_PROT_ALL)
    with pytest.raises(OSError) as info:
        vcpu.gva_to_gpa(1 << 63)
    assert info.value.errno == errno.EFAULT


def test_stop_from_another_thread_kicks(fake):
    lib, prov, _, vcpu = fake
    kicks = []
    old = signal.signal(signal.SIGUSR1, lambda *a: kicks.append(1))
    prov.kick_signal = signal.SIGUSR1
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(vcpu.run().reason))
        t.start()
        while vcpu._running_in is None:
            time.sleep(0.001)
        vcpu.stop()
        t.join(5)
        time.sleep(0.01)                    # Python runs the (no-op) handler in the main thread
        assert got == [C.NVMM_VCPU_EXIT_STOPPED] and kicks
        vcpu.stop()                          # not running: the flag alone, next run returns at once
        assert vcpu.run().reason == C.NVMM_VCPU_EXIT_STOPPED
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_install_kick():
    old = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        assert P.install_kick(signal.SIGUSR2) == signal.SIGUSR2
        assert signal.getsignal(signal.SIGUSR2) is P._kick_handler
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_destroy_detaches_views(fake):
    lib, prov, mach, vcpu = fake
    vcpu.destroy()
    assert not prov.vcpus and ("nvmm_vcpu_destroy" in [c[0] for c in lib.calls])
    vcpu.state.gprs[0] = 1                  # private memory now, not the unmapped comm page
    assert lib.page(vcpu.c).state.gprs[0] == 0
    mach.destroy()
    assert lib.calls[-1][0] == "nvmm_machine_destroy"
