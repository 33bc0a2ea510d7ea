"""The configuration keys vmmshim reads, documented in one place: vmmshim's own ``vmmshim.*`` keys (the typo check
of :meth:`vmmshim.config.Config.set` and the key section of ``vmmshim -h`` are made from :data:`VMMSHIM_KEYS`)
and the ``bhyve_config(5)`` keys it honours (:data:`BHYVE_KEYS`, shown by ``-h`` as well).

A key under ``vmmshim.`` that is not in :data:`VMMSHIM_KEYS` is an error naming the closest known key; keys
outside that namespace that vmmshim does not read are accepted and ignored, as bhyve ignores unknown variables
(``bhyve_config(5)``: they may still be referenced by ``%(var)``). :data:`NOT_SUPPORTED_YET` lists the bhyve keys
that are refused rather than ignored, because a guest set up for them would not boot as its owner expects.

Not supported: per-device keys (``pci.B.S.F.*`` options are the device's own, checked when it is built).
"""

import difflib

#: ``key: (default, kind, meaning)``. ``kind`` is ``bool``, ``number LO HI`` (seconds, a fraction allowed),
#: ``int LO HI``, ``auto|int LO HI``, ``names`` (PCI device names, comma-separated; ``none`` for none), ``provider`` or
#: ``help``; :meth:`vmmshim.config.Config.validate` checks each value set.
VMMSHIM_KEYS = {
    "vmmshim.provider": ("kvm", "provider",
                         "the hypervisor: kvm (/dev/kvm), soft (the software CPU: no /dev/kvm needed, small guests "
                         "only) or libnvmm (NetBSD's NVMM)"),
    "vmmshim.stats": ("false", "bool", "print each vCPU's exit counts on stderr when the VM ends"),
    "vmmshim.posted_io": ("true", "bool",
                          "devices' posted port writes (the UART's transmit register) buffered by KVM's "
                          "coalesced PIO"),
    "vmmshim.doorbells": ("true", "bool",
                          "virtio queue notifications through KVM's ioeventfd (false: they exit and the vCPU "
                          "rings the device)"),
    "vmmshim.exit_notify": ("virtio-9p", "names",
                            "devices (comma-separated: virtio-9p, virtio-blk, virtio-net, nvme) whose doorbells "
                            "stay exits, each served by the writing vCPU in its exit, for a driver that waits for "
                            "every request (none: every doorbell through ioeventfd)"),
    "vmmshim.halt_serve": ("true", "bool", "a vCPU about to sleep in HLT first serves the doorbells that rang"),
    "vmmshim.answer_io": ("true", "bool",
                          "port reads a device publishes (the UART's line status) answered by the compiled "
                          "run loop without an exit"),
    "vmmshim.answer_mmio": ("true", "bool",
                            "MMIO registers a device publishes (AHCI's interrupt status) answered by the compiled "
                            "run loop without an exit"),
    "vmmshim.blk_compiled": ("true", "bool",
                             "virtio-blk, nvme and ahci serve Linux's read and write requests in C, where a C "
                             "compiler can build it"),
    "vmmshim.ahci_inline_kib": ("64", "int 0 32768",
                                "an AHCI disk's compiled read or write of at most this many KiB (and no flush) is "
                                "served on the vCPU that issued it, in its PxCI write; longer ones, and with 0 "
                                "all, go to the port's thread"),
    "vmmshim.p9_compiled": ("true", "bool",
                            "virtio-9p serves Tread and Twrite on open files in C, where a C compiler can build "
                            "it"),
    "vmmshim.net_compiled": ("true", "bool",
                             "virtio-net moves frames between a Linux tap and guest memory in C, and slirp runs "
                             "its loop in C, where a C compiler can build them"),
    "vmmshim.gil_switch_ms": ("auto", "auto|int 1 10000",
                              "Python's GIL switch interval in milliseconds; auto: 50 on a hypervisor, Python's "
                              "5 with the soft provider"),
    "vmmshim.poweroff_timeout_s": ("30", "number 0 86400",
                                   "seconds from the ACPI power button (SIGTERM, SIGHUP, SIGINT) to a forced "
                                   "power off when the guest ignores it; 0: never"),
    "vmmshim.restore_force": ("false", "bool",
                              "restore (-r) even when a disk image changed since the checkpoint (size or mtime)"),
    "vmmshim.control": ("true", "bool",
                        "a control socket for vmmshim ctl (checkpoint, suspend, pause, resume, status), "
                        "$XDG_RUNTIME_DIR/vmmshim/NAME (root: /var/run/vmmshim/NAME)"),
    "vmmshim.help": ("false", "help", "set by -h (this help), -s help (PCI emulations), -l help (LPC devices)"),
    "vmmshim.version": ("false", "bool", "set by -v: print the version and exit"),
}

