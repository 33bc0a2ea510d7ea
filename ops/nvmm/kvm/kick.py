"""The signal that knocks a vCPU thread out of ``KVM_RUN``.

Linux KVM API (``Documentation/virt/kvm/api.rst``), the ``KVM_RUN`` ioctl (``EINTR``: "an unmasked signal is
pending") and ``kvm_run.immediate_exit``. :meth:`ops.nvmm.kvm.vcpu.KvmVcpu.stop` sets ``immediate_exit`` and
sends this signal to the thread inside ``KVM_RUN``; :class:`ops.nvmm.kvm.provider.KvmProvider` installs its
handler (one that does nothing) from the main thread. Both import it from here.

Not supported: choosing another signal at run time, or a process that uses SIGUSR2 for something else.
"""

import signal

#: Signal used to knock a vCPU thread out of KVM_RUN (its handler does nothing).
SIG_KICK = signal.SIGUSR2
