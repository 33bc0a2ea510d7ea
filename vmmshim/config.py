"""bhyve's configuration tree (``bhyve_config(5)``, ``usr.sbin/bhyve/config.c``): dotted keys set by ``-o
key=value``, by ``-k file`` and by the xhyve flags, which are shorthands for keys. The keys vmmshim reads are
documented in :mod:`vmmshim.config_keys`.

Values are strings, stored as given (``config.dump=1`` prints them so). :meth:`Config.get` expands ``%(key)``
references recursively, as bhyve's ``get_config_value`` does: a backslash takes the next character literally and
a ``%`` not followed by ``(`` stays; where bhyve warns and leaves a reference empty (an unset key, a loop, more
than 15 levels) vmmshim refuses it in one line. Booleans are bhyve's (true/on/yes/1, false/off/no/0, any case),
integers ``strtol``'s (decimal, ``0x`` hex, a leading ``0`` octal), and ``memory.size`` is libvmmapi's
``vm_parse_memsize``: a bare number below 1048576 counts MiB (xhyve's ``-m 512``), anything else is
``expand_number(3)``: a K, M, G, T, P or E suffix in either case (powers of 1024), an optional B.

:meth:`Config.set` refuses at once a misspelt ``vmmshim.*`` key (naming the close match and the known keys), a
key that would turn a value into a node of the tree or the reverse (as bhyve's ``set_config_value`` does), a
``pci.B.S.F`` key off bus 0 or out of range, and the bhyve keys vmmshim does not support yet (``lpc.bootrom``).
:meth:`Config.validate` checks the rest once the flags are read: bhyve's ``calc_topology``
(``cpus`` must equal sockets x cores x threads when both are given; without ``cpus`` it is their product; at
most 64 vCPUs, vmmshim's limit), the memory size (1 MiB to 1 TiB) and every value of the keys vmmshim reads.

Not supported: ``-k`` file includes, the ``%%`` escape that bhyve_config(5) describes (bhyve's config.c
escapes with a backslash, and so does vmmshim), the topology in CPUID (``sockets``, ``cores`` and ``threads`` are
stored and checked; the runner reads ``cpus`` only).
"""

import re

from .config_keys import NOT_SUPPORTED_YET, VMMSHIM_KEYS, unknown_vmmshim_key

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
MEMSIZE_MIN, MEMSIZE_MAX = MiB, TiB     # the upper bound catches typos (-m 512G for 512M); the host must still
                                        # be able to map what is asked
BARE_MIB_BELOW = MiB            # vm_parse_memsize: a bare number below this many counts MiB
MAX_VCPUS = 64                  # the runner's limit
TOPOLOGY_KEYS = ("sockets", "cores", "threads")
PCI_SLOTS, PCI_FUNCS = 32, 8
EXPAND_DEPTH_MAX = 15           # bhyve's _expand_config_value gives up deeper than this
LPC_DEVICES = ("com1", "com2", "com3", "com4", "debug-exit")
DEBUG_EXIT_PORT = "0xf4"
TRUE_WORDS, FALSE_WORDS = ("true", "on", "yes", "1"), ("false", "off", "no", "0")
SIZE_KEYS = ("memory.size",)
#: bhyve's boolean keys that vmmshim reads or accepts: validate() checks their values.
BOOL_KEYS = ("acpi_tables", "x86.mptable", "x86.x2apic", "x86.strictio", "x86.strictmsr", "x86.vmexit_on_hlt",
             "x86.vmexit_on_pause", "x86.kvm_pv", "x86.pv_eoi", "x86.tsc_deadline", "virtio_msix", "rtc.use_localtime",
             "memory.guest_in_core", "config.dump", "gdb.wait")
#: Other keys vmmshim reads as text (their references are expanded by validate(), not mid-boot).
TEXT_KEYS = ("name", "uuid", "pidfile", "firmware.spec", "gdb.address")
SIZE_EXAMPLES = "examples: 512M, 2G, 0x40000000"

