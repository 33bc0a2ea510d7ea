"""The disk behind an AHCI port (``hd``): ATA/ATAPI-8 ACS commands over a
:class:`~bhyve_devices.backends.BlockBackend` (bhyve ``pci_ahci.c``'s ``ahci_handle_cmd`` and what it calls).

Commands (opcode: ACS section):

- reads and writes, 28- and 48-bit: READ/WRITE SECTORS (0x20/0x30, EXT 0x24/0x34), READ/WRITE MULTIPLE
  (0xC4/0xC5, EXT 0x29/0x39), READ/WRITE DMA (0xC8/0xCA, EXT 0x25/0x35), and NCQ's READ/WRITE FPDMA QUEUED
  (0x60/0x61; the FUA bit flushes after the write): ``preadv_full``/``pwritev_full`` straight between the image
  and the guest buffers the PRDT names;
- FLUSH CACHE (0xE7, EXT 0xEA): ``backend.flush()``;
- TRIM: DATA SET MANAGEMENT (0x06) and SEND FPDMA QUEUED (0x64) with the DSM subcommand: every range is checked
  before any is discarded (``backend.discard``); offered (IDENTIFY word 169, log 13h) unless the image is
  read-only, cannot delete, or ``nodelete``;
- IDENTIFY DEVICE (0xEC, :mod:`.identify`), SET FEATURES (0xEF: write cache, read look-ahead, transfer mode,
  revert to defaults), SET MULTIPLE MODE (0xC6), CHECK POWER MODE (0xE5: active), the power commands
  (0xE0-0xE3, 0xE6: done at once), READ VERIFY SECTORS (0x40/0x42: the range is checked), EXECUTE DEVICE
  DIAGNOSTIC (0x90), RECALIBRATE (0x10);
- READ LOG EXT (0x2F) and READ LOG DMA EXT (0x47): the log directory (00h), the NCQ command error log (10h: the
  last failed command, cleared when read) and the NCQ send/receive log (13h: queued TRIM).

The compiled data command: where the backend offers one (``serve_ahci``, an optional method of
:class:`~bhyve_devices.backends.BlockBackend`: ``vmmshim/backends/ahcifast.c``), the port offers each slot to
:meth:`AtaDisk.serve_compiled` first; it serves READ/WRITE DMA (EXT) and READ/WRITE FPDMA QUEUED whose command,
range and PRDT the Python path would serve without an error, and hands back what the port's endings need;
:meth:`AtaDisk.end_compiled` gives its Result (a failed host transfer is ABORT, as in Python; the flush of FUA or a
disabled write cache stays here). Everything else comes back None, and the port fetches the command and calls
:meth:`AtaDisk.execute` as it would without it.

A port that serves short transfers on the vCPU that issued them (``Hba.inline_max``) asks
:meth:`AtaDisk.compiled_length` first: the bytes a slot's command FIS asks the compiled path to move, for the
commands it serves with no flush after them.

Errors: an LBA range past the end is ID NOT FOUND; a write to a read-only image, a PRDT shorter than the
transfer, a host I/O error and every other opcode (NOP, IDENTIFY PACKET DEVICE, PACKET, SMART, SECURITY...) are
ABORT. Nothing reaches the image before its command was checked whole. With the write cache turned off (SET
FEATURES 82h) every write is flushed.

Not supported: CHS addressing (LBA only), the Security, SMART, HPA, streaming and power-up-in-standby feature sets,
WRITE DMA FUA EXT and the other FUA opcodes (not offered), READ/WRITE LOG EXT to other logs, NCQ priority.
"""

import struct

from . import identify
from .command import CFIS_BYTES, PrdtShort, Result, failed, ok
from .layouts import ERR_ABRT, ERR_IDNF, FIS_TYPE_H2D, H2D_C, SIG_ATA, STS_OK, lba28, lba48

