"""A guest's AHCI driver in a few lines, for tests: it programs an :class:`~bhyve_devices.ahci.pci.AhciPci` through
its ABAR accessors as Linux's ``ahci`` does (AHCI 1.3.1 section 10: HBA reset, GHC.AE and IE, then per port
PxCLB/PxFB, FRE, a COMRESET, ST), lays out each port's command list, received-FIS area and command tables in a
:class:`~bhyve_devices.base.BytesMemory`, and issues commands by slot.

Layout: port ``p``'s structures live at ``STRUCTS + p * PORT_AREA`` (command list, then the 256-byte FIS area,
then a command table of :data:`TABLE_SIZE` bytes per slot, room for :data:`PRD_MAX` PRDT entries each); data
buffers come from :meth:`AhciDriver.alloc`, above :data:`DATA`.

``drv.issue(port, slot, fis, prdt=[(gpa, len)], write=..., acmd=...)`` writes the header and the table and sets
PxCI (and PxSACT first for NCQ); ``drv.wait(port, slot)`` waits for the slot to leave PxCI/PxSACT or for an error
(the device may serve on a thread of its own); ``drv.command(...)`` does both and returns a :class:`Status`.

Not supported: port multipliers, 64-bit addresses above the memory given.
"""

import dataclasses
import struct
import time

from .layouts import (ACMD_OFFSET, CMD_FRE, CMD_ST, COMMAND_HEADER_SIZE, GHC, GHC_AE, GHC_HR, GHC_IE, HDR_ATAPI,
                      HDR_WRITE, HEADER, IS, IS_HBFS, IS_IFS, IS_TFES, P_CI, P_CLB, P_CLBU, P_CMD, P_FB, P_FBU,
                      P_IE, P_IS, P_SACT, P_SCTL, P_SERR, P_TFD, PORT_BASE, PORT_STRIDE, PRD, PRDT_OFFSET,
                      RECEIVED_FIS_SIZE, SCTL_DET_COMRESET, FIS_TYPE_H2D, H2D_C)

ABAR = 5
STRUCTS = 0x10000
PORT_AREA = 0x10000
FIS_OFFSET = 0x400
TABLES_OFFSET = 0x800
TABLE_SIZE = 0x400
PRD_MAX = (TABLE_SIZE - PRDT_OFFSET) // PRD.size
DATA = 0x300000
DEVICE_LBA = 0x40
FATAL = IS_TFES | IS_HBFS | IS_IFS


def h2d(command, lba=0, count=0, features=0, device=DEVICE_LBA, control=0, c=True, aux=0):
    """A Register H2D FIS (20 bytes)."""
    return struct.pack("<BBBBBBBBBBBBBBBBI", FIS_TYPE_H2D, H2D_C if c else 0, command, features & 0xFF,
                       lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device, lba >> 24 & 0xFF, lba >> 32 & 0xFF,
                       lba >> 40 & 0xFF, features >> 8 & 0xFF, count & 0xFF, count >> 8 & 0xFF, 0, control, aux)


def ncq(command, tag, lba, count, fua=False, aux=0, subcommand=0):
    """READ/WRITE/SEND FPDMA QUEUED for ``tag``: the sector count in the features field, the tag in count."""
    return h2d(command, lba, (tag << 3) | (subcommand << 8), features=count, device=DEVICE_LBA | (0x80 if fua else 0),
               aux=aux)


@dataclasses.dataclass
class Status:
    tfd: int        #: PxTFD after the command
    is_: int        #: PxIS (cleared afterwards)
    ci: int
    sact: int
    prdbc: int      #: the slot's PRD byte count

    @property
    def error(self):
        return self.tfd >> 8

    @property
    def ok(self):
        return not self.is_ & FATAL and not self.tfd & 1