_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_SIZE = re.compile(_NUMBER.pattern + r"([kKmMgGtTpPeE]?)([bB]?)")
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_PCI = re.compile(r"^pci\.(\d+)\.(\d+)\.(\d+)\.(.+)$")

_DEFAULTS = {"name": "vm", "cpus": "1", "memory.size": "256M", "acpi_tables": "false", "x86.strictio": "false",
             "x86.strictmsr": "true", "x86.mptable": "true", "x86.x2apic": "false", "x86.kvm_pv": "true",
             "x86.pv_eoi": "true", "x86.tsc_deadline": "true", "virtio_msix": "true", "rtc.use_localtime": "true",
             **{k: d for k, (d, _, _) in VMMSHIM_KEYS.items() if k not in ("vmmshim.help", "vmmshim.version")}}


class ConfigError(ValueError):
    """A malformed value: the CLI prints it on one line and exits with status 4."""


def strtol(text):
    """``text`` read as C's ``strtol(text, &end, 0)`` with nothing left over, or None."""
    m = _NUMBER.fullmatch(text)
    return None if m is None else _number(*m.groups())


def _number(sign, digits):
    n = int(digits, 16) if digits[:2] in ("0x", "0X") else int(digits, 8) if digits[0] == "0" else int(digits)
    return -n if sign == "-" else n


def size_words(n):
    """``n`` bytes in the largest binary unit that divides it: ``1 MiB``, ``3 GiB``, ``512 bytes``."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def parse_memsize(text, subject):
    """Guest memory in bytes from ``text`` (``vm_parse_memsize``); ``subject`` (``-m 2X``, ``memory.size=2X``)
    opens the ConfigError's message."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ConfigError(f"{subject} is not a memory size ({SIZE_EXAMPLES})")
    sign, digits, unit, byte = m.groups()
    n = _number(sign, digits)
    if not unit and not byte:
        n = n * MiB if 0 <= n < BARE_MIB_BELOW else n
    else:
        n <<= _SHIFT[unit.lower()]
    if not MEMSIZE_MIN <= n <= MEMSIZE_MAX:
        raise ConfigError(f"{subject} is too {'large' if n > MEMSIZE_MAX else 'small'}: guest memory must be "
                          f"between {size_words(MEMSIZE_MIN)} and {size_words(MEMSIZE_MAX)}")
    return n


def range_words(lo, hi, words=str):
    if lo is not None and hi is not None:
        return f"between {words(lo)} and {words(hi)}"
    return f"at least {words(lo)}" if lo is not None else f"at most {words(hi)}"


