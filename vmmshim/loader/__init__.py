"""Guest loaders: files in, a :class:`BootImage` out (bytes for guest RAM and the boot vCPU's state).

Pure code with no hypervisor calls. ``load_kexec`` boots a Linux bzImage as xhyve's ``-f kexec`` does;
``load_multiboot`` boots a multiboot 1 kernel as hyperkit's ``-f multiboot`` does. Anything that cannot boot is
a :class:`LoaderError` (a ``ValueError``) with a one-line message, raised before the guest starts.

Not supported: FreeBSD's userboot (xhyve's ``fbsd``), UEFI firmware, multiboot 2.
"""

from .bzimage import load_kexec
from .common import BootImage, LoaderError, e820_map
from .multiboot import load_multiboot

__all__ = ["BootImage", "LoaderError", "load_kexec", "load_multiboot", "e820_map"]
