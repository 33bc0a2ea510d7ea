"""The PCI emulation-name registry, bhyve's ``PCI_EMUL_SET`` linker set of ``struct pci_devemu``.

``@register("name")`` on a :class:`~bhyve_devices.pci.device.PciDevice` subclass makes it reachable by the name
used on the command line (``-s 4,virtio-blk,disk.img``) and in bhyve config keys (``pci.0.4.0.device``);
:func:`lookup` returns the class and :func:`create` builds one as ``cls(opts)`` (``opts`` a dict of the
emulation's bhyve config keys, or None), the counterpart of ``pe_init(pi, nvl)``. The built-in ``hostbridge``,
``amd_hostbridge`` and ``lpc`` register on first lookup; ``bhyve_devices.virtio`` registers its devices when
importable.

Not supported: ``pe_legacy_config`` (turning a ``-s`` option string into keys is the command line's job) and
``pe_alias``.
"""

import importlib

_EMULATIONS = {}
_BUILTIN = ("bhyve_devices.pci.hostbridge", "bhyve_devices.pci.lpc")
_OPTIONAL = ("bhyve_devices.virtio", "bhyve_devices.ahci", "bhyve_devices.nvme")
_loaded = False


def register(name):
    """Class decorator: registers the emulation ``name`` (a second class under the same name is an error)."""
    def deco(cls):
        old = _EMULATIONS.get(name)
        if old is not None and old is not cls:
            raise ValueError(f"PCI emulation {name!r} is already registered by {old.__qualname__}")
        _EMULATIONS[name] = cls
        cls.emul_name = name
        return cls
    return deco


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN:
        importlib.import_module(mod)
    for mod in _OPTIONAL:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            if e.name != mod:          # the package exists but is broken: say so
                raise


def lookup(name):
    """The class registered as ``name``; KeyError naming the known emulations otherwise."""
    _load()
    try:
        return _EMULATIONS[name]
    except KeyError:
        raise KeyError(f"unknown PCI emulation {name!r} (known: {', '.join(sorted(_EMULATIONS))})") from None


def create(name, opts=None):
    return lookup(name)(opts)


def names():
    _load()
    return sorted(_EMULATIONS)
