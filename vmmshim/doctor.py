"""``vmmshim doctor``: what this host can run (providers present, and whether /dev/kvm is hardware-assisted or
kvm_pvm, which runs small guests only), and whether the KVM provider's compiled run loop and virtio-blk's
compiled request could be built (``ops/nvmm/kvm/fastrun.py``, ``vmmshim/backends/blkfast.py``), one line each,
exit status 0 when at least one provider works."""

import os


def doctor():
    from ops.nvmm import available_providers
    from ops.nvmm.kvm.provider import hardware_kind
    ok = False
    for name, why in available_providers().items():
        print(f"provider {name:<8} {'available' if why is None else 'unavailable: ' + why}")
        ok |= why is None
    kind = hardware_kind()
    verdict = {"kvm_intel": "hardware-assisted (Intel VT-x): Linux guests run here",
               "kvm_amd": "hardware-assisted (AMD-V): Linux guests run here",
               "kvm_pvm": "paravirtual (kvm_pvm): small test guests only; boot Linux in the nested lab "
                          "(python3 -m vmmshim.lab)",
               "unknown": "no KVM module found"}[kind]
    print(f"/dev/kvm {'present' if os.path.exists('/dev/kvm') else 'absent'}: {verdict}")
    from ops.nvmm.kvm import fastrun
    why = fastrun.unavailable()
    print("compiled run loop " + ("built: KVM answers published port reads without leaving C" if why is None else
                                  f"unavailable ({why}): every port read exits to Python"))
    from .backends import blkfast
    why = blkfast.unavailable()
    print("compiled virtio-blk request " + ("built: Linux's read and write tables are served in C" if why is None else
                                            f"unavailable ({why}): virtio-blk serves every request in Python"))
    return 0 if ok else 4
