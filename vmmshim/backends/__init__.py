"""The host side of the device models: the backends the VM opens and hands to a device (the devices in
``bhyve_devices/`` are written against ``bhyve_devices/backends.py``'s Protocols and open nothing themselves).

- :mod:`.block`: a raw image file (bhyve ``block_if.c``), with :mod:`.blkfast`, virtio-blk's compiled request,
  :mod:`.nvmefast` and :mod:`.ahcifast`, NVMe's and AHCI's;
- :mod:`.net`: the Linux and NetBSD taps and a socket pair, with their receive poll thread (``net_backends.c``),
  and :mod:`.netfast`, the tap's compiled data path;
- :mod:`.uart`: stdio, a pty, a tty, a file, a Unix socket for the UARTs and virtio-console (``uart_backend.c``);
- :mod:`.rnd`: ``/dev/urandom`` for virtio-rnd;
- :mod:`.p9fs`: the shared directory of virtio-9p (``virtio-9p`` gets ``backend``, the share opened from its
  ``NAME=/path`` option, and bhyve's ``sharename``/``path``/``ro`` keys).

:func:`open_device_backends` turns a PCI emulation's bhyve options into the options its device is built from, as
bhyve's ``pci_vtblk_init``/``pci_vtnet_init``/``pci_vtcon_init`` open their backends before they set the device
up: ``virtio-blk`` gets ``backend`` (a block backend from ``path`` and ``ro``, with the compiled request when
``blk_compiled`` is true), ``virtio-net``/``virtio-tap`` get ``backend`` opened from ``backend``, ``tap`` or
``path`` (the first option of ``-s N,virtio-net,tap0``; ``slirp``), or from ``stream`` (``stream=unix:PATH``) (a
tap with the virtio-net header gets the compiled data path, and slirp its compiled loop, when ``net_compiled`` is
true), with
the keys that are not the device's own (:data:`NET_DEVICE_KEYS`: ``hostfwd``, ``restrict``, ``server``...) as the
backend's options (:func:`.net.open_backend`), ``virtio-console`` gets ``backend`` opened from its
first option (``-s N,virtio-console,autopty``; any :func:`.uart.open_backend` spec, ``tcp=ADDR:PORT`` included) or
from ``backend``, or, for bhyve's ``NAME=PATH`` options, a
:class:`~bhyve_devices.virtio.console.ConsolePorts` of Unix sockets listening at each PATH (a
:class:`.uart.UnixSocketBackend` each: only a stale socket is replaced, the socket is removed when the device is
closed or the process exits), ``virtio-rnd`` gets the host's entropy source.
``ahci``, ``ahci-hd`` and ``ahci-cd`` get ``backend``, an :class:`~bhyve_devices.ahci.options.AhciPorts` of each
port's image (:func:`bhyve_devices.ahci.options.port_specs`; a CD's read-only), as ``pci_ahci_init`` opens a port,
a disk's with AHCI's compiled data command (:mod:`.ahcifast`) when ``blk_compiled`` is true; ``nvme`` gets its
image with NVMe's compiled queue pass (:mod:`.nvmefast`) likewise.
Opening errors are raised as they come (OSError, ValueError) for the caller's one-line message; what was opened
before the error is closed.

Not supported: backends for the other emulations (they have none), sharing one backend between devices.
"""

from bhyve_devices.ahci import options as _ahcidev
from bhyve_devices.nvme import pci as _nvmedev
from bhyve_devices.virtio import blk as _blkdev
from bhyve_devices.virtio import console as _condev
from bhyve_devices.pci.options import as_options, is_true, legacy_options

from . import ahcifast
from . import blkfast
from . import netfast
from . import nvmefast
from . import net as _net
from . import p9fs as _p9fs
from . import uart as _uart
from .block import FileBlockBackend
from .rnd import UrandomSource

#: The option each emulation's opened backend goes in.
BACKEND_OPT = "backend"


def _blk(o):
    o = as_options(o, _blkdev.parse_options)
    path = o.get("path")
    if not path:
        raise ValueError("virtio-blk needs a path")
    accel = blkfast.accelerator() if is_true(o.get("blk_compiled", False)) else None
    o[BACKEND_OPT] = FileBlockBackend(path, readonly=is_true(o.get("ro", o.get("readonly", False))), accel=accel)
    return o


#: virtio-net's own keys (``bhyve_devices/virtio/pci.py`` reads them); the others are its backend's options.
NET_DEVICE_KEYS = frozenset(("device", "backend", "tap", "path", "mac", "slot", "func", "vmname", "guest_memory",
                             "virtio_msix", "single_vector", "net_compiled"))