def split_option(text):
    """``(key, value)`` of a ``key=value`` option (bhyve's ``parse_config_option``: an empty value is refused)."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise ConfigError(f"{text!r} is not key=value")
    if not value:
        raise ConfigError(f"{text!r} has no value after '='")
    return key, value


def pci_key(key):
    """``(bus, slot, func, option)`` of a ``pci.B.S.F.OPTION`` key; ConfigError off bus 0 or out of range."""
    m = _PCI.match(key)
    if m is None:
        raise ConfigError(f"{key}: a PCI key is pci.BUS.SLOT.FUNCTION.OPTION (e.g. pci.0.4.0.device)")
    bus, slot, func = (int(x) for x in m.groups()[:3])
    if bus != 0:
        raise ConfigError(f"{key}: vmmshim has PCI bus 0 only (pci.0.SLOT.FUNCTION)")
    if slot >= PCI_SLOTS or func >= PCI_FUNCS:
        raise ConfigError(f"{key}: PCI slot {slot} function {func} is out of range (slots 0-{PCI_SLOTS - 1}, "
                          f"functions 0-{PCI_FUNCS - 1})")
    return bus, slot, func, m.group(4)


class Config:
    def __init__(self):
        self.values = dict(_DEFAULTS)
        self.explicit = set()           # keys set by the user (bhyve's calc_topology tells cpus=N from none)

    # -- setting ---------------------------------------------------------------------------------------------

    def set(self, key, value):
        value = str(value)
        if not _KEY.match(key):
            raise ConfigError(f"invalid configuration key {key!r} (dotted names of letters, digits, _ and -)")
        problem = unknown_vmmshim_key(key)
        if problem:
            raise ConfigError(problem)
        if key.startswith("pci."):
            pci_key(key)
        if key in NOT_SUPPORTED_YET:
            what, instead = NOT_SUPPORTED_YET[key]
            raise ConfigError(f"{key}={value}: {what} is not supported yet ({instead})")
        for other in self.values:
            if other.startswith(key + "."):
                raise ConfigError(f"{key}={value}: {key} is a node of the configuration tree ({other} is set)")
            if key.startswith(other + "."):
                raise ConfigError(f"{key}={value}: {other} is a value, so it cannot hold {key}")
        self.values[key] = value
        self.explicit.add(key)

    def set_option(self, text):
        """``-o key=value`` (or a ``-k`` line)."""
        self.set(*split_option(text))

    def load_file(self, path):
        """``-k file``: ``key=value`` lines; a line whose first non-blank character is ``#`` is a comment (bhyve
        reads the rest of a line as the value, ``#`` included)."""
        from .loader.common import read_regular_file     # refuses a FIFO or a device without blocking or hanging
        data = read_regular_file(path, "config file")       # InputFileError (a ValueError): one line, status 4
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text at byte {exc.start} (-k takes key=value lines)") from None
        for n, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r").strip()
            if not line or line.startswith("#"):
                continue
            bad = next((c for c in line if ord(c) < 0x20 and c != "\t"), None)
            try:
                if bad is not None:
                    raise ConfigError(f"binary data (byte {ord(bad):#04x}): -k takes key=value lines")
                self.set_option(line)
            except ConfigError as exc:
                raise ConfigError(f"{path}:{n}: {exc}") from None

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, key, default=None):
        """The value of ``key`` with its ``%(var)`` references expanded, or ``default`` when it is not set."""
        raw = self.values.get(key)
        return default if raw is None else self._expand(raw, (key,))

    def _expand(self, value, chain):
        if "%" not in value:
            return value
        out, i = [], 0
        while i < len(value):
            c = value[i]
            if c == "\\":
                out.append(value[i + 1:i + 2])
                i += 2
            elif value.startswith("%(", i) and ")" in value[i + 2:]:
                end = value.index(")", i + 2)
                name = value[i + 2:end]
                subject = f"{chain[0]}={self.values[chain[0]]}"
                if not name:
                    raise ConfigError(f"{subject}: an empty %() reference")
                if name in chain:
                    raise ConfigError(f"{subject}: the references loop ({' -> '.join(chain + (name,))})")
                if len(chain) > EXPAND_DEPTH_MAX:
                    raise ConfigError(f"{subject}: references nest deeper than {EXPAND_DEPTH_MAX} levels")
                if name not in self.values:
                    raise ConfigError(f"{subject}: %({name}) names no configuration key that is set")
                out.append(self._expand(self.values[name], chain + (name,)))
                i = end + 1
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def get_bool(self, key, default=False):
        v = self.get(key)
        if v is None:
            return default
        if v.lower() in TRUE_WORDS:
            return True
        if v.lower() in FALSE_WORDS:
            return False
        raise ConfigError(f"{key}={v} is not a boolean (true or false, on or off, yes or no, 1 or 0)")

    def get_int(self, key, lo=None, hi=None):
        """An integer key (``strtol``'s syntax); a size key (``memory.size``) in bytes. The ConfigError names the
        key, its value and the accepted range in words."""
        v = self.get(key)
        if v is None:
            raise ConfigError(f"{key} is not set")
        if key in SIZE_KEYS:
            n, words = parse_memsize(v, f"{key}={v}"), size_words
        else:
            n, words = strtol(v), str
            if n is None:
                raise ConfigError(f"{key}={v} is not an integer")
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise ConfigError(f"{key}={v} must be {range_words(lo, hi, words)}")
        return n

    def get_names(self, key):
        """A ``names`` key: the PCI device names it lists (``none`` or empty: none), as a frozenset. The
        ConfigError names a device name vmmshim does not have."""
        from bhyve_devices.pci.registry import names
        v = self.get(key) or ""
        got = frozenset(n.strip() for n in v.split(",") if n.strip() and n.strip() != "none")
        unknown = sorted(got - set(names()))
        if unknown:
            raise ConfigError(f"{key}={v}: no device named {unknown[0]!r}")
        return got

    def get_size(self, key="memory.size"):
        return parse_memsize(self.get(key), f"{key}={self.get(key)}")

    def subtree(self, prefix):
        p = prefix + "."
        return {k[len(p):]: self.get(k) for k in self.values if k.startswith(p)}

    def pci_slots(self):
        """``[(bus, slot, func, {options})]`` from ``pci.B.S.F.*`` keys, sorted (ConfigError off bus 0)."""
        slots = {}
        for key in self.values:
            if key.startswith("pci."):
                bus, slot, func, opt = pci_key(key)
                slots.setdefault((bus, slot, func), {})[opt] = self.get(key)
        return [(b, s, f, opts) for (b, s, f), opts in sorted(slots.items())]

    def dump(self):
        """bhyve's ``dump_config``: every ``key=value`` as stored (unexpanded), sorted by key; ``cpus`` only when
        it was set (bhyve has no default for it: it is computed from the topology)."""
        return [f"{k}={v}" for k, v in sorted(self.values.items()) if k != "cpus" or k in self.explicit]

    # -- checking --------------------------------------------------------------------------------------------

    def validate(self):
        """Checks every value vmmshim will read (ConfigError naming the first bad one) and sets ``cpus`` from the
        topology; returns self."""
        self._topology()
        self.get_size("memory.size")
        for key in BOOL_KEYS:
            self.get_bool(key)
        for key, (_, kind, _) in VMMSHIM_KEYS.items():
            if key in self.values:
                self._check_kind(key, kind)
        if "lpc.debug_exit.port" in self.values:
            self.get_int("lpc.debug_exit.port", 0, 0xFFFF)
        if "gdb.port" in self.values:
            self.get_int("gdb.port", 0, 0xFFFF)
        for key in self.values:
            if key in TEXT_KEYS or key.startswith(("lpc.", "pci.")):
                self.get(key)
        self.pci_slots()
        return self

    def _topology(self):
        ncpus = self.get_int("cpus", 1, MAX_VCPUS) if "cpus" in self.explicit else None
        dims = {k: self.get_int(k, 1, MAX_VCPUS) if k in self.values else 1 for k in TOPOLOGY_KEYS}
        if "sockets" not in self.values:
            dims["sockets"] = ncpus or 1
        total = dims["sockets"] * dims["cores"] * dims["threads"]
        shape = " x ".join(f"{k}={dims[k]}" for k in TOPOLOGY_KEYS)
        if ncpus is not None and total != ncpus:
            raise ConfigError(f"cpus={ncpus} does not match the topology {shape} ({total} vCPUs)")
        if total > MAX_VCPUS:
            raise ConfigError(f"the topology {shape} makes {total} vCPUs: vmmshim runs at most {MAX_VCPUS}")
        if ncpus is None:
            self.values["cpus"] = str(total)

    def _check_kind(self, key, kind):
        v = self.get(key)
        if kind == "bool":
            self.get_bool(key)
        elif kind == "provider":
            from ops.nvmm import PROVIDERS
            if v not in PROVIDERS:
                raise ConfigError(f"{key}={v} is not a provider ({', '.join(PROVIDERS)})")
        elif kind.startswith("auto|int"):
            lo, hi = (int(x) for x in kind.split()[1:])
            if v != "auto":
                try:
                    self.get_int(key, lo, hi)
                except ConfigError:
                    raise ConfigError(f"{key}={v} must be auto or a whole number {range_words(lo, hi)}") from None
        elif kind.startswith("int"):
            lo, hi = (int(x) for x in kind.split()[1:])
            self.get_int(key, lo, hi)
        elif kind == "names":
            self.get_names(key)
        elif kind.startswith("number"):
            lo, hi = (int(x) for x in kind.split()[1:])
            try:
                ok = lo <= float(v) <= hi
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"{key}={v} must be a number {range_words(lo, hi)}")


