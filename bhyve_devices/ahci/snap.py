"""Snapshot and restore of the AHCI HBA (issue 23, the protocol of :mod:`bhyve_devices.snapshot`; bhyve's
``pci_ahci_snapshot``): what :class:`~bhyve_devices.ahci.pci.AhciPci` saves under ``"ahci"`` next to the PCI
function's state (:mod:`bhyve_devices.pci.devsnap`).

Saved (:func:`hba_state`), all of it guest-visible:

- ``config``: the number of ports, PI and CAP, and per port the kind of device and its size: a restore into a
  controller built otherwise (another port list, a resized image) is refused;
- the HBA: GHC, IS and the INTx level the HBA drives;
- per port: PxCLB/PxCLBU, PxFB/PxFBU, PxIS, PxIE, PxCMD (ST, FRE, FR, CR, CCS...), PxTFD, PxSIG, PxSSTS, PxSCTL,
  PxSERR, PxSACT, PxCI, and the engine's state: the command list and received-FIS addresses latched when ST and
  FRE were set, the round-robin position, whether an error holds the port until ST is cleared, a software reset
  begun (SRST set, not yet cleared);
- the device: a disk's SET FEATURES / SET MULTIPLE settings (write cache, read look-ahead, transfer mode, the
  multiple count) and its NCQ command error log; a CD's sense data (key, ASC, ASCQ), transfer mode, medium
  present, the media event not yet reported and the PREVENT ALLOW MEDIUM REMOVAL lock.

Commands the guest issued and the engine has not taken (PxCI bits, PxSACT bits set before their PxCI) are only
register bits here: the command itself is still in guest memory, where the engine reads it when it takes the
slot, so they are saved as the bits and served after the restore (the restore wakes the engine of every started
port with issued slots). This engine holds no command between taking a slot and ending it except while it serves
it; the HBA is :class:`~bhyve_devices.snapshot.Quiescent` (:func:`quiesced`: the port threads take no new slot and
the one being served ends first), and a snapshot taken while a command is being served anyway (a transfer that
did not end within :data:`QUIET_TIMEOUT`) is refused with SnapshotError: its data may be half moved.

Not saved: ``errors`` (diagnostics), the epoch (it only tells a command in flight from a reset, and none is in
flight), the IDENTIFY data (rebuilt from the settings), the device's identity (from the configuration).
"""

import contextlib
import time
from functools import partial

from bhyve_devices import snapshot as S

from . import identify
from .atapi import MEDIA_EVENT_NEW, MEDIA_EVENT_NONE, MEDIA_EVENT_REMOVED
from .layouts import CLB_ALIGN, CMD_ST, FB_ALIGN, GHC_AE, GHC_IE, IE_MASK, MAX_SLOTS

_bool = partial(S.want_bool, "ahci")
_dict = partial(S.want_dict, "ahci")

QUIET_TIMEOUT = 30.0                #: seconds :func:`quiesced` waits for a command being served to end
M32, M64 = (1 << 32) - 1, (1 << 64) - 1
PORT_INTS = dict(clb=M32 & ~CLB_ALIGN, clbu=M32, fb=M32 & ~FB_ALIGN, fbu=M32, is_=M32, ie=IE_MASK, cmd=M32,
                 tfd=0xFFFF, sig=M32, ssts=M32, sctl=0xFFF, serr=M32, sact=M32, ci=M32, cmdlist=M64,
                 next_slot=MAX_SLOTS - 1)      #: register / field -> the bits it may hold
PORT_BOOLS = ("waitforclear", "srst")
PORT_KEYS = tuple(PORT_INTS) + PORT_BOOLS + ("fisbase", "device")
HBA_KEYS = ("config", "ghc", "is_", "intx", "ports")
ATA_KEYS = ("multiple", "xfer", "write_cache", "lookahead", "error_log")
ATAPI_KEYS = ("sense", "xfer", "locked", "medium", "event")


# -- saving ---------------------------------------------------------------------------------------------------------
def _device_config(dev):
    if dev is None:
        return None
    return ["atapi" if dev.atapi else "ata", dev.sectors]


def _config(hba):
    return dict(nports=hba.nports, pi=hba.pi, cap=hba.cap, devices=[_device_config(p.device) for p in hba.ports])


def _device_state(dev):
    if dev is None:
        return None
    if dev.atapi:
        return dict(sense=list(dev.sense), xfer=dev.xfer, locked=dev.locked, medium=dev.medium, event=dev.event)
    log = dev.error_log
    return dict(multiple=dev.multiple, xfer=dev.xfer, write_cache=dev.write_cache, lookahead=dev.lookahead,
                error_log=None if log is None else [log[0], log[1], log[2], S.b2s(log[3])])


def hba_state(hba):
    """The saved state of ``hba`` (the caller holds its lock); SnapshotError while a command is being served."""
    for p in hba.ports:
        if p.serving or p.pending:
            slot = (p.pending & -p.pending).bit_length() - 1
            raise S.SnapshotError(f"ahci: port {p.index}: the command in slot {slot} is being served (its transfer "
                                  "may be half done)")
    ports = []
    for p in hba.ports:
        s = {k: getattr(p, k) for k in tuple(PORT_INTS) + PORT_BOOLS}
        s["fisbase"] = p.fisbase
        s["device"] = _device_state(p.device)
        ports.append(s)
    return dict(config=_config(hba), ghc=hba.ghc, is_=hba.is_, intx=hba._intx, ports=ports)