# ACS opcodes
NOP = 0x00
DATA_SET_MANAGEMENT = 0x06
DEVICE_RESET = 0x08
RECALIBRATE = 0x10
READ_SECTORS, READ_SECTORS_EXT = 0x20, 0x24
READ_DMA_EXT, READ_MULTIPLE_EXT = 0x25, 0x29
READ_LOG_EXT = 0x2F
WRITE_SECTORS, WRITE_SECTORS_EXT = 0x30, 0x34
WRITE_DMA_EXT, WRITE_MULTIPLE_EXT = 0x35, 0x39
READ_VERIFY, READ_VERIFY_EXT = 0x40, 0x42
READ_LOG_DMA_EXT = 0x47
READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED, SEND_FPDMA_QUEUED = 0x60, 0x61, 0x64
EXECUTE_DEVICE_DIAGNOSTIC = 0x90
PACKET, IDENTIFY_PACKET_DEVICE = 0xA0, 0xA1
READ_MULTIPLE, WRITE_MULTIPLE, SET_MULTIPLE_MODE = 0xC4, 0xC5, 0xC6
READ_DMA, WRITE_DMA = 0xC8, 0xCA
STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE = 0xE0, 0xE1, 0xE2, 0xE3
CHECK_POWER_MODE, SLEEP, FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE5, 0xE6, 0xE7, 0xEA
IDENTIFY_DEVICE, SET_FEATURES = 0xEC, 0xEF

NCQ = frozenset((READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED, SEND_FPDMA_QUEUED))
READS_28 = frozenset((READ_SECTORS, READ_MULTIPLE, READ_DMA))
READS_48 = frozenset((READ_SECTORS_EXT, READ_MULTIPLE_EXT, READ_DMA_EXT))
WRITES_28 = frozenset((WRITE_SECTORS, WRITE_MULTIPLE, WRITE_DMA))
WRITES_48 = frozenset((WRITE_SECTORS_EXT, WRITE_MULTIPLE_EXT, WRITE_DMA_EXT))
COMPILED_WRITES = frozenset((WRITE_DMA, WRITE_DMA_EXT, WRITE_FPDMA_QUEUED))
COMPILED_OPS = COMPILED_WRITES | {READ_DMA, READ_DMA_EXT, READ_FPDMA_QUEUED}    #: what ahcifast.c moves
PIO_IN = frozenset((READ_SECTORS, READ_SECTORS_EXT, READ_MULTIPLE, READ_MULTIPLE_EXT, IDENTIFY_DEVICE,
                    IDENTIFY_PACKET_DEVICE, READ_LOG_EXT))

# SET FEATURES subcommands (features field)
SF_ENABLE_WCACHE, SF_DISABLE_WCACHE = 0x02, 0x82
SF_SET_XFER = 0x03
SF_DISABLE_LOOKAHEAD, SF_ENABLE_LOOKAHEAD = 0x55, 0xAA
SF_DISABLE_REVERT, SF_ENABLE_REVERT = 0x66, 0xCC

DSM_TRIM = 0x01                 #: DATA SET MANAGEMENT features bit 0 / SEND FPDMA's auxiliary bit 0
SFQ_DSM = 0x00                  #: SEND FPDMA QUEUED subcommand: DATA SET MANAGEMENT
MAX_DSM_BLOCKS = 8              #: 512-byte blocks of ranges taken per TRIM (IDENTIFY offers 1)
DSM_RANGE = struct.Struct("<Q")
LBA48_MASK = (1 << 48) - 1

LOG_DIRECTORY, LOG_NCQ_ERROR, LOG_NCQ_SEND_RECV = 0x00, 0x10, 0x13
LOG_PAGE = 512
NCQ_ERROR_NQ = 0x80             #: log 10h byte 0: the failed command was not queued
DEFAULT_MULTIPLE = 128
DEVICE_FUA = 0x80               #: WRITE FPDMA QUEUED's device field: forced unit access
POWER_ACTIVE = 0xFF
DIAG_PASSED = 0x01
SIGNATURE_TF = bytes((1, 0, 0, 0, 0, 0, 0))  #: LBA low 1 (ATA); count 1 goes in ``count``


