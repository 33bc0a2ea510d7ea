"""Snapshot and restore of the virtio PCI transport (issue 23, :mod:`bhyve_devices.snapshot`; bhyve's
``vi_pci_snapshot`` in ``virtio.c``): :class:`VirtioSnapshotMixin` is part of
:class:`~bhyve_devices.virtio.transport.VirtioPciDevice`.

The state is the PCI function's (:mod:`bhyve_devices.pci.devsnap`: configuration space, BARs, MSI, MSI-X table
and PBA, INTx) plus

- ``"virtio"``: the transport registers: device status, ISR, the negotiated features and whether the modern
  interface negotiated them, the driver's features as written, both feature selects, the queue select, the
  configuration MSI-X vector, the configuration generation, and every queue
  (:meth:`~bhyve_devices.virtio.virtqueue.Virtqueue.snapshot_state`: size, addresses, ready, MSI-X vector,
  ``last_avail``, ``used_idx``, ``signalled_used``, the ring features);
- ``"vdev"``: the device side (:meth:`~bhyve_devices.virtio.device.VirtioDevice.snapshot_state`).

Restore checks the virtio part first, restores the PCI function, then the registers and queues (each ready queue
maps its rings in the guest memory the device was built with: the VM restores that memory itself), then the
device side. Nothing is sent to the guest; a chain the driver makes available after the restore is served from
the saved ``last_avail`` and returned at the saved ``used_idx``.

Not saved: the error list and the interrupt count (diagnostics), the doorbell ring (the VMM's wiring).
"""

from bhyve_devices import snapshot as S

from .transport_legacy import NO_VECTOR

_LIMITS = dict(status=1 << 8, isr=1 << 8, negotiated=1 << 64, driver_features=1 << 64, queue_sel=1 << 16,
               config_vector=1 << 16, device_feature_select=1 << 32, driver_feature_select=1 << 32,
               config_generation=1 << 8)


class VirtioSnapshotMixin:
    snapshot_keys = ("pci", "virtio", "vdev")

    def quiesced(self):
        """The device side's threads kept out (``bhyve_devices.snapshot.Quiescent``)."""
        return self.vdev.quiesced()

    def snapshot(self):
        vdev = self.vdev.snapshot_state()       # first: a device that cannot be saved refuses before anything
        state = super().snapshot()
        with self._vlock:
            v = {n: getattr(self, n) for n in _LIMITS}
            v["modern"] = self.modern
            v["queues"] = [q.snapshot_state() for q in self.queues]
        state["virtio"] = v
        state["vdev"] = vdev
        return state

    def _virtio_parse(self, state):
        S.check(self, state, self.snapshot_keys)
        v = state["virtio"]
        name = self.name
        if not isinstance(v, dict):
            raise S.SnapshotError(f"{name}: the virtio state is not a mapping")
        for n, limit in _LIMITS.items():
            x = v.get(n)
            if not S.int_in(x, 0, limit - 1):
                raise S.SnapshotError(f"{name}: virtio {n} = {x!r:.40}")
        if not isinstance(v.get("modern"), bool):
            raise S.SnapshotError(f"{name}: virtio modern = {v.get('modern')!r:.40}")
        queues = v.get("queues")
        if not isinstance(queues, list) or len(queues) != len(self.queues):
            raise S.SnapshotError(f"{name}: {len(self.queues)} queues expected")
        vectors = [v["config_vector"]] + [q.get("msix_vector") if isinstance(q, dict) else None for q in queues]
        bad = [x for x in vectors if isinstance(x, int) and x != NO_VECTOR and x >= self._nvec]
        if bad:
            raise S.SnapshotError(f"{name}: MSI-X vector {bad[0]} beyond the {self._nvec} of the table")
        return v

    def restore(self, state, shift_ns):
        v = self._virtio_parse(state)
        super().restore(state, shift_ns)
        with self._vlock:
            for q, qs in zip(self.queues, v["queues"]):
                q.restore_state(qs)
            for n in _LIMITS:
                setattr(self, n, v[n])
            self.modern = v["modern"]
        self.vdev.restore_state(state["vdev"])