@contextlib.contextmanager
def quiesced(hba):
    """No port takes a new slot inside; the command being served (on a port's thread) ends first (at most
    :data:`QUIET_TIMEOUT` seconds: then :func:`hba_state` refuses). On leaving, the ports with issued slots go on."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    with hba.lock:
        hba.held += 1
        while any(p.serving for p in hba.ports):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            hba.idle.wait(left)
    try:
        yield
    finally:
        with hba.lock:
            hba.held -= 1
            if not hba.held:
                wake(hba)
            todo, hba.inline = hba.inline, []       # served here (or handed to the thread), as after a register write
        for port in dict.fromkeys(todo):
            port.serve_here()


def wake(hba):
    """Wakes the engine of every started port with issued slots it has not taken (the lock is held)."""
    for p in hba.ports:
        if p.cmd & CMD_ST and p.ci & ~p.pending:
            p.kick()


# -- restoring ------------------------------------------------------------------------------------------------------
def _int(where, v, mask):
    if not S.int_fits(v, mask):
        raise S.SnapshotError(f"ahci: {where} = {v!r:.40} (bits {mask:#x})")
    return v


def _xfer(where, v):
    _int(where, v, 0xFF)
    if not identify.valid_xfer(v):
        raise S.SnapshotError(f"ahci: {where} = {v:#x} is not a transfer mode")
    return v


def _device(where, dev, s):
    """The checked attributes of ``dev``'s saved state ``s``."""
    if dev is None:
        if s is not None:
            raise S.SnapshotError(f"ahci: {where}: a device state for an empty port")
        return {}
    if dev.atapi:
        _dict(where, s, ATAPI_KEYS)
        sense = s["sense"]
        if not isinstance(sense, list) or len(sense) != 3:
            raise S.SnapshotError(f"ahci: {where} sense = {sense!r:.40}")
        key, asc, ascq = (_int(f"{where} sense", x, m) for x, m in zip(sense, (0xF, 0xFF, 0xFF)))
        medium = _bool(f"{where} medium", s["medium"])
        if medium and not dev.sectors:
            raise S.SnapshotError(f"ahci: {where}: a medium in a drive without an image")
        if s["event"] not in (MEDIA_EVENT_NONE, MEDIA_EVENT_NEW, MEDIA_EVENT_REMOVED):
            raise S.SnapshotError(f"ahci: {where} media event = {s['event']!r:.20}")
        return dict(sense=(key, asc, ascq), xfer=_xfer(f"{where} xfer", s["xfer"]),
                    locked=_bool(f"{where} locked", s["locked"]), medium=medium, event=s["event"])
    _dict(where, s, ATA_KEYS)
    n = _int(f"{where} multiple", s["multiple"], 0xFF)
    if n & (n - 1) or n > 128:
        raise S.SnapshotError(f"ahci: {where} multiple = {n}")
    log = s["error_log"]
    if log is not None:
        if not isinstance(log, list) or len(log) != 4:
            raise S.SnapshotError(f"ahci: {where} error_log = {log!r:.40}")
        log = (_int(f"{where} error_log tag", log[0], 0xFF), _int(f"{where} error_log status", log[1], 0xFF),
               _int(f"{where} error_log error", log[2], 0xFF), S.s2b(log[3], 16))
    return dict(multiple=n, xfer=_xfer(f"{where} xfer", s["xfer"]),
                write_cache=_bool(f"{where} write_cache", s["write_cache"]),
                lookahead=_bool(f"{where} lookahead", s["lookahead"]), error_log=log, _ident=None)


def _port(port, s):
    where = f"port {port.index}"
    _dict(where, s, PORT_KEYS)
    regs = {k: _int(f"{where} {k}", s[k], mask) for k, mask in PORT_INTS.items()}
    regs.update({k: _bool(f"{where} {k}", s[k]) for k in PORT_BOOLS})
    fisbase = s["fisbase"]
    regs["fisbase"] = None if fisbase is None else _int(f"{where} fisbase", fisbase, M64)
    if not regs["cmd"] & CMD_ST and (regs["ci"] or regs["sact"]):
        raise S.SnapshotError(f"ahci: {where}: commands issued (PxCI {regs['ci']:#x}, PxSACT {regs['sact']:#x}) "
                              "with PxCMD.ST clear")
    return regs, _device(f"{where} device", port.device, s["device"])


def parse(hba, state):
    """``state`` checked against ``hba``: ``(hba fields, [(port fields, device fields)])``; SnapshotError otherwise."""
    _dict("the HBA state", state, HBA_KEYS)
    if state["config"] != _config(hba):
        raise S.SnapshotError(f"ahci: saved by a controller of {state['config']!r:.160}, this one is {_config(hba)}")
    ghc = _int("GHC", state["ghc"], GHC_AE | GHC_IE)
    if not ghc & GHC_AE:
        raise S.SnapshotError("ahci: GHC.AE clear")
    fields = dict(ghc=ghc, is_=_int("IS", state["is_"], (1 << hba.nports) - 1),
                  _intx=_bool("intx", state["intx"]))
    ports = state["ports"]
    if not isinstance(ports, list) or len(ports) != hba.nports:
        raise S.SnapshotError(f"ahci: {hba.nports} port states expected")
    return fields, [_port(p, s) for p, s in zip(hba.ports, ports)]


def apply(hba, parsed):
    """Puts a :func:`parse`-d state into ``hba`` (the lock is held; nothing is sent to the guest)."""
    fields, ports = parsed
    for k, v in fields.items():
        setattr(hba, k, v)
    for port, (regs, dev) in zip(hba.ports, ports):
        for k, v in regs.items():
            setattr(port, k, v)
        port.pending, port.serving = 0, False
        for k, v in dev.items():
            setattr(port.device, k, v)