def _ahci_legacy_config():
    from bhyve_devices.ahci.options import legacy_config
    return legacy_config


#: Emulations whose ``-s`` option string has its own grammar (bhyve's ``pe_legacy_config``): name -> the parser
#: of that string into ``{key: value}`` under the slot's prefix.
_LEGACY_CONFIG = {"ahci": _ahci_legacy_config}


def parse_slot(text, config):
    """xhyve/bhyve ``-s [bus:]slot[:func],emulation[,conf]`` into ``pci.0.S.F.*`` keys."""
    parts = text.split(",", 2)
    if len(parts) < 2 or not parts[1]:
        raise ConfigError(f"-s takes slot[:func],emulation[,conf], got {text!r}")
    m = re.match(r"^(?:(\d+):)?(\d+)(?::(\d+))?$", parts[0])
    if not m:
        raise ConfigError(f"invalid PCI slot {parts[0]!r} in -s {text}")
    if m.group(1) is not None and m.group(3) is not None:
        bus, slot, func = int(m.group(1)), int(m.group(2)), int(m.group(3))
    elif m.group(1) is not None:
        bus, slot, func = 0, int(m.group(1)), int(m.group(2))
    else:
        bus, slot, func = 0, int(m.group(2)), 0
    if bus != 0:
        raise ConfigError(f"-s {text}: vmmshim has PCI bus 0 only")
    if not 0 <= slot < PCI_SLOTS or not 0 <= func < PCI_FUNCS:
        raise ConfigError(f"-s {text}: PCI slot {parts[0]} out of range (slots 0-{PCI_SLOTS - 1}, "
                          f"functions 0-{PCI_FUNCS - 1})")
    prefix = f"pci.{bus}.{slot}.{func}"
    if config.get(prefix + ".device"):
        raise ConfigError(f"-s {text}: PCI slot {bus}:{slot}:{func} is already occupied")
    config.set(prefix + ".device", parts[1])
    legacy = _LEGACY_CONFIG.get(parts[1])
    if legacy is not None and len(parts) == 3:      # bhyve's pe_legacy_config: the emulation reads its own string
        try:
            keys = legacy()(parts[2])
        except ValueError as exc:
            raise ConfigError(f"-s {text}: {exc}") from None
        for k, v in keys.items():
            config.set(f"{prefix}.{k}", v)
        return
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
    """``-l com1,stdio`` / ``-l com2,/dev/ttyX`` / ``-l debug-exit[,PORT]``; ``-l bootrom,...`` (UEFI) is refused:
    not supported yet."""
    parts = text.split(",", 1)
    dev = parts[0].lower()
    arg = parts[1] if len(parts) > 1 else ""
    try:
        if dev == "debug-exit":     # QEMU's isa-debug-exit, for guest test suites: -l debug-exit[,PORT]
            config.set("lpc.debug_exit.port", arg or DEBUG_EXIT_PORT)
            config.get_int("lpc.debug_exit.port", 0, 0xFFFF)
            return
        if dev == "bootrom":
            what, instead = NOT_SUPPORTED_YET["lpc.bootrom"]
            raise ConfigError(f"{what} (lpc.bootrom) is not supported yet ({instead})")
    except ConfigError as exc:
        raise ConfigError(f"-l {text}: {exc}") from None
    if dev not in LPC_DEVICES:
        raise ConfigError(f"unknown LPC device {parts[0]!r} in -l {text} ({', '.join(LPC_DEVICES)}; "
                          "-l help lists them)")
    if not arg:
        raise ConfigError(f"-l {text}: {dev} needs a backend (stdio, autopty, a tty path, tcp=ADDR:PORT, "
                          "unix:PATH or file:PATH)")
    config.set(f"lpc.{dev}.path", arg)
