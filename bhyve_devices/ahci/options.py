"""The ports of an AHCI controller from bhyve's options (``pci_ahci.c``: ``pci_ahci_legacy_config``, the
``port.N.*`` configuration nodes, ``blockif_legacy_config``), and the opened backends the VM hands the device.

The forms, each turned into :class:`PortSpec` objects by :func:`port_specs`:

- ``-s N,ahci,hd:PATH[,OPT...][,cd:PATH[,OPT...]]...``: a port per ``hd:``/``cd:`` entry, numbered from 0 in
  order (an entry with nothing after its type leaves its port empty, as bhyve). :func:`legacy_config` turns the
  string into bhyve's keys (``port.0.type=hd``, ``port.0.path=PATH``, ``port.0.ro=true``...);
- ``-s N,ahci-hd,PATH[,OPT...]`` and ``-s N,ahci-cd,PATH[,OPT...]``: port 0 (``ahci`` also takes a lone
  ``hd:PATH[,OPT...]`` or ``cd:PATH[,OPT...]`` this way: the command line stores it as ``path`` plus flags);
- bhyve configuration keys ``port.P.type`` (``hd`` or ``cd``), ``port.P.path`` and the port's options as
  ``port.P.OPT``, for P in 0-31.

A port's options: ``ro`` (a disk opened read-only; a CD always is), ``nodelete`` (no TRIM), ``sectorsize=L[/P]``
(a disk's logical and physical sector sizes: powers of two, 512-4096 logical), ``ser=`` (IDENTIFY's serial
number, 20 characters; default ``BHYVE-XXXX-XXXX-XXXX`` from the MD5 of the path, as bhyve), ``model=``,
``rev=`` (firmware revision), ``nmrr=`` (nominal media rotation rate; 1: a solid-state disk), and ``nocache``,
``direct``, ``sync`` (accepted, ignored). Errors are ValueErrors naming the port.

Not supported: bhyve's ``bootindex`` and the block backends other than a file (``path`` is the image).
"""

import dataclasses
import hashlib
import re

from .layouts import MAX_PORTS

HD, CD = "hd", "cd"
EMULATIONS = {"ahci": None, "ahci-hd": HD, "ahci-cd": CD}      #: name -> the type of its port 0 shorthand
PORT_KEYS = frozenset(("type", "path", "ro", "nodelete", "sectorsize", "ser", "model", "rev", "nmrr", "nocache",
                       "direct", "sync"))
_FALSE = ("false", "0", "no", "off")
_PORT_KEY = re.compile(r"^port\.([^.]+)\.(.+)$")
_SPLIT = re.compile(r",(?=(?:hd|cd):)")


def is_true(v):
    return v is True or (isinstance(v, str) and v.lower() not in _FALSE)


@dataclasses.dataclass
class PortSpec:
    """One port as configured (nothing opened)."""
    port: int
    kind: str                       #: HD or CD
    path: str
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def atapi(self):
        return self.kind == CD

    @property
    def readonly(self):
        return self.atapi or is_true(self.options.get("ro", False))

    def serial(self):
        """IDENTIFY's serial number: ``ser=``, or bhyve's from the MD5 of the path."""
        ser = self.options.get("ser")
        if ser is not None:
            return str(ser)
        d = hashlib.md5(self.path.encode()).digest()
        return "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(d[:6])

    def sector_sizes(self):
        """``(logical, physical)`` from ``sectorsize=L[/P]`` (512 for a CD's IDENTIFY; it reads 2048)."""
        text = self.options.get("sectorsize")
        if text is None or self.atapi:
            return 512, 512
        log, _, phys = str(text).partition("/")
        try:
            logical, physical = int(log, 0), int(phys or log, 0)
        except ValueError:
            raise ValueError(f"port {self.port}: sectorsize={text} is not L[/P]") from None
        pow2 = lambda n: n > 0 and not n & (n - 1)   # noqa: E731
        if not (pow2(logical) and pow2(physical) and 512 <= logical <= 4096 and logical <= physical <= 65536):
            raise ValueError(f"port {self.port}: sectorsize={text}: powers of two, 512-4096 logical, "
                             "physical at least the logical size")
        return logical, physical

    def attach(self, backend):
        return AttachedPort(self, backend)


@dataclasses.dataclass
class AttachedPort:
    """A port with its opened :class:`~bhyve_devices.backends.BlockBackend`."""
    spec: PortSpec
    backend: object


class AhciPorts:
    """What the VM puts in the device's ``backend`` option: the opened ports, closed together."""

    def __init__(self, ports):
        self.ports = list(ports)

    def close(self):
        for p in self.ports:
            p.backend.close()


