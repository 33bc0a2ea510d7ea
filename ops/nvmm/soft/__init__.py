"""The software provider of the NVMM primitives: the unicorn CPU emulator (``pip install unicorn``, 2.x).

Follows DESIGN.md section 2 ("soft"): no hypervisor is needed, the guest runs in unicorn and the provider turns
I/O, unmapped memory, MSR, CPUID, HLT, CR8 writes (with NVMM_VCPU_CONF_TPR) and interrupt windows into NVMM exits,
and emulates what its CPUID offers (``cpuid.py``, ``sysinsn.py``). See ``provider.py`` and ``vcpu.py``.

Not supported: see ``SoftProvider.capability().limits`` and the docstrings of the modules.
"""

import errno

_provider = None


def open_provider():
    """``nvmm_init`` for the software CPU: one provider per process, opened on first use."""
    global _provider
    if _provider is None:
        from .. import ProviderUnavailable
        try:
            import unicorn  # noqa: F401
        except ImportError:
            raise ProviderUnavailable(errno.ENOENT, "the soft provider needs the unicorn CPU emulator "
                                      "(pip install 'unicorn>=2')") from None
        from .provider import SoftProvider
        _provider = SoftProvider()
    return _provider
