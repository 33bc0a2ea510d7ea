"""bhyve's configuration tree (``bhyve_config(5)``): dotted keys set by ``-o key=value``, by ``-k file`` and by
the xhyve flags, which are shorthands for keys.

Keys used here: ``name``, ``cpus``, ``memory.size``, ``acpi_tables``, ``x86.strictio``, ``x86.strictmsr``
(false is ``-w``), ``x86.mptable``, ``x86.x2apic``, ``x86.vmexit_on_hlt``, ``x86.vmexit_on_pause``,
``virtio_msix``, ``rtc.use_localtime``, ``uuid``, ``lpc.com1.path`` / ``lpc.com2.path``,
``pci.B.S.F.device`` and ``pci.B.S.F.<option>`` (e.g. ``pci.0.4.0.path``), ``firmware.kind`` and its
``firmware.*`` keys, and vmmshim's own ``vmmshim.provider`` and ``x86.kvm_pv`` (KVM's paravirtual interface: kvmclock,
``ops/kvm_para.py``; on by default, as QEMU offers kvmclock), ``x86.pv_eoi`` (KVM's PV EOI as well; on by default, as QEMU offers it) and
``vmmshim.posted_io`` (devices' posted port writes, e.g. the UART's transmit register, buffered by KVM's
coalesced PIO; on by default), ``vmmshim.doorbells`` (virtio queue notifications through KVM's ioeventfd; off,
they exit and the transport rings the device's thread itself, ``vmmshim/fastpaths.py``; on by default),
``vmmshim.halt_serve`` (a vCPU about to sleep in HLT serves the
doorbells that rang first, ``vmmshim/doorbells.py``; on by default), ``vmmshim.answer_io`` (port reads a device publishes, e.g. the UART's
line status, answered by the KVM provider's compiled run loop without an exit, ``ops/nvmm/kvm/fastrun.py``; on by
default), ``vmmshim.blk_compiled`` (virtio-blk serves Linux-shaped read and write requests through its compiled
request, ``vmmshim/backends/blkfast.py``, where a C compiler can build it; on by default), ``vmmshim.gil_switch_ms``
(how long a Python thread waiting for the GIL lets the thread that holds it run before it makes it hand over,
``sys.setswitchinterval``; ``auto`` by default: 50 where the vCPUs run in a hypervisor, Python's own 5 with the
soft CPU, whose vCPU threads run the guest in Python).

Not supported: ``-k`` file includes, ``%(var)`` expansion.
"""

import re

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
_SIZE = re.compile(r"^(\d+)([kKmMgGtT]?)[bB]?$")


class ConfigError(ValueError):
    """A malformed value: the CLI prints it on one line and exits with the usage status."""