class AhciDriver:
    def __init__(self, pci, mem):
        self.pci, self.mem = pci, mem
        self._next = DATA

    # -- registers ---------------------------------------------------------------------------------------------------
    def r(self, off):
        return self.pci.barread(ABAR, off, 4)

    def w(self, off, value):
        self.pci.barwrite(ABAR, off, 4, value)

    def preg(self, port, reg):
        return PORT_BASE + port * PORT_STRIDE + reg

    def pr(self, port, reg):
        return self.r(self.preg(port, reg))

    def pw(self, port, reg, value):
        self.w(self.preg(port, reg), value)

    # -- memory ------------------------------------------------------------------------------------------------------
    def alloc(self, n, align=512):
        gpa = (self._next + align - 1) & ~(align - 1)
        self._next = gpa + n
        return gpa

    def put(self, data, align=512):
        gpa = self.alloc(len(data), align)
        self.mem.view(gpa, len(data))[:] = data
        return gpa

    def get(self, gpa, n):
        return bytes(self.mem.view(gpa, n))

    def cmdlist(self, port):
        return STRUCTS + port * PORT_AREA

    def fis_area(self, port):
        return self.cmdlist(port) + FIS_OFFSET

    def table(self, port, slot):
        return self.cmdlist(port) + TABLES_OFFSET + slot * TABLE_SIZE

    def received_fis(self, port):
        return self.get(self.fis_area(port), RECEIVED_FIS_SIZE)

    # -- bring-up ----------------------------------------------------------------------------------------------------
    def init(self, ie=True):
        """HBA reset, then AHCI mode and (``ie``) interrupts on."""
        self.w(GHC, GHC_HR)
        self.w(GHC, GHC_AE | (GHC_IE if ie else 0))

    def start(self, port, comreset=True):
        """Points the port at its structures, enables FIS reception, resets the link, starts the engine."""
        self.pw(port, P_CLB, self.cmdlist(port))
        self.pw(port, P_CLBU, 0)
        self.pw(port, P_FB, self.fis_area(port))
        self.pw(port, P_FBU, 0)
        self.pw(port, P_CMD, CMD_FRE)
        if comreset:
            self.pw(port, P_SCTL, SCTL_DET_COMRESET)
            self.pw(port, P_SCTL, 0)
        self.pw(port, P_SERR, 0xFFFFFFFF)
        self.pw(port, P_IS, 0xFFFFFFFF)
        self.pw(port, P_IE, 0xFFFFFFFF)
        self.pw(port, P_CMD, CMD_FRE | CMD_ST)

    def stop(self, port):
        """Clears ST (the error recovery of AHCI 6.2.2), then starts again."""
        self.pw(port, P_CMD, CMD_FRE)
        self.pw(port, P_SERR, 0xFFFFFFFF)
        self.pw(port, P_IS, 0xFFFFFFFF)
        self.pw(port, P_CMD, CMD_FRE | CMD_ST)

    # -- commands ----------------------------------------------------------------------------------------------------
    def issue(self, port, slot, fis, prdt=(), write=False, acmd=b"", queued=False, ctba=None, go=True, prdtl=None):
        """Writes slot ``slot``'s header (CFL 5, A, W, PRDTL: ``prdtl`` or the entries given) and command table
        (at ``ctba``: only the header is written), then (``go``) PxSACT (``queued``) and PxCI."""
        table = self.table(port, slot) if ctba is None else ctba
        if ctba is None and len(prdt) > PRD_MAX:
            raise ValueError(f"at most {PRD_MAX} PRDT entries")
        flags = 5 | (HDR_ATAPI if acmd else 0) | (HDR_WRITE if write else 0)
        count = len(prdt) if prdtl is None else prdtl
        hdr = HEADER.pack(flags, count, 0, table) + bytes(COMMAND_HEADER_SIZE - HEADER.size)
        self.mem.view(self.cmdlist(port) + slot * COMMAND_HEADER_SIZE, COMMAND_HEADER_SIZE)[:] = hdr
        if ctba is None:
            body = fis.ljust(ACMD_OFFSET, b"\0") + acmd.ljust(PRDT_OFFSET - ACMD_OFFSET, b"\0")
            body += b"".join(PRD.pack(gpa, 0, (n - 1) & 0x3FFFFF) for gpa, n in prdt)
            self.mem.view(table, len(body))[:] = body
        if go:
            self.go(port, slot, queued)

    def go(self, port, slot, queued=False):
        """Issues slot ``slot``: PxSACT first for an NCQ command, then PxCI."""
        if queued:
            self.pw(port, P_SACT, 1 << slot)
        self.pw(port, P_CI, 1 << slot)

    def wait(self, port, slot, timeout=10.0, queued=False):
        bit = 1 << slot
        end = time.monotonic() + timeout
        while True:
            is_, ci, sact = self.pr(port, P_IS), self.pr(port, P_CI), self.pr(port, P_SACT)
            if is_ & FATAL or not (ci & bit or (queued and sact & bit)):
                break
            if time.monotonic() > end:
                raise TimeoutError(f"port {port} slot {slot}: CI {ci:#x} SACT {sact:#x} IS {is_:#x}")
            time.sleep(0.001)
        prdbc = struct.unpack("<I", self.get(self.cmdlist(port) + slot * COMMAND_HEADER_SIZE + 4, 4))[0]
        st = Status(self.pr(port, P_TFD), is_, ci, sact, prdbc)
        self.pw(port, P_IS, is_)
        self.w(IS, self.r(IS))
        return st

    def command(self, port, slot, fis, prdt=(), write=False, acmd=b"", queued=False):
        self.issue(port, slot, fis, prdt, write, acmd, queued)
        return self.wait(port, slot, queued=queued)

    def read_into(self, port, fis, nbytes, slot=0, acmd=b"", queued=False, chunk=4096):
        """A data-in command into a fresh buffer split in ``chunk``-byte PRDT entries: ``(status, bytes)``."""
        gpa = self.alloc(nbytes)
        prdt = [(gpa + o, min(chunk, nbytes - o)) for o in range(0, nbytes, chunk)]
        st = self.command(port, slot, fis, prdt, acmd=acmd, queued=queued)
        return st, self.get(gpa, nbytes)

    def write_from(self, port, fis, data, slot=0, queued=False, chunk=4096):
        gpa = self.put(data)
        prdt = [(gpa + o, min(chunk, len(data) - o)) for o in range(0, len(data), chunk)]
        return self.command(port, slot, fis, prdt, write=True, queued=queued)


