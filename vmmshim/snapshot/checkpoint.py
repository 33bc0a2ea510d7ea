"""Taking a checkpoint of a running VM (bhyve's ``vm_checkpoint``, asked for by ``bhyvectl --checkpoint`` or
``--suspend``; here ``vmmshim ctl``): the quiet point, the states, the files.

1. Every running vCPU is held before its next entry (:mod:`.pause`).
2. The timer thread's callbacks, the doorbell threads and the devices' own threads are kept out
   (``TimerThread.run_lock``, ``Doorbells.held``, ``Quiescent.quiesced``: virtio-net's receive thread), so no
   device moves while it is read and guest memory is written; a request a doorbell thread was serving ends first.
3. The kernel side (``vm_snapshot``), then each device by the name the VM gives it (the platform's, ``pci.B.S.F``
   for each PCI function, ``pci-host``), then guest memory, are written (:mod:`.files`). A device that is not
   :class:`~bhyve_devices.snapshot.Snapshottable`, or refuses, ends the checkpoint with its name.
4. The vCPUs go on (``--checkpoint``), or the VM ends with status 1, as powered off (``--suspend``).

Not supported: a checkpoint while gdb holds the guest; devices outside the platform and the PCI bus (none are).
"""

import contextlib
import os
import time

from bhyve_devices.snapshot import Quiescent, SnapshotError, Snapshottable

from . import files
from .files import CheckpointError
from .pause import PauseError


def devices_of(vm):
    """``{name: device}`` of everything a checkpoint saves besides the kernel side."""
    out = {}
    if vm.platform is not None:
        out.update(vm.platform.devices())
    out.update(vm.extra_devices)
    host = vm.pci_host
    if host is not None:
        out["pci-host"] = host
        for (slot, func), dev in sorted(host.functions.items()):
            out[f"pci.0.{slot}.{func}"] = dev
    return out


def device_states(devices):
    """Every device's state (``devices``: :func:`devices_of`, at the quiet point); CheckpointError naming the first
    that cannot be saved."""
    states = {}
    for name, dev in devices.items():
        if not isinstance(dev, Snapshottable):
            raise CheckpointError(f"{name}: this device cannot be checkpointed yet")
        try:
            states[name] = dev.snapshot()
        except SnapshotError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
    return states


def take(vm, base, config, disks=(), stop=False):
    """Checkpoints ``vm`` into ``base`` (``base``, ``base.kern``, ``base.meta``). ``config``: the configuration
    dump (``Config.dump()``); ``disks``: the image paths whose size and mtime restore checks. With ``stop`` the VM
    then ends with status 1. Returns the seconds the guest stood still; CheckpointError (one line) if it failed,
    and then the VM runs on."""
    from ..vm import EXIT_POWEROFF
    base = os.path.abspath(base)
    if os.path.isdir(base):
        raise CheckpointError(f"{base}: is a directory")
    try:
        disk_facts = [files.disk_facts(p) for p in disks]
    except OSError as exc:
        raise CheckpointError(f"{exc.filename}: {exc.strerror}") from None
    t0 = time.monotonic()
    try:
        vm.pauser.pause()
    except PauseError as exc:
        raise CheckpointError(f"the vCPUs could not be paused: {exc}") from None
    done = False
    try:
        with vm.timers.run_lock, vm.doorbells.held(), contextlib.ExitStack() as quiet:
            devices = devices_of(vm)
            for dev in devices.values():
                if isinstance(dev, Quiescent):
                    quiet.enter_context(dev.quiesced())    # a device's own thread (virtio-net's receive)
            vm.ops.vm_drain_posted(vm.vmi)          # port writes KVM still holds reach their devices first
            now = vm.timers.now_ns()
            try:
                kern = vm.ops.vm_snapshot(vm.vmi)
            except SnapshotError as exc:
                raise CheckpointError(str(exc)) from None
            meta = {"config": list(config), "disks": disk_facts, "devices": device_states(devices), "timer_ns": now,
                    "taken": time.time(), "provider": vm.ops.provider.name,
                    "memsize": vm.config.memsize, "ncpus": vm.config.ncpus}
            files.write(base, vm.ram.view(), kern, meta)
        done = True
    finally:
        if stop and done:
            vm.stop(EXIT_POWEROFF, None)
        vm.pauser.resume()
    return time.monotonic() - t0
