"""NetBSD's libnvmm (user version 2, NetBSD 10) as an NVMM provider, through cffi in ABI mode.

``open_provider()`` is what ``ops.nvmm.nvmm_init("libnvmm")`` calls; ``cdefs`` holds the declarations (usable
without libnvmm, for the layout tests), ``provider`` the implementation. See ``docs/netbsd.md``.

Not supported: anything but NetBSD 10 on amd64 (libnvmm user version 2); nothing here has run on NetBSD yet.
"""

from .provider import open_provider  # noqa: F401
