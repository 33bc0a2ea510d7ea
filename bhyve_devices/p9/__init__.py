"""A 9P2000.L file server for virtio-9p (bhyve's ``pci_virtio_9p.c`` serves the protocol with lib9p; there is no
maintained Python 9P library, so this one is ours).

- :mod:`.messages`: the message layouts (declared with ``construct``) and the precompiled codecs the server uses;
- :mod:`.server`: the session (version, fids, msize), framing of one request over guest-memory segments, and the
  dispatch of each T-message to its handler (:mod:`.ops`).

The server never touches the host: every file-system call goes to a
:class:`~bhyve_devices.backends.P9Filesystem` the VM opened (``vmmshim/backends/p9fs.py``). Nothing here imports
``ops`` or ``vmmshim``.

Not supported: 9P2000 and 9P2000.u (only ``9P2000.L`` is offered), authentication, more than one session per
device.
"""
