"""``vmmshim doctor``: what this host can run, one line each: the providers (kvm, libnvmm and the soft provider,
the software CPU that needs no ``/dev/kvm``), whether ``/dev/kvm`` exists and which module backs it
(hardware-assisted ``kvm_intel``/``kvm_amd``, or the paravirtual ``kvm_pvm``, where ``-f kexec`` of a stock Linux
kernel crawls, so Linux boots in the nested lab), and whether the KVM provider's compiled run loop, virtio-blk's
compiled request, virtio-net's compiled data path and the compiled slirp loop could be built
(``ops/nvmm/kvm/fastrun.py``, ``vmmshim/backends/blkfast.py``, ``vmmshim/backends/netfast.py``,
``vmmshim/backends/slirp_fast.py``).
Exit status 0 when at least one provider works, 4 otherwise or for an argument (it takes none).

Not supported: checking a particular guest's needs (memory, vCPUs) against the host.
"""

import importlib
import os
import sys

KVM_DEVICE = "/dev/kvm"
EXIT_ERROR = 4
LAB_HINT = "boot Linux in the nested lab: vmmshim linux, or python3 -m vmmshim.lab (docs/lab.md)"
KIND_WORDS = {"kvm_intel": "hardware-assisted (kvm_intel, Intel VT-x): Linux guests run here",
              "kvm_amd": "hardware-assisted (kvm_amd, AMD-V): Linux guests run here",
              "kvm_pvm": "paravirtual (kvm_pvm): small test guests run here"}
PROVIDER_NOTES = {"soft": "the software CPU, needs no /dev/kvm; small guests (-o vmmshim.provider=soft)"}


def kvm_lines(present, kind):
    """What doctor says about ``/dev/kvm`` (``present``: it exists) backed by the module ``kind``."""
    if present and kind in KIND_WORDS:
        lines = [f"{KVM_DEVICE} present: {KIND_WORDS[kind]}"]
    elif present:
        lines = [f"{KVM_DEVICE} present: backed by none of kvm_intel, kvm_amd, kvm_pvm (not in /sys/module)"]
    elif kind in KIND_WORDS:
        lines = [f"{KVM_DEVICE} missing although {kind} is loaded: the kvm provider needs the device node "
                 "(mknod /dev/kvm c 10 232, or pass it to the container); the soft provider works without it"]
    else:
        lines = [f"{KVM_DEVICE} missing: no KVM module here; the soft provider works without it"]
    if kind == "kvm_pvm":
        lines.append(f"warning: -f kexec of a stock Linux kernel crawls on a paravirtual KVM (kvm_pvm); {LAB_HINT}")
    return lines


def doctor(kvm_device=KVM_DEVICE):
    from ops.nvmm import available_providers
    from ops.nvmm.kvm.provider import hardware_kind
    ok = False
    providers = available_providers()
    for name, why in providers.items():
        state = "available" if why is None else "unavailable: " + why
        note = PROVIDER_NOTES.get(name)
        print(f"provider {name:<8} {state}" + (f": {note}" if note and why is None else ""))
        ok |= why is None
    present = os.path.exists(kvm_device) or providers.get("kvm", "") is None
    for line in kvm_lines(present, hardware_kind()):
        print(line)
    from ops.nvmm.kvm import fastrun
    why = fastrun.unavailable()
    print("compiled run loop " + ("built: KVM answers published port and MMIO reads and IA32_TSC_DEADLINE writes, and "
                                  "injects interrupts at the window and at kicks and sleeps in the guest's HLT, "
                                  "without leaving C" if why is None
                                  else f"unavailable ({why}): every port read and injection goes through Python"))
    for module, name, built, without in _COMPILED:
        why = importlib.import_module(f"vmmshim.backends.{module}").unavailable()
        print(f"{name} " + (f"built: {built}" if why is None else f"unavailable ({why}): {without}"))
    return 0 if ok else EXIT_ERROR


#: The devices' compiled paths: (module in ``vmmshim/backends``, name, what it does, what happens without it).
_COMPILED = (
    ("blkfast", "compiled virtio-blk request", "Linux's read and write tables are served in C",
     "virtio-blk serves every request in Python"),
    ("nvmefast", "compiled NVMe queue pass", "reads and writes of the I/O queues are served in C",
     "nvme serves every command in Python"),
    ("ahcifast", "compiled AHCI data command", "DMA and NCQ reads and writes of a disk port are served in C",
     "ahci serves every command in Python"),
    ("p9fast", "compiled virtio-9p Tread/Twrite", "reads and writes of open files are served in C",
     "virtio-9p serves every message in Python"),
    ("netfast", "compiled virtio-net data path", "frames move between a tap and guest memory in C",
     "virtio-net moves every frame in Python"),
    ("slirp_fast", "compiled slirp loop", "libslirp's thread and frames run in C", "slirp's loop runs in Python"),
)


def main(argv=()):
    if argv:
        print(f"vmmshim doctor: takes no arguments, got {' '.join(argv)}", file=sys.stderr)
        return EXIT_ERROR
    return doctor()