def _net_legacy_options(text):
    """bhyve's legacy ``NAME[,KEY=VALUE|,FLAG]...`` string -> the keys ``config.parse_slot`` would store (the
    name as ``backend``, a bare flag as ``"true"``)."""
    return legacy_options(text, "backend")


def _netdev_opts(o):
    o = as_options(o, _net_legacy_options)
    spec = o.get("backend", o.get("tap", o.get("path")))
    extra = {k: v for k, v in o.items() if k not in NET_DEVICE_KEYS}
    if "stream" in extra:
        if isinstance(spec, str):
            raise ValueError(f"{spec} and stream= are two backends (give one)")
        spec = _net.STREAM_NAME
    if isinstance(spec, str):
        compiled = is_true(o.get("net_compiled", False))
        be = o[BACKEND_OPT] = _net.open_backend(spec, extra, compiled=compiled)
        if isinstance(be, _net.TapBackend) and be.vnet_hdr and compiled:
            be.accel = netfast.accelerator(be.fileno)
    elif spec is None and extra:
        raise ValueError(f"option {sorted(extra)[0]!r} without a backend ({_net.BACKENDS})")
    return o


def _console(o):
    o = as_options(o, _condev.parse_options)
    spec, ports = _condev.console_config(o)
    if not ports:
        if isinstance(spec, str):
            o[BACKEND_OPT] = _uart.open_backend(spec)
        return o
    opened = []
    try:
        for name, path in ports:
            try:
                opened.append((name, _uart.UnixSocketBackend(path)))
            except OSError as e:
                raise OSError(e.errno, f"cannot create port {name}: {e.strerror}") from None
    except BaseException:
        for _, backend in opened:
            backend.close()
        raise
    o[BACKEND_OPT] = _condev.ConsolePorts(opened)
    return o


def _rnd(o):
    o = as_options(o, lambda s: {})
    o[BACKEND_OPT] = UrandomSource()
    return o


_OPENERS = {"virtio-blk": _blk, "virtio-rnd": _rnd, "virtio-net": _netdev_opts, "virtio-tap": _netdev_opts,
            "virtio-console": _console, "virtio-9p": _p9fs.open_options}


def _ahci(name):
    """The opener of AHCI emulation ``name``: each port's image, closed again if one fails to open; a disk's
    (not a CD's) with AHCI's compiled data command (:mod:`.ahcifast`) when ``blk_compiled`` is true."""
    def opener(o):
        specs = _ahcidev.port_specs(name, o)
        o = dict(o) if isinstance(o, dict) else {}
        compiled = is_true(o.get("blk_compiled", False))
        opened = []
        try:
            for spec in specs:
                accel = ahcifast.accelerator() if compiled and not spec.atapi else None
                opened.append(spec.attach(FileBlockBackend(spec.path, readonly=spec.readonly, accel=accel)))
        except BaseException:
            _ahcidev.AhciPorts(opened).close()
            raise
        o[BACKEND_OPT] = _ahcidev.AhciPorts(opened)
        return o
    return opener


_OPENERS.update((n, _ahci(n)) for n in _ahcidev.EMULATIONS)


def _nvme(o):
    """nvme's image (``-s N,nvme,PATH[,ro]``), opened read-write, or read-only with ``ro`` or when refused."""
    o = as_options(o, _nvmedev.parse_options)
    if not o.get("path"):
        raise ValueError("an image path is needed")
    accel = nvmefast.accelerator() if is_true(o.get("blk_compiled", False)) else None
    o[BACKEND_OPT] = FileBlockBackend(o["path"], readonly=is_true(o.get("ro", False)), nvme_accel=accel)
    return o


_OPENERS["nvme"] = _nvme


def open_device_backends(name, opts):
    """``opts`` (a dict of bhyve config keys, or the legacy ``-s`` option string) for emulation ``name``, with its
    host backend opened (see the module docstring); a new dict, or ``opts`` itself for an emulation without
    backends."""
    opener = _OPENERS.get(name)
    if opener is None:
        return opts
    return opener(opts)


def close_device_backends(opts):
    """Closes the backend :func:`open_device_backends` put in ``opts`` (a device that could not be built)."""
    backend = opts.get(BACKEND_OPT) if isinstance(opts, dict) else None
    if backend is not None and not isinstance(backend, str):
        backend.close()