def _blockif_keys(port, kind, text):
    """``PATH[,OPT|,KEY=VALUE]...`` of one port as ``port.P.*`` keys (bhyve's ``blockif_legacy_config``)."""
    parts = text.split(",")
    keys = {f"port.{port}.type": kind, f"port.{port}.path": parts[0]}
    for opt in filter(None, parts[1:]):
        k, eq, v = opt.partition("=")
        if k not in PORT_KEYS or k in ("type", "path"):
            raise ValueError(f"port {port}: unknown option {opt!r} ({', '.join(sorted(PORT_KEYS - {'type', 'path'}))})")
        keys[f"port.{port}.{k}"] = v if eq else "true"
    return keys


def legacy_config(text):
    """bhyve's ``pci_ahci_legacy_config``: ``hd:PATH[,OPT...],cd:PATH[,OPT...]...`` -> ``{port.P.KEY: value}``."""
    keys = {}
    if not text:
        return keys
    entries = _SPLIT.split(text)
    if len(entries) > MAX_PORTS:
        raise ValueError(f"{len(entries)} ports given: an AHCI controller has {MAX_PORTS}")
    for port, entry in enumerate(entries):
        kind, colon, rest = entry.partition(":")
        if not colon or kind not in (HD, CD):
            raise ValueError(f"port {port}: {entry!r} is not hd:PATH[,OPTIONS] or cd:PATH[,OPTIONS]")
        if rest:
            keys.update(_blockif_keys(port, kind, rest))
    return keys


def port_legacy_config(kind, text):
    """``ahci-hd``/``ahci-cd``'s ``PATH[,OPT...]``: port 0 of ``kind``."""
    if not text:
        raise ValueError(f"ahci-{kind} needs a path")
    return _blockif_keys(0, kind, text)


def _top_level_port(name, opts):
    """The ``path`` (+ flags) the command line stored for ``-s N,NAME,FIRST[,OPT...]`` as ``port.0.*`` keys."""
    path = opts.get("path")
    if path is None:
        return {}
    kind = EMULATIONS[name]
    if kind is None:
        kind, colon, path = str(path).partition(":")
        if not colon or kind not in (HD, CD):
            raise ValueError(f"port 0: {opts['path']!r} is not hd:PATH[,OPTIONS] or cd:PATH[,OPTIONS]")
        if not path:
            return {}
    keys = {"port.0.type": kind, "port.0.path": path}
    for k, v in opts.items():
        if k in PORT_KEYS and k not in ("type", "path"):
            keys[f"port.0.{k}"] = v
    return keys


def port_specs(name, opts):
    """The :class:`PortSpec` list (by port number) of emulation ``name`` (``ahci``, ``ahci-hd``, ``ahci-cd``) from
    ``opts``: the legacy ``-s`` option string, or a dict of bhyve configuration keys (see the module docstring)."""
    if name not in EMULATIONS:
        raise ValueError(f"{name} is not an AHCI emulation ({', '.join(EMULATIONS)})")
    if opts is None:
        opts = {}
    if isinstance(opts, str):
        keys = legacy_config(opts) if EMULATIONS[name] is None else port_legacy_config(EMULATIONS[name], opts)
    else:
        keys = {k: v for k, v in opts.items() if k.startswith("port.")}
        top = _top_level_port(name, opts)
        if top and any(k.startswith("port.0.") for k in keys):
            raise ValueError("port 0 is given twice (a path and port.0 keys)")
        keys.update(top)
        if not keys and EMULATIONS[name] is not None:
            raise ValueError(f"{name} needs a path")
    by_port = {}
    for key, value in keys.items():
        m = _PORT_KEY.match(key)
        if m is None:
            raise ValueError(f"{key}: an AHCI port key is port.P.OPTION")
        try:
            port = int(m.group(1), 10)
        except ValueError:
            port = -1
        if not 0 <= port < MAX_PORTS:
            raise ValueError(f"port {m.group(1)}: out of range (an AHCI controller has ports 0-{MAX_PORTS - 1})")
        by_port.setdefault(port, {})[m.group(2)] = value
    specs = []
    for port in sorted(by_port):
        o = by_port[port]
        kind, path = o.pop("type", None), o.pop("path", None)
        if kind not in (HD, CD):
            raise ValueError(f"port {port}: type {kind!r} is not hd or cd" if kind is not None else
                             f"port {port}: no type (port.{port}.type=hd or cd)")
        if not path:
            raise ValueError(f"port {port}: no path for the {kind} image")
        unknown = sorted(set(o) - PORT_KEYS)
        if unknown:
            raise ValueError(f"port {port}: unknown option {unknown[0]!r} ({', '.join(sorted(PORT_KEYS))})")
        spec = PortSpec(port, kind, str(path), o)
        spec.sector_sizes()             # checked now, before anything is opened
        specs.append(spec)
    return specs
