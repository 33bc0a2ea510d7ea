"""The nested lab: stock Linux guests booted one level down, where KVM is real.

The host's /dev/kvm (kvm_pvm) cannot run an unmodified Linux kernel, so Linux guests are booted inside an
L1 Debian 12 that QEMU TCG runs with an emulated AMD SVM (``-cpu EPYC,+svm,+npt``); inside L1,
``modprobe kvm_amd`` gives a KVM with nested paging.  See docs/lab.md.

Python API::

    from vmmshim.lab import lab_available, run_in_lab
    ok, why = lab_available()
    status, out, err = run_in_lab("ls -l /dev/kvm", timeout=300)

Command line: ``python3 -m vmmshim.lab {build,guest,run,status}``.
"""

from vmmshim.lab.paths import cache_dir


def __getattr__(name):
    # run.py is imported on first use, so ``python3 -m vmmshim.lab build`` works on its own
    if name in ("lab_available", "run_in_lab", "LabResult"):
        from vmmshim.lab import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["cache_dir", "lab_available", "run_in_lab", "LabResult"]
