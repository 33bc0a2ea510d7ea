"""The CD/DVD drive behind an AHCI port (``cd``): ATAPI, the PACKET command (ATA8-ACS 7.23) carrying SCSI and MMC
commands (SPC-3, MMC-6), over a read-only :class:`~bhyve_devices.backends.BlockBackend` of 2048-byte blocks
(bhyve ``pci_ahci.c``'s ``handle_packet_cmd``).

ATA commands: IDENTIFY PACKET DEVICE (0xA1, :mod:`.identify`), PACKET (0xA0), DEVICE RESET (0x08), SET FEATURES
(transfer mode), CHECK POWER MODE, the power commands, EXECUTE DEVICE DIAGNOSTIC; IDENTIFY DEVICE aborts with the
packet signature in the taskfile (how a host tells a packet device), the rest abort.

SCSI/MMC commands (opcode: what answers):

- TEST UNIT READY (00h), REQUEST SENSE (03h: fixed format, then the sense is cleared), INQUIRY (12h: standard
  data, VPD pages 00h and 80h), START STOP UNIT (1Bh: eject and load the medium, refused while locked), PREVENT
  ALLOW MEDIUM REMOVAL (1Eh), READ CAPACITY (25h), READ(10) (28h) and READ(12) (A8h) straight into the guest
  buffers, READ TOC/PMA/ATIP (43h: formats 0 TOC, 1 session info, 2 full TOC; LBA or MSF), GET CONFIGURATION
  (46h: the Profile List, Core, Removable Medium, Random Readable, CD Read and DVD Read features; RT 0, 1, 2), GET
  EVENT STATUS NOTIFICATION (4Ah: polled, the media class), MODE SENSE(10) (5Ah: pages 01h, 2Ah, 3Fh; current,
  changeable, default), REPORT LUNS (A0h), SET CD SPEED (BBh: accepted).
- The medium is a CD-ROM (profile 0008h), or a DVD-ROM (0010h) past a CD's 80 minutes, as QEMU reports it.

A command that fails ends with CHECK CONDITION: status ERR, the sense key in the error register's high nibble,
the sense (key, ASC, ASCQ) kept for REQUEST SENSE: an unknown opcode is ILLEGAL REQUEST / invalid command
operation code, a bad field ILLEGAL REQUEST / invalid field in CDB, a range past the end ILLEGAL REQUEST / LBA out
of range, no medium NOT READY / medium not present, a host read error MEDIUM ERROR / unrecovered read error, a
PRDT shorter than the data ABORTED COMMAND.

Not supported: writing (no MMC write commands, the image is read-only), audio (PLAY, READ SUBCHANNEL, READ CD),
READ DISC/TRACK INFORMATION, MECHANISM STATUS, asynchronous notification, UNIT ATTENTION after a reset or a medium
change (GET EVENT STATUS NOTIFICATION reports the change instead), MODE SELECT.
"""

import struct

from . import identify
from .ata import (CHECK_POWER_MODE, DEVICE_RESET, EXECUTE_DEVICE_DIAGNOSTIC, IDENTIFY_DEVICE, IDENTIFY_PACKET_DEVICE,
                  IDLE, IDLE_IMMEDIATE, PACKET, SET_FEATURES, SF_SET_XFER, SLEEP, STANDBY, STANDBY_IMMEDIATE)
from .command import PrdtShort, Result, failed, ok
from .layouts import ERR_ABRT, SIG_ATAPI, STS_DRDY, STS_ERR, STS_OK

BLOCK = 2048
CD_MAX_SECTORS = 80 * 60 * 75           #: 80 minutes of 2048-byte sectors: larger media are DVDs
SIGNATURE_TF = bytes((0x01, 0x14, 0xEB, 0, 0, 0, 0))   #: LBA low/mid/high of the packet signature
IREASON_CD_IO = 0x03                    #: the count register's interrupt reason at the end: C/D and I/O
DIAG_PASSED = 0x01

# SCSI/MMC opcodes
TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, START_STOP_UNIT, PREVENT_ALLOW = 0x00, 0x03, 0x12, 0x1B, 0x1E
READ_CAPACITY, READ_10, READ_TOC, GET_CONFIGURATION, GET_EVENT_STATUS = 0x25, 0x28, 0x43, 0x46, 0x4A
MODE_SENSE_10, REPORT_LUNS, READ_12, SET_CD_SPEED = 0x5A, 0xA0, 0xA8, 0xBB

