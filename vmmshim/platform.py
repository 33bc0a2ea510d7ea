"""The PC platform a bhyve guest sees, wired onto a :class:`vmmshim.vm.VM`: the 8259 pair, 8254 PIT and port
0x61, MC146818 RTC, ACPI PM timer and PM registers (reset, power off, power button), POST ports, the 8042's
reset, HPET, and COM1/COM2 16550 UARTs on their backends (bhyve's in-kernel devices plus ``pm.c``, ``post.c``,
``atkbdc.c`` and ``uart_emul.c``). Addresses and IRQs are bhyve's.

Not supported: the bootrom, PS/2 keyboard and mouse, COM3/COM4 backends beyond the ports, the fwctl port.
"""

import time

from bhyve_devices.atkbdc import KeyboardController
from bhyve_devices.pm import PowerManagement
from bhyve_devices.post import PostPort
from bhyve_devices.uart16550 import UART16550
from bhyve_devices.vatpit import NMISC, PIT8254
from bhyve_devices.vhpet import CNF_LEG_RT, HPET, HPET_BASE, HPET_SIZE
from bhyve_devices.vpmtmr import PMTimer
from bhyve_devices.vrtc import RTC
from ops.vmm_ops import VmSuspendHow

from .backends.uart import open_backend

COM_PORTS = {"com1": (0x3F8, 4), "com2": (0x2F8, 3), "com3": (0x3E8, 4), "com4": (0x2E8, 3)}
PIT, NMISC_PORT, RTC_PORT = 0x40, 0x61, 0x70
PMTMR_PORT, POST_PORTS, ISA_IRQ_SCI = 0x408, (0x80, 0x84), 9


