"""The libnvmm provider live, on NetBSD 10 only: capability and reset state, a real-mode guest's port I/O, MMIO and
HLT through the assists, and a stop from another thread. Each test skips, saying why, wherever
``nvmm_init("libnvmm")`` is unavailable.

Not covered: everything else on NetBSD (these tests have never run; nothing in this project has).
"""

import ctypes
import mmap
import threading
import time

import pytest

from ops.nvmm import api
from ops.nvmm import constants as C
from ops.nvmm import nvmm_init
from tests.unit.test_libnvmm_provider import LIVE_REASON

live = pytest.mark.skipif(LIVE_REASON is not None, reason=f"libnvmm provider unavailable here: {LIVE_REASON}")

# real mode at 0x1000: mov al,0x42; out 0x80,al; in al,0x81; mov [0x3000],al; hlt
PROGRAM = bytes([0xB0, 0x42, 0xE6, 0x80, 0xE4, 0x81, 0x88, 0x06, 0x00, 0x30, 0xF4])


def _guest(code):
    prov = nvmm_init("libnvmm")
    mach = prov.machine_create()
    buf = mmap.mmap(-1, 0x10000)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    mach.hva_map(hva, 0x10000)
    mach.gpa_map(hva, 0, 0x3000, C.NVMM_PROT_ALL)     # 0x3000 and above: MMIO
    buf[0x1000:0x1000 + len(code)] = code
    vcpu = mach.vcpu_create(0)
    vcpu.getstate(C.NVMM_X64_STATE_ALL)
    vcpu.state.segs[C.NVMM_X64_SEG_CS].selector = 0
    vcpu.state.segs[C.NVMM_X64_SEG_CS].base = 0
    vcpu.state.gprs[C.NVMM_X64_GPR_RIP] = 0x1000
    vcpu.setstate(C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_GPRS)
    return mach, vcpu, buf


def _run(vcpu):
    while True:
        ex = vcpu.run()
        if ex.reason != C.NVMM_VCPU_EXIT_NONE:
            return ex


@live
def test_live_capability_and_reset_state():
    cap = nvmm_init("libnvmm").capability()
    assert (cap.version, cap.state_size) == (2, 1008)
    mach, vcpu, _ = _guest(b"\xF4")
    with mach:
        vcpu.getstate(C.NVMM_X64_STATE_ALL)
        assert vcpu.state.crs[C.NVMM_X64_CR_XCR0] == 1 and vcpu.state.drs[C.NVMM_X64_DR_DR7] == 0x400
        assert bytes(vcpu.state.fpu[24:28]) == (0x1F80).to_bytes(4, "little")


@live
def test_live_io_mem_halt():
    mach, vcpu, _ = _guest(PROGRAM)
    seen = []

    def io(port, is_in, data):
        seen.append(("io", port, is_in, None if is_in else bytes(data)))   # IN: no promise on the bytes
        if is_in:
            data[0] = 0x99

    def mem(gpa, is_write, data):
        seen.append(("mem", gpa, is_write, bytes(data)))
    with mach:
        vcpu.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io, mem))
        for want in (C.NVMM_VCPU_EXIT_IO, C.NVMM_VCPU_EXIT_IO, C.NVMM_VCPU_EXIT_MEMORY):
            ex = _run(vcpu)
            assert ex.reason == want, ex
            (vcpu.assist_io if want == C.NVMM_VCPU_EXIT_IO else vcpu.assist_mem)()
        assert _run(vcpu).reason == C.NVMM_VCPU_EXIT_HALTED
    assert seen == [("io", 0x80, False, b"\x42"), ("io", 0x81, True, None), ("mem", 0x3000, True, b"\x99")]


@live
def test_live_stop_running_guest():
    mach, vcpu, _ = _guest(b"\xEB\xFE")             # jmp $
    got = []
    with mach:
        t = threading.Thread(target=lambda: got.append(_run(vcpu).reason))
        t.start()
        time.sleep(0.2)
        vcpu.stop()
        t.join(10)
        assert got == [C.NVMM_VCPU_EXIT_STOPPED]