def _sectors(c):
    """The sector count of the command FIS ``c`` (a count of 0 means 256, or 65536 for 48-bit commands)."""
    op = c[2]
    if op in NCQ:
        return (c[3] | c[11] << 8) or 65536
    if op in READS_48 or op in WRITES_48 or op == READ_VERIFY_EXT:
        return (c[12] | c[13] << 8) or 65536
    return c[12] or 256


def _log_page(fill):
    page = bytearray(LOG_PAGE)
    fill(page)
    return bytes(page)


class AtaDisk:
    """The ATA device of an ``hd`` port over ``backend``; ``execute(cmd)`` serves one command."""

    atapi = False
    signature = SIG_ATA

    def __init__(self, backend, serial, model="BHYVE SATA DISK", firmware="001", sectorsize=512, physical=None,
                 nodelete=False, rotation=0):
        self.backend = backend
        self.ss = sectorsize
        self.physical = physical or sectorsize
        self.sectors = backend.size // sectorsize
        self.readonly = bool(backend.readonly)
        self.trim = bool(backend.candelete) and not self.readonly and not nodelete
        self._ident_args = dict(serial=serial, model=model, firmware=firmware, sectors=self.sectors,
                                sectorsize=sectorsize, physical=self.physical, trim=self.trim, rotation=rotation)
        self._ident = None
        self.error_log = None           # (tag | NQ, status, error, cfis[4:20]) of the last failed command
        self._serve_slot = getattr(backend, "serve_ahci", None) if getattr(backend, "compiled", False) else None
        self.compiled = self._serve_slot is not None    #: :meth:`serve_compiled` may serve slots
        self._taken = None              # what the compiled command took, until end_compiled
        self.reset()
        self._ops = {IDENTIFY_DEVICE: self._identify, SET_FEATURES: self._set_features,
                     SET_MULTIPLE_MODE: self._set_multiple, FLUSH_CACHE: self._flush, FLUSH_CACHE_EXT: self._flush,
                     DATA_SET_MANAGEMENT: self._dsm, SEND_FPDMA_QUEUED: self._send_fpdma,
                     READ_LOG_EXT: self._read_log, READ_LOG_DMA_EXT: self._read_log,
                     CHECK_POWER_MODE: lambda c: ok(count=POWER_ACTIVE),
                     READ_VERIFY: self._verify, READ_VERIFY_EXT: self._verify,
                     EXECUTE_DEVICE_DIAGNOSTIC: lambda c: self._diagnostic()}
        for op in (STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE, SLEEP, RECALIBRATE):
            self._ops[op] = lambda c: ok()
        for op in READS_28 | READS_48 | WRITES_28 | WRITES_48 | {READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED}:
            self._ops[op] = self._rw

    def reset(self):
        """A device reset (COMRESET, software reset): the power-on settings."""
        self.multiple = DEFAULT_MULTIPLE
        self.xfer = identify.XFER_DEFAULT
        self.write_cache = True
        self.lookahead = True
        self._ident = None

    @property
    def identify_data(self):
        if self._ident is None:
            self._ident = identify.disk(multiple=self.multiple, xfer=self.xfer, write_cache=self.write_cache,
                                       lookahead=self.lookahead, **self._ident_args)
        return self._ident

    def execute(self, cmd):
        """Serves ``cmd`` (a :class:`~bhyve_devices.ahci.command.Command`); returns its Result. HostBusFault
        (a guest address outside RAM) goes to the port."""
        op = cmd.cfis[2]
        fn = self._ops.get(op)
        res = fn(cmd) if fn is not None else failed(ERR_ABRT)
        if res.failed:
            self._log_failure(cmd.cfis, res)
        return res

    def _log_failure(self, cfis, res):
        tag = (cfis[12] >> 3) if cfis[2] in NCQ else NCQ_ERROR_NQ
        self.error_log = (tag, res.status, res.error, cfis[4:20])

    def serve_compiled(self, ram, cmdlist, slot):
        """Slot ``slot`` of the command list at ``cmdlist`` through the backend's compiled data command (see the
        module docstring), ``ram`` being the first RAM area: ``(flags, prdtl, cfis)`` of a command it took (a DMA
        command has moved its data, an NCQ command moves it in :meth:`end_compiled`, after the port accepted it),
        or None (nothing read or written) where the port must fetch it and :meth:`execute` it."""
        if self._serve_slot is None:
            return None
        got = self._serve_slot(ram, cmdlist, slot, self.sectors, self.ss)
        if got is None:
            return None
        self._taken = got
        return got[1], got[2], got[3]

    def end_compiled(self):
        """The Result of the command :meth:`serve_compiled` took, its NCQ transfer made first: as :meth:`_rw`
        ends (ABORT for a failed transfer or flush, the flush of FUA or a disabled write cache)."""
        moved, _, _, cfis, error, finish = self._taken
        self._taken = None
        if finish is not None:
            error = finish()
        op = cfis[2]
        res = failed(ERR_ABRT) if error else ok(moved)
        if not error and (op in WRITES_28 or op in WRITES_48 or op == WRITE_FPDMA_QUEUED):
            try:
                self._write_through(op, cfis)
            except OSError:
                res = failed(ERR_ABRT)
        if res.failed:
            self._log_failure(cfis, res)
        return res

    def compiled_length(self, cfis):
        """The bytes the Register H2D FIS ``cfis`` asks to move where the compiled path serves it without a flush
        after it (READ/WRITE DMA (EXT) and READ/WRITE FPDMA QUEUED; not a write with FUA or with the write cache
        off), else None. Only a hint for where to serve it: the compiled path checks the command again."""
        if not self.compiled or len(cfis) < CFIS_BYTES or cfis[0] != FIS_TYPE_H2D or not cfis[1] & H2D_C:
            return None
        op = cfis[2]
        if op not in COMPILED_OPS:
            return None
        if op in COMPILED_WRITES and (not self.write_cache or op == WRITE_FPDMA_QUEUED and cfis[7] & DEVICE_FUA):
            return None
        return _sectors(cfis) * self.ss

    # -- data transfers -------------------------------------------------------------------------------------------
    def _range(self, cmd):
        """``(lba, sectors)`` of a read or write command (a count of 0 means 256, or 65536 for 48-bit ones)."""
        c, op = cmd.cfis, cmd.cfis[2]
        return (lba48(c) if op in NCQ or op in READS_48 or op in WRITES_48 or op == READ_VERIFY_EXT else lba28(c),
                _sectors(c))

    def _rw(self, cmd):
        op = cmd.cfis[2]
        write = op in WRITES_28 or op in WRITES_48 or op == WRITE_FPDMA_QUEUED
        lba, count = self._range(cmd)
        if lba + count > self.sectors:
            return failed(ERR_IDNF)
        if write and self.readonly:
            return failed(ERR_ABRT)
        length = count * self.ss
        try:
            segs = cmd.buffers(length)
        except PrdtShort:
            return failed(ERR_ABRT)
        try:
            if write:
                self.backend.pwritev_full(segs, lba * self.ss, length)
                self._write_through(op, cmd.cfis)
            else:
                self.backend.preadv_full(segs, lba * self.ss, length)
        except OSError:
            return failed(ERR_ABRT)
        return ok(length, pio=op in PIO_IN)

    def _write_through(self, op, cfis):
        """After a write: the flush FUA (WRITE FPDMA QUEUED) or a disabled write cache asks for."""
        if not self.write_cache or (op == WRITE_FPDMA_QUEUED and cfis[7] & DEVICE_FUA):
            self.backend.flush()

    def _verify(self, cmd):
        lba, count = self._range(cmd)
        return failed(ERR_IDNF) if lba + count > self.sectors else ok()

    def _flush(self, cmd):
        try:
            self.backend.flush()
        except OSError:
            return failed(ERR_ABRT)
        return ok()

    # -- TRIM ----------------------------------------------------------------------------------------------------
    def _dsm(self, cmd):
        c = cmd.cfis
        if not c[3] & DSM_TRIM:
            return failed(ERR_ABRT)
        return self._trim(cmd, c[12] | c[13] << 8)

    def _send_fpdma(self, cmd):
        c = cmd.cfis
        if c[13] & 0x1F != SFQ_DSM or not c[16] & DSM_TRIM:
            return failed(ERR_ABRT)
        return self._trim(cmd, c[3] | c[11] << 8)

    def _trim(self, cmd, blocks):
        if not self.trim or not 1 <= blocks <= MAX_DSM_BLOCKS:
            return failed(ERR_ABRT)
        data = cmd.data_out(blocks * LOG_PAGE)
        if len(data) < blocks * LOG_PAGE:
            return failed(ERR_ABRT)
        ranges = []
        for (entry,) in DSM_RANGE.iter_unpack(data):
            lba, n = entry & LBA48_MASK, entry >> 48
            if n:
                if lba + n > self.sectors:
                    return failed(ERR_IDNF)
                ranges.append((lba, n))
        try:
            for lba, n in ranges:
                self.backend.discard(lba * self.ss, n * self.ss)
        except OSError:
            return failed(ERR_ABRT)
        return ok(len(data))

    # -- the rest -------------------------------------------------------------------------------------------------
    def _identify(self, cmd):
        if not cmd.prdtl:
            return failed(ERR_ABRT, pio=True)
        return ok(cmd.data_in(self.identify_data), pio=True)

    def _diagnostic(self):
        """EXECUTE DEVICE DIAGNOSTIC: error 01h (passed), the signature in the taskfile."""
        return Result(STS_OK, DIAG_PASSED, tf=SIGNATURE_TF, count=1)

    def _set_features(self, cmd):
        sub, count = cmd.cfis[3], cmd.cfis[12]
        if sub in (SF_ENABLE_WCACHE, SF_DISABLE_WCACHE):
            self.write_cache = sub == SF_ENABLE_WCACHE
        elif sub in (SF_ENABLE_LOOKAHEAD, SF_DISABLE_LOOKAHEAD):
            self.lookahead = sub == SF_ENABLE_LOOKAHEAD
        elif sub == SF_SET_XFER:
            if not identify.valid_xfer(count):
                return failed(ERR_ABRT)
            self.xfer = count
        elif sub not in (SF_DISABLE_REVERT, SF_ENABLE_REVERT):
            return failed(ERR_ABRT)
        self._ident = None
        return ok()

    def _set_multiple(self, cmd):
        n = cmd.cfis[12]
        if n > DEFAULT_MULTIPLE or n & (n - 1):
            return failed(ERR_ABRT)
        self.multiple = n
        self._ident = None
        return ok()

    def _read_log(self, cmd):
        c = cmd.cfis
        addr, page, count = c[4], c[5] | c[9] << 8, c[12] | c[13] << 8
        if page != 0 or count != 1:
            return failed(ERR_ABRT, pio=c[2] == READ_LOG_EXT)
        if addr == LOG_DIRECTORY:
            data = _log_page(self._fill_directory)
        elif addr == LOG_NCQ_ERROR:
            data = _log_page(self._fill_ncq_error)
            self.error_log = None
        elif addr == LOG_NCQ_SEND_RECV:
            data = _log_page(self._fill_send_recv)
        else:
            return failed(ERR_ABRT, pio=c[2] == READ_LOG_EXT)
        return ok(cmd.data_in(data), pio=c[2] == READ_LOG_EXT)

    def _fill_directory(self, page):
        struct.pack_into("<H", page, 0, 1)                      # general purpose logging version 1
        for log in (LOG_NCQ_ERROR, LOG_NCQ_SEND_RECV):
            struct.pack_into("<H", page, 2 * log, 1)            # one page each

    def _fill_ncq_error(self, page):
        if self.error_log is not None:
            tag, status, error, taskfile = self.error_log
            page[0], page[2], page[3] = tag, status, error
            page[4:4 + len(taskfile)] = taskfile
        page[LOG_PAGE - 1] = -sum(page[:LOG_PAGE - 1]) & 0xFF

    def _fill_send_recv(self, page):
        if self.trim:
            page[0] = 1                                         # queued DATA SET MANAGEMENT
            page[4] = 1                                         # ... with TRIM

    def close(self):
        self.backend.close()