# sense keys and additional sense codes
NO_SENSE, NOT_READY, MEDIUM_ERROR, ILLEGAL_REQUEST, ABORTED_COMMAND = 0x0, 0x2, 0x3, 0x5, 0xB
ASC_UNRECOVERED_READ, ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_INVALID_FIELD = 0x11, 0x20, 0x21, 0x24
ASC_SAVING_NOT_SUPPORTED, ASC_REMOVAL_PREVENTED, ASC_NO_MEDIUM = 0x39, 0x53, 0x3A
ASCQ_REMOVAL_PREVENTED = 0x02

PROFILE_NONE, PROFILE_CD_ROM, PROFILE_DVD_ROM = 0x0000, 0x0008, 0x0010
FEATURE_PROFILES, FEATURE_CORE, FEATURE_REMOVABLE = 0x0000, 0x0001, 0x0003
FEATURE_RANDOM_READ, FEATURE_CD_READ, FEATURE_DVD_READ = 0x0010, 0x001E, 0x001F
PERSISTENT, CURRENT = 0x02, 0x01
INTERFACE_ATAPI = 2
TRAY_EJECT_LOCK = 0x29                  #: loading mechanism 001b (tray), Eject, Lock
NOTIFY_MEDIA, NEA = 4, 0x80
MEDIA_EVENT_NONE, MEDIA_EVENT_NEW, MEDIA_EVENT_REMOVED = 0, 2, 3
SPEED_24X = 24 * 176                    #: kB/s
PAGE_ERROR_RECOVERY, PAGE_CAPABILITIES, PAGE_ALL = 0x01, 0x2A, 0x3F
PC_CHANGEABLE, PC_SAVED = 1, 3

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")


def be16(b):
    return _BE16.unpack(b)[0]


def be32(b):
    return _BE32.unpack(b)[0]