#: The ``bhyve_config(5)`` keys vmmshim reads (or accepts with a documented no-op): ``key: (default, meaning)``.
BHYVE_KEYS = {
    "name": ("vm", "the VM's name (the last argument)"),
    "cpus": ("1", "vCPUs (-c), 1-64; must equal sockets x cores x threads when they are set"),
    "sockets": ("", "virtual sockets (-c sockets=S; default: cpus)"),
    "cores": ("1", "cores per socket (-c cores=C); stored, not yet shown to the guest in CPUID"),
    "threads": ("1", "threads per core (-c threads=T); stored, not yet shown to the guest in CPUID"),
    "memory.size": ("256M", "guest memory (-m), 1 MiB to 1 TiB, as -m reads it"),
    "firmware.spec": ("", "what -f boots: kexec,... | multiboot,... | hello (see -f)"),
    "acpi_tables": ("false", "build ACPI tables (-A)"),
    "x86.mptable": ("true", "build an MP table (false: -Y)"),
    "x86.x2apic": ("false", "local APICs in x2APIC mode (-x)"),
    "x86.strictio": ("false", "an access to an unemulated I/O port ends the VM (-e)"),
    "x86.strictmsr": ("true", "an unemulated MSR raises #GP (false: -w, reads 0 and ignores writes)"),
    "x86.vmexit_on_hlt": ("false", "accepted (-H); HLT always exits: the local APIC is in userspace"),
    "x86.vmexit_on_pause": ("false", "accepted (-P); PAUSE exits are KVM's pause-loop exiting"),
    "x86.kvm_pv": ("true", "offer KVM's paravirtual interface (kvmclock) to the guest"),
    "x86.pv_eoi": ("true", "offer KVM's paravirtual EOI to the guest"),
    "x86.tsc_deadline": ("true", "offer the LAPIC timer's TSC-deadline mode (CPUID.1:ECX[24]; false: bhyve's CPUID)"),
    "virtio_msix": ("true", "virtio devices use MSI-X (false: -W, one MSI vector)"),
    "rtc.use_localtime": ("true", "the RTC keeps local time (false: -u, UTC)"),
    "uuid": ("", "the VM's UUID in its SMBIOS table (-U; default: made from the VM's and the host's names)"),
    "memory.guest_in_core": ("false", "accepted (-C); vmmshim writes no core files"),
    "pidfile": ("", "a file holding vmmshim's process ID while the VM runs (-F)"),
    "lpc.comN.path": ("", "the console backend of COM1-COM4 (-l comN,BACKEND)"),
    "lpc.debug_exit.port": ("", "the port of QEMU's isa-debug-exit (-l debug-exit[,PORT])"),
    "pci.0.S.F.device": ("", "the PCI emulation in slot S, function F (-s S:F,EMULATION); bus 0 only"),
    "pci.0.S.F.OPTION": ("", "that emulation's options, e.g. path, ro"),
    "gdb.port": ("0", "the GDB stub's TCP port (-G [w][ADDR:]PORT); 0: no stub"),
    "gdb.address": ("127.0.0.1", "the address the GDB stub listens on"),
    "gdb.wait": ("false", "the vCPUs wait at the first instruction until gdb attaches and continues (-G w...)"),
    "config.dump": ("false", "print every key=value after parsing and exit (status 1, as bhyve) instead of running"),
    "restore": ("", "resume the VM checkpointed in this file (-r FILE; its configuration comes from FILE.meta, "
                    "keys given here override it)"),
}

#: bhyve keys refused with "not supported yet": ``key: (what it asks for, what to use instead)``.
NOT_SUPPORTED_YET = {
    "lpc.bootrom": ("a UEFI boot ROM", "boot with -f kexec or -f multiboot"),
    "lpc.bootvars": ("UEFI variables for a boot ROM", "boot with -f kexec or -f multiboot"),
}

VMMSHIM_PREFIX = "vmmshim."
HELP_WIDTH = 96
#: How alike a typo and a known key must be for the error to suggest it (difflib's ratio).
SUGGEST_CUTOFF = 0.6


def unknown_vmmshim_key(key):
    """The one-line complaint about ``key`` under ``vmmshim.``, or None when vmmshim knows it."""
    if not key.startswith(VMMSHIM_PREFIX) or key in VMMSHIM_KEYS:
        return None
    names = [k[len(VMMSHIM_PREFIX):] for k in VMMSHIM_KEYS]     # compared without the prefix they all share
    close = difflib.get_close_matches(key[len(VMMSHIM_PREFIX):], names, n=1, cutoff=SUGGEST_CUTOFF)
    hint = f"did you mean {VMMSHIM_PREFIX}{close[0]}? " if close else ""
    names = ", ".join(names)
    return f"unknown key {key}: {hint}vmmshim's keys are vmmshim.{{{names}}}"


def help_sections(width=HELP_WIDTH):
    """The key tables as ``-h`` prints them (``KEY=DEFAULT  meaning``), wrapped to ``width`` columns."""
    import textwrap

    def table(title, rows):
        lefts = [f"{k}={d}" if d else k for k, d, _ in rows]
        keyw = max(len(left) for left in lefts) + 2
        out = [title]
        for left, (_, _, meaning) in zip(lefts, rows):
            lines = textwrap.wrap(meaning, width - keyw - 2)
            out.append(f"  {left:<{keyw}}{lines[0]}")
            out += [" " * (keyw + 2) + line for line in lines[1:]]
        return out

    own = [(k, d, m) for k, (d, _, m) in VMMSHIM_KEYS.items()]
    bhyve = [(k, d, m) for k, (d, m) in BHYVE_KEYS.items()]
    return (table("vmmshim's keys, KEY=DEFAULT (-o or -k; a misspelt vmmshim.* key is an error):", own) + [""] +
            table("bhyve_config(5) keys vmmshim reads (any other key is accepted and ignored, as bhyve does):",
                  bhyve))
