"""The KVM provider of the NVMM primitives (Linux ``/dev/kvm`` with a userspace interrupt controller)."""

_provider = None


def open_provider():
    """``nvmm_init`` for KVM: one provider per process, opened on first use."""
    global _provider
    if _provider is None:
        from .provider import KvmProvider
        _provider = KvmProvider()
    return _provider