def msf(lba):
    """``(minute, second, frame)`` of ``lba`` (150 frames of lead-in; minutes clamped at 255)."""
    f = lba + 150
    return min(f // (60 * 75), 0xFF), (f // 75) % 60, f % 75


class AtapiCd:
    """The packet device of a ``cd`` port over ``backend``; ``execute(cmd)`` serves one command."""

    atapi = True
    signature = SIG_ATAPI

    def __init__(self, backend, serial, model="BHYVE SATA DVD ROM", firmware="001"):
        self.backend = backend
        self.sectors = backend.size // BLOCK
        self.dvd = self.sectors > CD_MAX_SECTORS
        self._ident_args = dict(serial=serial, model=model, firmware=firmware)
        self.serial = serial
        self.medium = self.sectors > 0
        self.locked = False
        self.event = MEDIA_EVENT_NONE
        self.reset()
        self._scsi = {TEST_UNIT_READY: self._test_unit_ready, REQUEST_SENSE: self._request_sense,
                      INQUIRY: self._inquiry, START_STOP_UNIT: self._start_stop, PREVENT_ALLOW: self._prevent,
                      READ_CAPACITY: self._read_capacity, READ_10: self._read, READ_12: self._read,
                      READ_TOC: self._read_toc, GET_CONFIGURATION: self._get_configuration,
                      GET_EVENT_STATUS: self._event_status, MODE_SENSE_10: self._mode_sense,
                      REPORT_LUNS: self._report_luns, SET_CD_SPEED: lambda cmd, cdb: self._good()}

    def reset(self):
        self.sense = (NO_SENSE, 0, 0)
        self.xfer = identify.XFER_DEFAULT
        self.locked = False

    def execute(self, cmd):
        op = cmd.cfis[2]
        if op == PACKET:
            fn = self._scsi.get(cmd.acmd[0])
            if fn is None:
                return self._check(ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
            return fn(cmd, cmd.acmd)
        if op == IDENTIFY_PACKET_DEVICE:
            if not cmd.prdtl:
                return failed(ERR_ABRT, pio=True)
            return ok(cmd.data_in(identify.packet(xfer=self.xfer, **self._ident_args)), pio=True)
        if op == IDENTIFY_DEVICE:
            return failed(ERR_ABRT, tf=SIGNATURE_TF, count=1)
        if op in (DEVICE_RESET, EXECUTE_DEVICE_DIAGNOSTIC):
            self.reset()
            return Result(0, DIAG_PASSED, tf=SIGNATURE_TF, count=1)
        if op == SET_FEATURES:
            if cmd.cfis[3] != SF_SET_XFER or not identify.valid_xfer(cmd.cfis[12]):
                return failed(ERR_ABRT)
            self.xfer = cmd.cfis[12]
            return ok()
        if op == CHECK_POWER_MODE:
            return ok(count=0xFF)
        if op in (STANDBY_IMMEDIATE, IDLE_IMMEDIATE, STANDBY, IDLE, SLEEP):
            return ok()
        return failed(ERR_ABRT)

    # -- endings --------------------------------------------------------------------------------------------------
    def _good(self, transferred=0):
        self.sense = (NO_SENSE, 0, 0)
        return Result(STS_OK, 0, transferred, count=IREASON_CD_IO)

    def _check(self, key, asc, ascq=0):
        self.sense = (key, asc, ascq)
        error = key << 4 | (ERR_ABRT if key == ABORTED_COMMAND else 0)
        return Result(STS_DRDY | STS_ERR, error, count=IREASON_CD_IO)

    def _reply(self, cmd, data, alloc):
        return self._good(cmd.data_in(data[:alloc]))

    def _no_medium(self):
        return self._check(NOT_READY, ASC_NO_MEDIUM)

    # -- SPC ------------------------------------------------------------------------------------------------------
    def _test_unit_ready(self, cmd, cdb):
        return self._good() if self.medium else self._no_medium()

    def _request_sense(self, cmd, cdb):
        key, asc, ascq = self.sense
        data = bytearray(18)
        data[0], data[2], data[7], data[12], data[13] = 0x70, key, 10, asc, ascq
        return self._reply(cmd, bytes(data), cdb[4])

    def _inquiry(self, cmd, cdb):
        alloc = be16(cdb[3:5])
        if cdb[1] & 1:
            if cdb[2] == 0x00:
                data = bytes((0x05, 0x00, 0x00, 2, 0x00, 0x80))
            elif cdb[2] == 0x80:
                serial = self.serial.encode("ascii", "replace")[:20]
                data = bytes((0x05, 0x80, 0x00, len(serial))) + serial
            else:
                return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        elif cdb[2]:
            return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        else:
            data = (bytes((0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0)) + b"BHYVE   " + b"BHYVE DVD-ROM".ljust(16)
                    + b"001 ")
        return self._reply(cmd, data, alloc)

    def _start_stop(self, cmd, cdb):
        start, loej = cdb[4] & 1, cdb[4] & 2
        if loej and not start:
            if self.locked:
                return self._check(ILLEGAL_REQUEST, ASC_REMOVAL_PREVENTED, ASCQ_REMOVAL_PREVENTED)
            if self.medium:
                self.medium, self.event = False, MEDIA_EVENT_REMOVED
        elif loej and start and not self.medium and self.sectors:
            self.medium, self.event = True, MEDIA_EVENT_NEW
        return self._good()

    def _prevent(self, cmd, cdb):
        self.locked = bool(cdb[4] & 1)
        return self._good()

    def _report_luns(self, cmd, cdb):
        return self._reply(cmd, _BE32.pack(8) + bytes(12), be32(cdb[6:10]))

    # -- MMC ------------------------------------------------------------------------------------------------------
    def _read_capacity(self, cmd, cdb):
        if not self.medium:
            return self._no_medium()
        return self._reply(cmd, struct.pack(">II", self.sectors - 1, BLOCK), 8)

    def _read(self, cmd, cdb):
        lba = be32(cdb[2:6])
        count = be16(cdb[7:9]) if cdb[0] == READ_10 else be32(cdb[6:10])
        if not self.medium:
            return self._no_medium()
        if lba + count > self.sectors:
            return self._check(ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        length = count * BLOCK
        try:
            segs = cmd.buffers(length)
        except PrdtShort:
            return self._check(ABORTED_COMMAND, 0)
        try:
            if length:
                self.backend.preadv_full(segs, lba * BLOCK, length)
        except OSError:
            return self._check(MEDIUM_ERROR, ASC_UNRECOVERED_READ)
        return self._good(length)

    def _address(self, lba, in_msf):
        return bytes((0,) + msf(lba)) if in_msf else _BE32.pack(lba)

    def _read_toc(self, cmd, cdb):
        in_msf, fmt, track, alloc = bool(cdb[1] & 2), cdb[2] & 0x0F, cdb[6], be16(cdb[7:9])
        if fmt == 0:
            fmt = cdb[9] >> 6                   # the format's older place (SFF-8020)
        if not self.medium:
            return self._no_medium()
        if fmt == 0:
            if track > 1 and track != 0xAA:
                return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            descs = b""
            if track <= 1:
                descs += bytes((0, 0x14, 1, 0)) + self._address(0, in_msf)
            descs += bytes((0, 0x14, 0xAA, 0)) + self._address(self.sectors, in_msf)
        elif fmt == 1:
            descs = bytes((0, 0x14, 1, 0)) + self._address(0, in_msf)
        elif fmt == 2:
            points = ((0xA0, (1, 0, 0)), (0xA1, (1, 0, 0)), (0xA2, msf(self.sectors)), (1, msf(0)))
            descs = b"".join(bytes((1, 0x14, 0, point, 0, 0, 0, 0) + where) for point, where in points)
        else:
            return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        return self._reply(cmd, _BE16.pack(2 + len(descs)) + bytes((1, 1)) + descs, alloc)

    def _profile(self):
        if not self.medium:
            return PROFILE_NONE
        return PROFILE_DVD_ROM if self.dvd else PROFILE_CD_ROM

    def _features(self, profile):
        """``(code, flags, body)`` of each feature, in code order."""
        media = self.medium
        profiles = b"".join(struct.pack(">HBx", p, int(p == profile)) for p in (PROFILE_DVD_ROM, PROFILE_CD_ROM))
        return ((FEATURE_PROFILES, PERSISTENT | CURRENT, profiles),
                (FEATURE_CORE, PERSISTENT | CURRENT, struct.pack(">I4x", INTERFACE_ATAPI)),
                (FEATURE_REMOVABLE, PERSISTENT | CURRENT, bytes((TRAY_EJECT_LOCK, 0, 0, 0))),
                (FEATURE_RANDOM_READ, CURRENT if media else 0, struct.pack(">IHBx", BLOCK, 16 if self.dvd else 1, 0)),
                (FEATURE_CD_READ, CURRENT if media and not self.dvd else 0, bytes(4)),
                (FEATURE_DVD_READ, CURRENT if media and self.dvd else 0, bytes(4)))

    def _get_configuration(self, cmd, cdb):
        rt, start, alloc = cdb[1] & 3, be16(cdb[2:4]), be16(cdb[7:9])
        if rt == 3:
            return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        profile = self._profile()
        out = []
        for code, flags, body in self._features(profile):
            if code < start or (rt == 1 and not flags & CURRENT) or (rt == 2 and code != start):
                continue
            out.append(struct.pack(">HBB", code, flags, len(body)) + body)
        data = b"".join(out)
        return self._reply(cmd, struct.pack(">I2xH", 4 + len(data), profile) + data, alloc)

    def _event_status(self, cmd, cdb):
        if not cdb[1] & 1:                      # asynchronous notification is not offered
            return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        alloc = be16(cdb[7:9])
        supported = 1 << NOTIFY_MEDIA
        if cdb[4] & supported:
            body = bytes((self.event, 0x02 if self.medium else 0x00, 0, 0))
            self.event = MEDIA_EVENT_NONE
            data = struct.pack(">HBB", 2 + len(body), NOTIFY_MEDIA, supported) + body
        else:
            data = struct.pack(">HBB", 2, NEA, supported)
        return self._reply(cmd, data, alloc)

    def _mode_pages(self):
        recovery = bytes((PAGE_ERROR_RECOVERY, 10, 0, 5) + (0,) * 8)
        lock = 0x02 if self.locked else 0
        caps = (bytes((PAGE_CAPABILITIES, 20, 0x0B, 0x00, 0x70, 0x00, TRAY_EJECT_LOCK | lock, 0x00))
                + struct.pack(">HHHH", SPEED_24X, 0, 0, SPEED_24X) + bytes(6))
        return {PAGE_ERROR_RECOVERY: recovery, PAGE_CAPABILITIES: caps}

    def _mode_sense(self, cmd, cdb):
        pc, code, alloc = cdb[2] >> 6, cdb[2] & 0x3F, be16(cdb[7:9])
        if pc == PC_SAVED:
            return self._check(ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED)
        pages = self._mode_pages()
        if code == PAGE_ALL:
            chosen = [pages[PAGE_ERROR_RECOVERY], pages[PAGE_CAPABILITIES]]
        elif code in pages:
            chosen = [pages[code]]
        else:
            return self._check(ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        if pc == PC_CHANGEABLE:                 # nothing can be changed
            chosen = [p[:2] + bytes(len(p) - 2) for p in chosen]
        body = b"".join(chosen)
        return self._reply(cmd, struct.pack(">HBB4x", 6 + len(body), 0, 0) + body, alloc)

    def close(self):
        self.backend.close()
