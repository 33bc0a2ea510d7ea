"""The virtio emulations by bhyve name, registered with :mod:`bhyve_devices.pci.registry`: ``virtio-blk``,
``virtio-net``, ``virtio-tap``, ``virtio-rnd``, ``virtio-console``.

The registry builds ``cls(opts)``. ``opts`` is the emulation's bhyve config keys as a dict (``sectorsize``,
``nodelete``, ``ser`` for blk; ``mac`` for net) or the legacy ``-s`` option string (``disk.img,ro``,
``tap0,mac=..``). Nothing here opens anything on the host: the VM opens the backend first
(``vmmshim.backends.open_device_backends``) and passes it as ``backend``: a
:class:`~bhyve_devices.backends.BlockBackend` for blk (required), a :class:`~bhyve_devices.backends.NetBackend`
for net (none: frames go nowhere), a :class:`~bhyve_devices.backends.CharBackend` for the console (none: output is
dropped), which the console then starts feeding. Other values the VM itself must supply go in the same dict:
``guest_memory`` (a ``GuestMemory``; or call :meth:`~bhyve_devices.virtio.transport.VirtioPciDevice.set_memory`
before the guest runs), ``virtio_msix`` (``"false"`` for xhyve's ``-W``: one MSI vector, no MSI-X), ``vmname``,
``slot`` and ``func`` (for the default MAC).

Not supported: a backend named by a string (an unopened ``backend``, ``tap`` or ``path`` is an error).
"""

from bhyve_devices.pci.options import as_options, is_false, is_true  # noqa: F401 (re-exported)
from bhyve_devices.pci.registry import register

from . import blk as _blk
from . import net as _net
from .console import VirtioConsole
from .rnd import VirtioRnd
from .transport import VirtioPciDevice

def _single_vector(o):
    v = o.get("virtio_msix", True)
    return bool(o.get("single_vector")) or is_false(v)


def _opened(name, backend, required=False):
    """``backend`` if it is an opened backend object (or None where that is allowed); else a ValueError."""
    if isinstance(backend, str) or (backend is None and required):
        what = f"backend {backend!r} is not open" if backend is not None else "no backend"
        raise ValueError(f"{name}: {what} (the VM opens it: vmmshim.backends.open_device_backends)")
    return backend


@register("virtio-blk")
class VirtioBlkPci(VirtioPciDevice):
    def __init__(self, opts=None):
        o = as_options(opts, _blk.parse_options)
        kw = dict(backend=_opened("virtio-blk", o.get("backend"), required=True),
                  nodelete=is_true(o.get("nodelete", False)))
        if "sectorsize" in o:
            ss = o["sectorsize"]
            if isinstance(ss, str):
                log, _, phys = ss.partition("/")
                kw["sectorsize"], kw["physical_sectorsize"] = int(log, 0), int(phys or log, 0)
            else:
                kw["sectorsize"] = int(ss)
                kw["physical_sectorsize"] = int(o.get("physical_sectorsize", ss))
        ser = o.get("ser", o.get("serial"))
        if ser is not None:
            kw["serial"] = ser
        super().__init__(_blk.VirtioBlock(**kw), o.get("guest_memory"), single_vector=_single_vector(o))


def _net_opts(opts):
    o = as_options(opts, _net.parse_options)
    # bhyve's legacy ``-s N,virtio-net,tap0`` puts the backend first; the command line stores it as ``path``
    backend = _opened("virtio-net", o.get("backend", o.get("tap", o.get("path"))))
    mac = o.get("mac")
    if isinstance(mac, str):
        mac = _net.parse_mac(mac)
    return o, _net.VirtioNet(backend=backend, mac=mac, slot=o.get("slot", 0), func=o.get("func", 0),
                             vmname=o.get("vmname", "vm"))


@register("virtio-net")
class VirtioNetPci(VirtioPciDevice):
    def __init__(self, opts=None):
        o, dev = _net_opts(opts)
        super().__init__(dev, o.get("guest_memory"), single_vector=_single_vector(o))


@register("virtio-tap")
class VirtioTapPci(VirtioNetPci):
    pass


@register("virtio-rnd")
class VirtioRndPci(VirtioPciDevice):
    def __init__(self, opts=None):
        o = as_options(opts, lambda s: {})
        super().__init__(VirtioRnd(o.get("backend")), o.get("guest_memory"), single_vector=_single_vector(o))


@register("virtio-console")
class VirtioConsolePci(VirtioPciDevice):
    def __init__(self, opts=None):
        o = as_options(opts, lambda s: {"backend": s} if s else {})
        self._backend = _opened("virtio-console", o.get("backend"))
        dev = VirtioConsole(self._backend)
        super().__init__(dev, o.get("guest_memory"), single_vector=_single_vector(o))
        if self._backend is not None:
            self._backend.start(dev)

    def close(self):
        super().close()
        if self._backend is not None:
            self._backend.close()