class Platform:
    def __init__(self, vm, utc=False, uarts=None, on_escape=None):
        """``uarts``: ``{"com1": backend spec}`` (``stdio``, ``autopty``, a path ...). ``on_escape(key)``: the
        console escape keys typed on a tty (``vmmshim/backends/escape.py``)."""
        self.vm = vm
        t = vm.timers
        for port, size, dev, name in vm.ops.vm_atpic_ranges(vm.vmi):      # the 8259 pair lives in the ops layer
            vm.add_port_device(port, size, dev, name)
        self.pit = PIT8254(t, _PitLine(self, vm.isa_irq(0)))
        vm.add_port_device(PIT, 4, self.pit, "atpit")
        self.nmisc = NMISC(self.pit, t)
        vm.add_port_device(NMISC_PORT, 1, self.nmisc, "nmisc")
        self.rtc = RTC(t, vm.isa_irq(8), utc=utc, memsize=(vm.lowmem, vm.highmem))
        vm.add_port_device(RTC_PORT, 2, self.rtc, "rtc")
        self.pmtmr = PMTimer(t)
        vm.add_port_device(PMTMR_PORT, 4, self.pmtmr, "pmtmr")
        self.pm = PowerManagement(vm.isa_irq(ISA_IRQ_SCI), on_reset=self._reset, on_poweroff=self._poweroff)
        for port, length, dev in self.pm.ranges():
            vm.add_port_device(port, length, dev, f"pm-{port:#x}")
        self.posts = {port: PostPort() for port in POST_PORTS}
        for port, dev in self.posts.items():
            vm.add_port_device(port, 1, dev, f"post-{port:#x}")
        self.kbd = KeyboardController(on_reset=self._reset, irq1=vm.isa_irq(1), irq12=vm.isa_irq(12))
        for port, length, dev in self.kbd.ranges():
            vm.add_port_device(port, length, dev, f"atkbdc-{port:#x}")
        self.hpet = HPET(t, self._hpet_irq)
        vm.add_mmio_device(HPET_BASE, HPET_SIZE, self.hpet, "hpet")
        self.uarts, self.backends = {}, []
        try:
            for name, (port, irq) in COM_PORTS.items():
                uart = UART16550(vm.isa_irq(irq))
                spec = (uarts or {}).get(name)
                if spec:
                    backend = open_backend(spec)
                    self.backends.append(backend)
                    backend.buffer_lines(vm.timers)      # a line per write(2), not a byte (backends/uart.py)
                    uart.sink = backend
                    if on_escape is not None and hasattr(backend, "set_escape"):
                        backend.set_escape(on_escape)
                    backend.start(uart)
                self.uarts[name] = uart
                vm.add_port_device(port, 8, uart, name)
        except BaseException:
            self.close()            # a console opened before the bad one gives the terminal back
            raise

    def devices(self):
        """The platform's devices by a stable name (a checkpoint saves each under it)."""
        out = {"atpit": self.pit, "nmisc": self.nmisc, "rtc": self.rtc, "pmtmr": self.pmtmr, "pm": self.pm,
               "atkbdc": self.kbd, "hpet": self.hpet}
        out.update({f"post-{port:#x}": dev for port, dev in self.posts.items()})
        out.update(self.uarts)
        return out

    def debug_state(self):
        """The timer devices' state, one line each (a debugging aid; read racily)."""
        c = self.pit.channels[0]
        lines = [f"pit0 mode={c.mode} initial={c.initial} armed={c.timer is not None}"]
        hpet = getattr(self, "hpet", None)
        if hpet is not None:
            lines.append(f"hpet cfg={hpet.config:#x} isr={hpet.isr:#x} counter={hpet._counter():#x} " + " ".join(
                f"t{t.n}(cfg={t.config:#x} cmp={t.comparator:#x} per={t.period:#x} armed={t.handle is not None})"
                for t in hpet.timer))
        return lines

    def hpet_legacy(self):
        """True while the HPET's legacy replacement route owns IRQ0 and IRQ8 (the PIT and RTC are cut off)."""
        hpet = getattr(self, "hpet", None)
        return hpet is not None and bool(hpet.config & CNF_LEG_RT)

    def _hpet_irq(self, pin, level):
        """HPET routing: legacy pins 2 and 8 are ISA IRQ0/IRQ8, others IOAPIC pins."""
        vm = self.vm
        if pin in (2, 8):
            vm.ops.vm_isa_set_irq(vm.vmi, 0 if pin == 2 else 8, level)
        elif level:
            vm.ops.vm_ioapic_assert_irq(vm.vmi, pin)
        else:
            vm.ops.vm_ioapic_deassert_irq(vm.vmi, pin)

    def _reset(self):
        self.vm.request(VmSuspendHow.VM_SUSPEND_RESET)

    def _poweroff(self):
        self.vm.request(VmSuspendHow.VM_SUSPEND_POWEROFF)

    def press_power_button(self):
        """The ACPI power button (SIGTERM, as bhyve): False, and nothing pressed, where the guest has not enabled
        ACPI (the caller powers off instead, :mod:`vmmshim.shutdown`)."""
        return self.pm.press_power_button()

    def say(self, data):
        """Writes ``data`` to the consoles that have a terminal (the escape keys' help)."""
        for b in self.backends:
            if getattr(b, "raw_tty", False):
                b.write(data)

    def close(self):
        for b in self.backends:
            b.close()
        self.backends = []


class _PitLine:
    """The 8254's OUT0 to IRQ0, cut while the HPET's legacy replacement route is on (IA-PC HPET 1.0a, 2.3.9.2.2):
    otherwise both would drive IOAPIC pin 2 and the PIT's pulses would swallow the HPET's edges."""

    def __init__(self, platform, line):
        self._platform, self._line = platform, line

    def set_level(self, level):
        if not self._platform.hpet_legacy():
            self._line.set_level(level)

    def pulse(self):
        """The line's answer (False: merged with an edge still pending); True while the HPET has the route (the
        edge is cut off, not merged: the PIT must not send it again)."""
        if self._platform.hpet_legacy():
            return True
        return self._line.pulse()


def wall_clock_ns():
    return time.time_ns()
