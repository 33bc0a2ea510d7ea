"""Checkpoints of a running VM and their restore (issue 23; bhyve's ``BHYVE_SNAPSHOT``: ``bhyvectl --checkpoint``,
``--suspend``, ``bhyve -r``).

- :mod:`.pause`: every vCPU held at a quiet point.
- :mod:`.checkpoint`: the states (``ops/vmm_snapshot.py`` for the kernel side, each device's
  ``snapshot()``, ``bhyve_devices/snapshot.py``) and guest memory, written by :mod:`.files`.
- :mod:`.restore`: ``vmmshim -r FILE``: the configuration from the checkpoint, the checks, the states put back.

The control socket that asks for a checkpoint is ``vmmshim/control.py``, its client ``vmmshim ctl``
(``vmmshim/ctl.py``).

Not supported: live migration, incremental or compressed checkpoints.
"""
