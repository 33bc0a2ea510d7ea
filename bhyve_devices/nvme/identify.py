"""What the controller says about itself (NVM Express Base Specification 1.4): the Identify data structures (5.15.2)
and the log pages (5.14.1) it offers, built with the layouts of :mod:`bhyve_devices.nvme.layouts`.

The identity follows bhyve's ``pci_nvme.c``: model ``bhyve-NVMe``, firmware ``1.0``, serial ``NVME-<slot>-<func>``
(or ``ser=``), the FreeBSD OUI, one namespace, MDTS 9 (2 MiB), 4 outstanding Asynchronous Event Requests. Where
bhyve and NVMe 1.4 ask for more it adds: an EUI-64 and an NGUID derived from the VM name and the PCI address (or
``eui64=``), a subsystem NQN from them (Linux refuses a second controller with the same one), a volatile write
cache (so Linux sends flushes, which reach the image's ``fsync``), SGL support, the Doorbell Buffer Config
command, and the Commands Supported and Effects log.

Not supported: namespace management and more than one namespace, power states other than PS0, reservations,
end-to-end protection, telemetry, the changed-namespace log's contents (no namespace ever changes).
"""

import hashlib
import uuid

from . import regs as R
from .layouts import (CHANGED_NS_LOG_SIZE, EFFECTS_LOG, ERROR_ENTRY, FIRMWARE_LOG, IDENTIFY_CONTROLLER,
                      IDENTIFY_NAMESPACE, NIDT_EUI64, NIDT_NGUID, NS_DESCRIPTOR, SMART_LOG)

VENDOR_ID = 0xFB5D                  # bhyve's
DEVICE_ID = 0x0A0A
MODEL = "bhyve-NVMe"
FIRMWARE = "1.0"
IEEE_OUI = b"\x58\x9c\xfc"          # FreeBSD's
MDTS = 9                            # 2^9 pages: 2 MiB per command
MAX_TRANSFER = (1 << MDTS) << R.PAGE_SHIFT
AERL = 3                            # 0-based: 4 Asynchronous Event Requests
ACL = 3                             # 0-based: 4 Aborts
ELPE = 15                           # 0-based: 16 error log entries
ONCS_DSM, ONCS_WRITE_ZEROES = 1 << 2, 1 << 3
OACS_DBBUF = 1 << 8
LPA_EFFECTS, LPA_EXTENDED = 1 << 1, 1 << 2
VWC_PRESENT_FLUSH_ALL = 0x07        # a volatile write cache; Flush takes NSID FFFFFFFFh
SGLS_SUPPORTED = 0x1                # SGLs, no alignment needed
FRMW_SLOT1_RO_ONE_SLOT = 0x03
CNTRLTYPE_IO = 1
SANICAP_NODMMAS_NOT_MODIFIED = 1 << 30
WCTEMP, CCTEMP, TEMPERATURE = 343, 373, 296     # Kelvin (bhyve reports room temperature)
POWER_PS0_CW = 2500                 # 25 W, in 0.01 W
DLFEAT_ZEROES_WZ_DEAC = 0x09        # deallocated blocks read zeros; Write Zeroes may deallocate
NSID = 1
DATA_UNIT = 1000 * 512              # SMART data units: thousands of 512-byte units, rounded up

ADMIN_OPCODES = (R.ADM_DELETE_SQ, R.ADM_CREATE_SQ, R.ADM_GET_LOG_PAGE, R.ADM_DELETE_CQ, R.ADM_CREATE_CQ,
                 R.ADM_IDENTIFY, R.ADM_ABORT, R.ADM_SET_FEATURES, R.ADM_GET_FEATURES, R.ADM_ASYNC_EVENT,
                 R.ADM_DOORBELL_BUFFER)
WRITING_OPCODES = (R.NVM_WRITE, R.NVM_WRITE_ZEROES, R.NVM_DSM)


def _text(s, n):
    """An ASCII field of ``n`` bytes, space-padded (5.15.2.1: SN, MN, FR)."""
    return s.encode("ascii")[:n].ljust(n, b" ")