def parse_size(text, default_unit=MiB):
    """xhyve's ``-m``: a number with an optional K/M/G/T suffix; a bare number is MiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"invalid memory size {text!r} (examples: 512M, 2G)")
    n, unit = int(m.group(1)), m.group(2).upper()
    size = n * {"": default_unit, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}[unit]
    if size < MiB:
        raise ConfigError(f"memory size {text!r} is below 1 MiB")
    return size


class Config:
    def __init__(self):
        self.values = {"cpus": "1", "memory.size": str(256 * MiB), "x86.strictio": "false",
                       "x86.strictmsr": "true", "x86.mptable": "true", "acpi_tables": "false",
                       "x86.x2apic": "false", "x86.kvm_pv": "true", "x86.pv_eoi": "true",
                       "virtio_msix": "true", "rtc.use_localtime": "true",
                       "vmmshim.provider": "kvm", "name": "vm",
                       "vmmshim.stats": "false", "vmmshim.posted_io": "true",
                       "vmmshim.doorbells": "true", "vmmshim.halt_serve": "true", "vmmshim.answer_io": "true",
                       "vmmshim.gil_switch_ms": "auto",
                       "vmmshim.blk_compiled": "true"}

    def set(self, key, value):
        if not re.match(r"^[A-Za-z0-9_.-]+$", key) or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ConfigError(f"invalid configuration key {key!r}")
        self.values[key] = str(value)

    def set_option(self, text):
        """``-o key=value``."""
        if "=" not in text:
            raise ConfigError(f"-o takes key=value, got {text!r}")
        key, value = text.split("=", 1)
        self.set(key.strip(), value.strip())

    def load_file(self, path):
        """``-k file``: ``key=value`` lines, ``#`` comments."""
        from .loader.common import read_regular_file     # refuses a FIFO or a device without blocking or hanging
        data = read_regular_file(path, "config file")       # InputFileError (a ValueError): one line, status 4
        try:
            lines = data.decode().splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if line:
                try:
                    self.set_option(line)
                except ConfigError as exc:
                    raise ConfigError(f"{path}:{n}: {exc}") from None

    def get(self, key, default=None):
        return self.values.get(key, default)

    def get_bool(self, key):
        v = self.values.get(key, "false").lower()
        if v in ("true", "yes", "on", "1"):
            return True
        if v in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}={v!r} is not a boolean")

    def get_int(self, key, lo=None, hi=None):
        try:
            v = int(self.values[key], 0)
        except (KeyError, ValueError):
            raise ConfigError(f"{key}={self.values.get(key)!r} is not an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{key}={v} is outside {lo}..{hi}")
        return v

    def subtree(self, prefix):
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.values.items() if k.startswith(p)}

    def pci_slots(self):
        """``[(bus, slot, func, {options})]`` from ``pci.B.S.F.*`` keys, sorted."""
        slots = {}
        for key, value in self.values.items():
            m = re.match(r"^pci\.(\d+)\.(\d+)\.(\d+)\.(.+)$", key)
            if m:
                slots.setdefault(tuple(int(x) for x in m.groups()[:3]), {})[m.group(4)] = value
        return [(b, s, f, opts) for (b, s, f), opts in sorted(slots.items())]


def parse_slot(text, config):
    """xhyve/bhyve ``-s slot[:func],emulation[,conf]`` into ``pci.0.S.F.*`` keys."""
    parts = text.split(",", 2)
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f"-s takes slot[:func],emulation[,conf], got {text!r}")
    m = re.match(r"^(?:(\d+):)?(\d+)(?::(\d+))?$", parts[0])
    if not m:
        raise ConfigError(f"invalid PCI slot {parts[0]!r} in -s {text!r}")
    if m.group(1) is not None and m.group(3) is not None:
        bus, slot, func = int(m.group(1)), int(m.group(2)), int(m.group(3))
    elif m.group(1) is not None:
        bus, slot, func = 0, int(m.group(1)), int(m.group(2))
    else:
        bus, slot, func = 0, int(m.group(2)), 0
    if bus != 0 or not 0 <= slot < 32 or not 0 <= func < 8:
        raise ConfigError(f"PCI slot {parts[0]!r} out of range (bus 0, slot 0-31, function 0-7)")
    prefix = f"pci.{bus}.{slot}.{func}"
    if config.get(prefix + ".device"):
        raise ConfigError(f"PCI slot {bus}:{slot}:{func} is already occupied")
    config.set(prefix + ".device", parts[1])
    if len(parts) == 3 and parts[2]:
        for i, opt in enumerate(parts[2].split(",")):
            if "=" in opt:
                k, v = opt.split("=", 1)
                config.set(f"{prefix}.{k}", v)
            elif i == 0:
                config.set(f"{prefix}.path", opt)
            else:
                config.set(f"{prefix}.{opt}", "true")


def parse_lpc(text, config):
    """``-l com1,stdio`` / ``-l com2,/dev/ttyX`` / ``-l com1,autopty``."""
    parts = text.split(",", 1)
    dev = parts[0].lower()
    if dev == "debug-exit":     # QEMU's isa-debug-exit, for guest test suites: -l debug-exit[,PORT]
        config.set("lpc.debug_exit.port", parts[1] if len(parts) > 1 and parts[1] else "0xf4")
        return
    if dev not in ("com1", "com2", "com3", "com4", "bootrom"):
        raise ConfigError(f"unknown LPC device {parts[0]!r} in -l {text!r} (com1, com2, debug-exit)")
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f"-l {dev} needs a backend (stdio, autopty, a path)")
    if dev == "bootrom":
        raise ConfigError("-l bootrom (UEFI) is not supported: use -f kexec or -f multiboot")
    config.set(f"lpc.{dev}.path", parts[1])