class Controller:
    """An :class:`~bhyve_devices.ahci.pci.AhciPci` over ``ports`` (``[(kind, backend)]``, ports 0, 1... or
    ``{port: (kind, backend)}``) in a :class:`~bhyve_devices.base.BytesMemory` of ``ram`` bytes, with its INTx line
    and MSI messages recorded (``line``, ``msis``), the driver (``drv``) and the HBA (``hba``)."""

    def __init__(self, ports, ram=8 << 20, threaded=False, options=None, inline_kib=0):
        from bhyve_devices.base import BytesMemory, RecordingLine

        from .options import AhciPorts, PortSpec
        from .pci import AhciPci
        if not isinstance(ports, dict):
            ports = dict(enumerate(ports))
        attached = [PortSpec(p, kind, f"/images/{kind}{p}", dict((options or {}).get(p, {}))).attach(backend)
                    for p, (kind, backend) in sorted(ports.items())]
        self.mem = BytesMemory(ram)
        self.pci = AhciPci({"backend": AhciPorts(attached), "guest_memory": self.mem, "threaded": threaded,
                               "inline_kib": inline_kib})
        self.line = RecordingLine()
        self.msis = []
        self.pci.intx_line = self.line
        self.pci.msi = lambda addr, data: self.msis.append(data)
        self.hba = self.pci.hba
        self.drv = AhciDriver(self.pci, self.mem)

    def enable_msi(self, vectors=1, data=0x40):
        """Programs the MSI capability (address 0xFEE00000, ``data``) with ``vectors`` (a power of two)."""
        from bhyve_devices.pci import config as C
        off = self.pci._msi_off
        self.pci.cfgwrite(off + C.MSI_ADDR_LO, 4, 0xFEE00000)
        self.pci.cfgwrite(off + C.MSI_DATA, 2, data)
        self.pci.cfgwrite(off + C.MSI_CTRL, 2, C.MSI_CTRL_ENABLE | ((vectors.bit_length() - 1) << C.MSI_CTRL_MME_SHIFT))

    def up(self, *ports):
        """HBA reset, interrupts on, and the ports started (all with a device when none are named)."""
        self.drv.init()
        for p in ports or [i for i in range(self.hba.nports) if self.hba.pi >> i & 1]:
            self.drv.start(p)
        return self.drv

    def close(self):
        self.pci.close()
