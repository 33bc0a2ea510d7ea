"""NVMM primitives (libnvmm v2 in Python) and their providers.

``nvmm_init(name)`` opens one provider: ``"kvm"`` (Linux ``/dev/kvm``, ``ops/nvmm/kvm``), ``"libnvmm"`` (NetBSD's
libnvmm through cffi, ``ops/nvmm/libnvmm``) or ``"soft"`` (a software CPU, ``ops/nvmm/soft``). A provider that
cannot run here raises :class:`ProviderUnavailable` (an ``OSError``) whose message says why in one line.
"""

import errno
import importlib

from .api import Provider  # noqa: F401  (re-exported)

PROVIDERS = {
    "kvm": "ops.nvmm.kvm",
    "libnvmm": "ops.nvmm.libnvmm",
    "soft": "ops.nvmm.soft",
}


class ProviderUnavailable(OSError):
    """The provider's hypervisor or library is absent here (``ENODEV``, ``ENOENT`` or ``EACCES``)."""


def nvmm_init(name="kvm"):
    """Opens and returns the named :class:`~ops.nvmm.api.Provider` (``nvmm_init`` + ``nvmm_capability``)."""
    if name not in PROVIDERS:
        raise ProviderUnavailable(errno.EINVAL, f"unknown NVMM provider {name!r} (known: {', '.join(PROVIDERS)})")
    try:
        module = importlib.import_module(PROVIDERS[name])
    except ImportError as exc:
        raise ProviderUnavailable(errno.ENOENT, f"provider {name!r} cannot be loaded: {exc}") from None
    return module.open_provider()


def available_providers():
    """``{name: None or the one-line reason it is unavailable}`` for every known provider."""
    out = {}
    for name in PROVIDERS:
        try:
            nvmm_init(name)
            out[name] = None
        except OSError as exc:
            out[name] = exc.strerror or str(exc)
    return out
