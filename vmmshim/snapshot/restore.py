"""Resuming a checkpoint (``vmmshim -r FILE``, bhyve's ``-r``): the configuration, the checks, the states.

:func:`prepare` reads the checkpoint (:mod:`.files`: every file checked against the others) and returns the
configuration to build the VM from: the keys the checkpoint was taken with, overridden by the keys given on this
command line (another console, a disk image at another path, ``-o vmmshim.provider=soft``), minus the
checkpoint's own ``restore``. What cannot change under a running guest is refused with one line: the memory size
and the vCPU count, a disk image whose size changed, or (unless ``-o vmmshim.restore_force=true``) whose
modification time changed where it is the same path.

:meth:`Restore.apply`, once the VM, its platform and its PCI devices are built from that configuration (guest
memory already mapped from the memory file, copy-on-write: ``HostMemory(path=...)``): the timer service's clock
has moved on since the checkpoint, by ``shift_ns``; the kernel side (``vm_restore``) and every device take their
saved states with that shift, so the guest's timers stand where they stood. A device the checkpoint names that
this VM lacks, or one it lacks a state for, is an error naming it. The vCPUs that had started then run from their
saved state (:attr:`Restore.started`); the doorbells are rung once, so a queue kicked just before the checkpoint
is served; each virtio-net link goes down for :data:`LINK_DOWN_NS` and comes up again.

Not supported: restoring into a running VM, a different machine layout (memory size, vCPUs, PCI slots).
"""

import os

from bhyve_devices.snapshot import SnapshotError

from . import files
from .checkpoint import devices_of
from .files import CheckpointError

FIXED_KEYS = ("memory.size", "cpus", "sockets", "cores", "threads")
LINK_DOWN_NS = 500_000_000      # how long a restored VM's network links stay down


class Restore:
    def __init__(self, base, meta, kern):
        self.base, self.meta, self.kern = base, meta, kern
        self.memory_path = base
        self.started = sorted(int(v) for v, st in kern.get("vcpus", {}).items()
                              if isinstance(st, dict) and st.get("started"))

    def apply(self, vm):
        """Puts the saved states into ``vm`` (built from :func:`prepare`'s configuration, not yet run)."""
        shift = vm.timers.now_ns() - int(self.meta["timer_ns"])
        try:
            vm.ops.vm_restore(vm.vmi, self.kern, shift)
        except (SnapshotError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.base}.kern: {_words(exc)}") from None
        saved = self.meta["devices"]
        devices = devices_of(vm)
        extra, missing = sorted(set(saved) - set(devices)), sorted(set(devices) - set(saved))
        if extra:
            raise CheckpointError(f"the checkpoint has a device {extra[0]!r} this VM does not")
        if missing:
            raise CheckpointError(f"the checkpoint has no state for {missing[0]!r}")
        for name, dev in devices.items():
            try:
                dev.restore(saved[name], shift)
            except (SnapshotError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{name}: {_words(exc)}") from None
        for v in self.started:
            vm.ops.vm_activate_cpu(vm.vmi, v)

    def after_start(self, vm):
        vm.doorbells.ring_all()
        self.bounce_links(vm)

    @staticmethod
    def bounce_links(vm):
        """Each virtio-net link goes down and, :data:`LINK_DOWN_NS` later, up again: the guest sees that its
        connections (a tap's, slirp's) did not survive the checkpoint."""
        from bhyve_devices.virtio.net import VirtioNet
        from bhyve_devices.virtio.transport import VirtioPciDevice
        nets = [d.vdev for d in devices_of(vm).values()
                if isinstance(d, VirtioPciDevice) and isinstance(d.vdev, VirtioNet)]
        for net in nets:
            net.set_link(False)
        if nets:
            vm.timers.arm(vm.timers.now_ns() + LINK_DOWN_NS, lambda: [n.set_link(True) for n in nets])


def _words(exc):
    return str(exc) if not isinstance(exc, KeyError) else f"no {exc.args[0]!r} in the saved state"


def prepare(cfg):
    """``(Restore, config)`` for ``cfg`` (which has ``restore``); CheckpointError or ConfigError with one line."""
    from ..config import Config, ConfigError
    base = os.path.abspath(cfg.get("restore"))
    meta, kern = files.read(base)
    new = Config()
    try:
        for line in meta["config"]:
            new.set_option(line)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{base}.meta: its configuration does not load: {exc}") from None
    for key in sorted(cfg.explicit):
        if key == "restore":
            continue
        if key in FIXED_KEYS and key in new.values and cfg.values[key] != new.values[key]:
            raise ConfigError(f"{key}={cfg.values[key]}: the checkpoint was taken with {new.values[key]} "
                              f"(it cannot change on restore)")
        new.set(key, cfg.values[key])
    new.validate()
    if new.get_int("cpus", 1, 64) != meta.get("ncpus") or \
            new.get_int("memory.size", 1 << 20) != meta["memory"].get("size"):
        raise CheckpointError(f"{base}.meta: the checkpoint's memory or vCPU count does not match its configuration")
    _check_disks(new, meta, force=cfg.get_bool("vmmshim.restore_force"))
    return Restore(base, meta, kern), new


def _check_disks(cfg, meta, force):
    saved = meta.get("disks") or []
    paths = files.disk_paths(cfg)
    if len(paths) != len(saved):
        raise CheckpointError(f"the checkpoint had {len(saved)} disk image(s), this configuration has {len(paths)}")
    for path, old in zip(paths, saved):
        try:
            now = files.disk_facts(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: {exc.strerror}") from None
        if now["size"] != old["size"]:
            raise CheckpointError(f"{path}: {now['size']} bytes, {old['size']} at the checkpoint: not the same disk")
        if now["path"] == old["path"] and now["mtime_ns"] != old["mtime_ns"] and not force:
            raise CheckpointError(f"{path}: changed since the checkpoint (modified); -o vmmshim.restore_force=true "
                                  f"restores anyway")
