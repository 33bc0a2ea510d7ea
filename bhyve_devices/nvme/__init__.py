"""An NVM Express 1.4 controller (bhyve ``pci_nvme.c``): ``-s N,nvme,disk.img[,maxq=,qsz=,ioslots=,sectsz=,ser=]``.

- :mod:`.regs`: registers, queue entries, opcodes and status codes (NVM Express Base Specification 1.4, 3-6);
- :mod:`.layouts`: the Identify data, log pages, SGL descriptor and DSM range layouts;
- :mod:`.identify`: what the controller says about itself; :mod:`.prp`: PRPs and SGLs as guest-RAM buffers;
- :mod:`.queues`: submission and completion queues and the shadow doorbells;
- :mod:`.controller`, :mod:`.admin`, :mod:`.io`: the controller, its admin and NVM I/O commands;
- :mod:`.pci`: the PCI function (BARs, MSI-X, INTx, the doorbell fast path), registered as ``nvme``;
- :mod:`.snap`: the controller's state in a checkpoint (issue 23);
- :mod:`.testdriver`: a guest-side driver for tests.

Not supported: see each module's docstring (namespace management, reservations, protection information, the
controller memory buffer, more than one namespace).
"""

from . import pci  # noqa: F401  (registers the ``nvme`` emulation)
from .controller import NvmeController  # noqa: F401
from .pci import NvmePci  # noqa: F401