def derived_ids(vmname, slot, func, eui64=0):
    """``(eui64 bytes, nguid bytes, subsystem NQN)`` for the controller at ``slot``/``func`` of VM ``vmname``."""
    digest = hashlib.md5(f"vmmshim-nvme:{vmname}:{slot}:{func}".encode()).digest()
    if not eui64:
        eui64 = int.from_bytes(IEEE_OUI + digest[:3], "big") << 16 | NSID
    eui = (eui64 & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
    nguid = hashlib.md5(digest + eui).digest()
    return eui, nguid, f"nqn.2014-08.org.nvmexpress:uuid:{uuid.UUID(bytes=digest)}"


class Identity:
    """The Identify data and static log pages of one controller and its namespace."""

    def __init__(self, *, serial, nsze, lba_shift, readonly, dsm, deallocates, eui64, nguid, subnqn):
        self.serial, self.eui64, self.nguid = serial, eui64, nguid
        self.oncs = ONCS_WRITE_ZEROES | (ONCS_DSM if dsm else 0)
        self.controller = IDENTIFY_CONTROLLER.build(dict(
            vid=VENDOR_ID, ssvid=0, sn=_text(serial, 20), mn=_text(MODEL, 40), fr=_text(FIRMWARE, 8), rab=0,
            ieee=IEEE_OUI, cmic=0, mdts=MDTS, cntlid=0, ver=R.NVME_VERSION, rtd3r=0, rtd3e=0, oaes=0,
            ctratt=0, rrls=0, cntrltype=CNTRLTYPE_IO, fguid=bytes(16), crdt=[0, 0, 0],
            oacs=OACS_DBBUF, acl=ACL, aerl=AERL, frmw=FRMW_SLOT1_RO_ONE_SLOT, lpa=LPA_EFFECTS | LPA_EXTENDED,
            elpe=ELPE, npss=0, avscc=0, apsta=0, wctemp=WCTEMP, cctemp=CCTEMP, mtfa=0, hmpre=0, hmmin=0,
            tnvmcap=0, unvmcap=0, rpmbs=0, edstt=0, dsto=0, fwug=0, kas=0, hctma=0, mntmt=0, mxtmt=0,
            sanicap=SANICAP_NODMMAS_NOT_MODIFIED, hmminds=0, hmmaxd=0, nsetidmax=0, endgidmax=0, anatt=0,
            anacap=0, anagrpmax=0, nanagrpid=0, pels=0,
            sqes=(R.SQES_LOG2 << 4) | R.SQES_LOG2, cqes=(R.CQES_LOG2 << 4) | R.CQES_LOG2, maxcmd=0, nn=1,
            oncs=self.oncs, fuses=0, fna=0, vwc=VWC_PRESENT_FLUSH_ALL, awun=0, awupf=0, nvscc=0, nwpc=0, acwu=0,
            sgls=SGLS_SUPPORTED, mnan=0, subnqn=subnqn.encode("ascii")[:255].ljust(256, b"\0"),
            psd=[dict(mp=POWER_PS0_CW if i == 0 else 0, flags=0, enlat=0, exlat=0, rrt=0, rrl=0, rwt=0, rwl=0,
                      idlp=0, ips=0, actp=0, apw_aps=0) for i in range(32)],
            vendor=bytes(1024)))
        lbaf = [dict(ms=0, lbads=lba_shift if i == 0 else 0, rp=0) for i in range(16)]
        self.namespace = IDENTIFY_NAMESPACE.build(dict(
            nsze=nsze, ncap=nsze, nuse=nsze, nsfeat=0, nlbaf=0, flbas=0, mc=0, dpc=0, dps=0, nmic=0, rescap=0,
            fpi=0, dlfeat=DLFEAT_ZEROES_WZ_DEAC if deallocates else 0, nawun=0, nawupf=0, nacwu=0, nabsn=0,
            nabo=0, nabspf=0, noiob=0, nvmcap=nsze << lba_shift, npwg=0, npwa=0, npdg=0, npda=0, nows=0,
            anagrpid=0, nsattr=1 if readonly else 0, nvmsetid=0, endgid=0, nguid=nguid, eui64=eui64, lbaf=lbaf,
            vendor=bytes(3712)))
        self.descriptors = (NS_DESCRIPTOR.build(dict(nidt=NIDT_EUI64, nidl=8)) + eui64 +
                            NS_DESCRIPTOR.build(dict(nidt=NIDT_NGUID, nidl=16)) + nguid).ljust(R.IDENTIFY_SIZE,
                                                                                              b"\0")
        self.firmware_log = FIRMWARE_LOG.build(dict(afi=1, frs=[_text(FIRMWARE, 8)] + [bytes(8)] * 6))
        self.effects_log = self._effects(dsm)
        self.changed_ns_log = bytes(CHANGED_NS_LOG_SIZE)

    def _effects(self, dsm):
        io_ops = [R.NVM_FLUSH, R.NVM_WRITE, R.NVM_READ, R.NVM_WRITE_ZEROES] + ([R.NVM_DSM] if dsm else [])

        def entry(op, ops):
            if op not in ops:
                return dict(reserved20=0, uuid_sel=False, cse=0, reserved5=0, ccc=False, nic=False, ncc=False,
                            lbcc=False, csupp=False)
            return dict(reserved20=0, uuid_sel=False, cse=0, reserved5=0, ccc=False, nic=False, ncc=False,
                        lbcc=op in WRITING_OPCODES and ops is io_ops, csupp=True)
        return EFFECTS_LOG.build(dict(acs=[entry(i, ADMIN_OPCODES) for i in range(256)],
                                      iocs=[entry(i, io_ops) for i in range(256)]))


def active_nsids(after):
    """Identify CNS 02h: the active namespace IDs greater than ``after``, in a 4 KiB list."""
    ids = [NSID] if after < NSID else []
    return b"".join(i.to_bytes(4, "little") for i in ids).ljust(R.IDENTIFY_SIZE, b"\0")


def smart_log(stats, critical_warning=0):
    """5.14.1.2 from the controller's counters (``stats``: bytes_read, bytes_written, reads, writes, errors)."""
    return SMART_LOG.build(dict(
        critical_warning=critical_warning, temperature=TEMPERATURE, avail_spare=100, spare_thresh=10,
        percent_used=0, endurance_warning=0,
        data_units_read=-(-stats["bytes_read"] // DATA_UNIT),
        data_units_written=-(-stats["bytes_written"] // DATA_UNIT),
        host_reads=stats["reads"], host_writes=stats["writes"], busy_time=0, power_cycles=1, power_on_hours=0,
        unsafe_shutdowns=0, media_errors=stats["media_errors"], error_entries=stats["error_entries"],
        warning_temp_time=0, critical_temp_time=0, temp_sensor=[0] * 8, tmt_count=[0, 0], tmt_time=[0, 0]))


def error_log(entries):
    """5.14.1.1: ``entries`` (newest first, dicts of :data:`~bhyve_devices.nvme.layouts.ERROR_ENTRY` fields)."""
    empty = dict(count=0, sqid=0, cid=0, status=0, param_loc=0, lba=0, nsid=0, vsia=0, trtype=0, csi=0, ttsi=0)
    return b"".join(ERROR_ENTRY.build(e) for e in entries[:ELPE + 1]) + \
        ERROR_ENTRY.build(empty) * (ELPE + 1 - min(len(entries), ELPE + 1))
