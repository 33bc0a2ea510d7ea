"""The boot image the ``-f`` flag (``firmware.spec``) names: xhyve's ``kexec,KERNEL,INITRD,"CMDLINE"``,
hyperkit's ``multiboot,KERNEL[,MOD:MOD...],"CMDLINE"`` and vmmshim's built-in ``hello``, loaded by
:mod:`vmmshim.loader` into a :class:`vmmshim.loader.BootImage`.

Not supported: xhyve's ``fbsd`` (userboot) firmware, bhyve's ``lpc.bootrom`` (UEFI).
"""

from ..config import ConfigError


def boot_image(cfg, lowmem, highmem):
    """The BootImage ``-f`` asks for (LoaderError on a bad image)."""
    from ..loader import LoaderError, load_kexec, load_multiboot
    from .hello import hello_image
    spec = cfg.get("firmware.spec")
    if not spec:
        raise ConfigError("no firmware: give -f kexec,KERNEL,INITRD,\"CMDLINE\" (or -f hello)")
    parts = spec.split(",", 3)
    kind = parts[0]
    if kind == "hello":
        return hello_image()
    if kind == "kexec":
        if len(parts) < 2 or not parts[1]:
            raise ConfigError("-f kexec needs a kernel: kexec,KERNEL[,INITRD[,\"CMDLINE\"]]")
        initrd = parts[2] if len(parts) > 2 and parts[2] else None
        cmdline = parts[3] if len(parts) > 3 else ""
        return load_kexec(parts[1], initrd, cmdline.strip('"'), lowmem, highmem)
    if kind == "multiboot":
        parts = spec.split(",")
        if len(parts) < 2 or not parts[1]:
            raise ConfigError("-f multiboot needs a kernel: multiboot,KERNEL[,MOD:MOD...][,\"CMDLINE\"]")
        cmdline = parts[-1].strip('"') if len(parts) > 2 else ""
        mods = [(m, None) for m in parts[2].split(":") if m] if len(parts) > 3 else []
        return load_multiboot(parts[1], mods, cmdline, lowmem, highmem)
    raise LoaderError(f"unknown firmware {kind!r} (kexec, multiboot, hello)")
