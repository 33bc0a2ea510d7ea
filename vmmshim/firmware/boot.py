"""The boot image the ``-f`` flag (``firmware.spec``) names: xhyve's ``kexec,KERNEL,INITRD,"CMDLINE"``,
hyperkit's ``multiboot,KERNEL,MODULES,"CMDLINE"`` and vmmshim's built-in ``hello``, loaded by
:mod:`vmmshim.loader` into a :class:`vmmshim.loader.BootImage`.

The spec is split as hyperkit's ``firmware_parse`` splits it: at the first three commas only, so the fourth
field (the command line) keeps its commas (``console=ttyS0,115200`` arrives whole), and an empty field is
absent. For kexec the fields are kernel, initrd and command line; for multiboot they are kernel, module list
and command line, so ``multiboot,KERNEL,MOD`` loads ``MOD`` as a module and passes no command line (hyperkit
reads its third field as the module list whatever it holds), and a command line without modules is
``multiboot,KERNEL,,CMDLINE``. The module list is hyperkit's ``MOD[;CMDLINE][:MOD[;CMDLINE]]...``. Double
quotes around the command line are dropped.

Not supported: xhyve's ``fbsd`` (userboot) firmware, bhyve's ``lpc.bootrom`` (UEFI), a ``:`` or ``;`` inside a
module's path, a ``:`` inside a module's command line.
"""

from ..config import ConfigError

#: hyperkit splits ``-f`` at this many commas: the last field keeps the rest.
SPEC_SPLITS = 3
MODULE_SEP = ":"
MODULE_CMDLINE_SEP = ";"
KEXEC_USAGE = "kexec,KERNEL[,INITRD[,\"CMDLINE\"]]"
MODULES_USAGE = "MOD[;CMDLINE][:MOD[;CMDLINE]]..."
MULTIBOOT_USAGE = f"multiboot,KERNEL[,{MODULES_USAGE}[,\"CMDLINE\"]]"


def split_spec(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """``kind`` and its three option fields, as hyperkit's ``firmware_parse`` has them (an empty one is None)."""
    parts = spec.split(",", SPEC_SPLITS)
    parts += [""] * (SPEC_SPLITS + 1 - len(parts))
    return parts[0], *(p or None for p in parts[1:])


def multiboot_modules(field: str | None) -> list[tuple[str, str | None]]:
    """``(path, cmdline)`` of each module of a hyperkit module list ``MOD[;CMDLINE][:MOD[;CMDLINE]]...``."""
    if field is None:
        return []
    mods = []
    for n, item in enumerate(field.split(MODULE_SEP)):
        path, _, cmdline = item.partition(MODULE_CMDLINE_SEP)
        if not path:
            raise ConfigError(f"-f multiboot: module {n} of the module list {field} has no file name "
                              f"(the list is {MODULES_USAGE})")
        mods.append((path, cmdline or None))
    return mods


def boot_image(cfg, lowmem, highmem):
    """The BootImage ``-f`` asks for (LoaderError on a bad image)."""
    from ..loader import LoaderError, load_kexec, load_multiboot
    from .hello import hello_image
    spec = cfg.get("firmware.spec")
    if not spec:
        raise ConfigError(f"no firmware: give -f {KEXEC_USAGE} (or -f hello)")
    kind, opt1, opt2, opt3 = split_spec(spec)
    if kind == "hello":
        return hello_image()
    cmdline = opt3.strip('"') if opt3 else ""
    if kind == "kexec":
        if not opt1:
            raise ConfigError(f"-f kexec needs a kernel: {KEXEC_USAGE}")
        return load_kexec(opt1, opt2, cmdline, lowmem, highmem)
    if kind == "multiboot":
        if not opt1:
            raise ConfigError(f"-f multiboot needs a kernel: {MULTIBOOT_USAGE}")
        try:
            return load_multiboot(opt1, multiboot_modules(opt2), cmdline, lowmem, highmem)
        except LoaderError as exc:
            if opt3 is None and str(exc).startswith("cannot read module"):
                # The old habit of multiboot,KERNEL,CMDLINE: say where a command line goes.
                raise LoaderError(f"{exc} (the third -f multiboot field is the module list, as in hyperkit: "
                                  f"a command line without modules is multiboot,KERNEL,,CMDLINE)") from None
            raise
    raise LoaderError(f"unknown firmware \"{kind}\" (kexec, multiboot or hello)")
