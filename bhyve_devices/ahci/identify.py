"""The 512 bytes of IDENTIFY DEVICE (a disk) and IDENTIFY PACKET DEVICE (the CD): ATA/ATAPI-8 ACS section 7.16
and 7.17, the words bhyve's ``ata_identify_init`` fills, with ACS's meaning.

Strings are ATA strings (ASCII padded with spaces, the two bytes of each word swapped). Word 255 is the integrity
word: 0xA5 and a checksum that makes the 512 bytes sum to 0 modulo 256.

Not supported: the Security, SMART, HPA, streaming, power-up-in-standby feature sets, and the IDENTIFY DEVICE data
log (these words stay 0).
"""

import struct

WORDS = 256

# a few words by name (ACS table 45)
W_CONFIG, W_CYLS, W_HEADS, W_SPT = 0, 1, 3, 6
W_SERIAL, W_FIRMWARE, W_MODEL = 10, 23, 27
W_MULTIPLE_MAX, W_CAPS, W_CAPS2, W_VALID, W_MULTIPLE = 47, 49, 50, 53, 59
W_LBA28, W_MWDMA, W_PIO, W_CYCLE = 60, 63, 64, 65
W_ADDITIONAL, W_QUEUE, W_SATA_CAPS, W_SATA_CAPS2 = 69, 75, 76, 77
W_MAJOR, W_MINOR, W_CMDSET, W_CMDSET_ENABLED = 80, 81, 82, 85
W_UDMA, W_LBA48, W_DSM_BLOCKS, W_SECTOR_SIZES = 88, 100, 105, 106
W_LOGICAL_SIZE, W_CMDSET3, W_CMDSET3_ENABLED = 117, 119, 120
W_DSM, W_ALIGNMENT, W_ROTATION, W_TRANSPORT, W_INTEGRITY = 169, 209, 217, 222, 255

CONFIG_DISK = 0x0040                    #: bit 15 0: ATA device
CONFIG_CD = 0x85C0                      #: ATAPI, CD-ROM (type 5), removable, DRQ fast, 12-byte packets
CAPS_DMA, CAPS_LBA, CAPS_IORDY = 1 << 8, 1 << 9, 1 << 11
VALID_64_70, VALID_88 = 1 << 1, 1 << 2
SATA_GEN1_3 = 0x000E                    #: word 76: 1.5, 3 and 6 Gb/s
SATA_NCQ = 1 << 8
SATA2_RCVSND_FPDMA = 1 << 6             #: word 77: SEND/RECEIVE FPDMA QUEUED
MAJOR_ATA4_ACS2 = 0x03F0
MINOR_ATA8_ACS = 0x0028
CS_POWERMGT, CS_PACKET, CS_WCACHE, CS_LOOKAHEAD, CS_RESET, CS_NOP = 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 9, 1 << 14
CS2_LBA48, CS2_FLUSH, CS2_FLUSH_EXT = 1 << 10, 1 << 12, 1 << 13
CS3_GPL = 1 << 5
VALID_BIT14 = 1 << 14                   #: "shall be one" in words 50, 83, 84, 87, 106, 119, 120, 209
W86_W119_VALID = 1 << 15
ADDITIONAL_RZAT, ADDITIONAL_DRAT = 1 << 5, 1 << 14
CS3_RW_LOG_DMA = 1 << 3
DSM_TRIM = 1 << 0
SS_MULTIPLE, SS_LARGE_LOGICAL = 1 << 13, 1 << 12
TRANSPORT_SATA3 = 0x1020
INTEGRITY_SIGNATURE = 0xA5
CYCLE_NS = 0x78                         #: 120 ns: PIO 4, MWDMA 2
MAX_CHS = (16383, 16, 63)
LBA28_MAX = 0x0FFFFFFF

# SET FEATURES' transfer modes (count field): class in bits 7:3, mode in 2:0
XFER_PIO_FLOW, XFER_MWDMA, XFER_UDMA = 0x08, 0x20, 0x40
XFER_DEFAULT = XFER_UDMA | 6
MAX_MODE = {XFER_PIO_FLOW: 4, XFER_MWDMA: 2, XFER_UDMA: 6}


def ata_string(text, nbytes):
    """``text`` as an ATA string field of ``nbytes`` bytes (each word's bytes swapped)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    out = bytearray(nbytes)
    out[0::2], out[1::2] = raw[1::2], raw[0::2]
    return bytes(out)


def _put_string(words, index, text, nbytes):
    words[index:index + nbytes // 2] = struct.unpack(f"<{nbytes // 2}H", ata_string(text, nbytes))


def valid_xfer(mode):
    """Whether SET FEATURES may select transfer mode byte ``mode`` (PIO default 0/1, PIO 0-4, MWDMA 0-2,
    UDMA 0-6)."""
    if mode in (0, 1):
        return True
    cls = mode & 0xF8
    return cls in MAX_MODE and mode & 7 <= MAX_MODE[cls]


def _modes(words, xfer):
    words[W_MWDMA] = 0x0007 | ((1 << (8 + (xfer & 7))) if xfer & 0xF8 == XFER_MWDMA else 0)
    words[W_PIO] = 0x0003
    words[W_CYCLE:W_CYCLE + 4] = [CYCLE_NS] * 4
    words[W_UDMA] = 0x007F | ((1 << (8 + (xfer & 7))) if xfer & 0xF8 == XFER_UDMA else 0)


def _finish(words):
    words[W_INTEGRITY] = INTEGRITY_SIGNATURE
    data = bytearray(struct.pack(f"<{WORDS}H", *words))
    data[511] = -sum(data[:511]) & 0xFF
    return bytes(data)


def _strings(words, serial, firmware, model):
    _put_string(words, W_SERIAL, serial, 20)
    _put_string(words, W_FIRMWARE, firmware, 8)
    _put_string(words, W_MODEL, model, 40)


def chs(sectors):
    """The obsolete geometry words 1, 3, 6 for ``sectors`` (16 heads, 63 sectors a track, at most 16383
    cylinders)."""
    cyls, heads, spt = MAX_CHS
    return min(cyls, sectors // (heads * spt)), heads, spt


def disk(serial, model, firmware, sectors, sectorsize=512, physical=512, trim=False, multiple=128,
         xfer=XFER_DEFAULT, rotation=0, write_cache=True, lookahead=True):
    """IDENTIFY DEVICE of a disk of ``sectors`` logical sectors of ``sectorsize`` bytes."""
    w = [0] * WORDS
    w[W_CONFIG] = CONFIG_DISK
    w[W_CYLS], w[W_HEADS], w[W_SPT] = chs(sectors)
    _strings(w, serial, firmware, model)
    w[W_MULTIPLE_MAX] = 0x8000 | 128
    w[W_CAPS] = CAPS_DMA | CAPS_LBA | CAPS_IORDY
    w[W_CAPS2] = VALID_BIT14
    w[W_VALID] = VALID_64_70 | VALID_88
    w[W_MULTIPLE] = (0x100 | multiple) if multiple else 0
    lba28 = min(sectors, LBA28_MAX)
    w[W_LBA28], w[W_LBA28 + 1] = lba28 & 0xFFFF, lba28 >> 16
    _modes(w, xfer)
    w[W_QUEUE] = 31
    w[W_SATA_CAPS] = SATA_GEN1_3 | SATA_NCQ
    w[W_SATA_CAPS2] = (3 << 1) | (SATA2_RCVSND_FPDMA if trim else 0)     # current speed: Gen 3
    w[W_MAJOR], w[W_MINOR] = MAJOR_ATA4_ACS2, MINOR_ATA8_ACS
    cs1 = CS_POWERMGT | CS_WCACHE | CS_LOOKAHEAD | CS_NOP
    cs2 = CS2_LBA48 | CS2_FLUSH | CS2_FLUSH_EXT
    w[W_CMDSET:W_CMDSET + 3] = [cs1, cs2 | VALID_BIT14, CS3_GPL | VALID_BIT14]
    en1 = CS_POWERMGT | CS_NOP | (CS_WCACHE if write_cache else 0) | (CS_LOOKAHEAD if lookahead else 0)
    w[W_CMDSET_ENABLED:W_CMDSET_ENABLED + 3] = [en1, cs2 | W86_W119_VALID, CS3_GPL | VALID_BIT14]
    for i in range(4):
        w[W_LBA48 + i] = (sectors >> (16 * i)) & 0xFFFF
    if trim:
        w[W_ADDITIONAL] = ADDITIONAL_RZAT | ADDITIONAL_DRAT
        w[W_DSM_BLOCKS] = 1
        w[W_DSM] = DSM_TRIM
    ss = VALID_BIT14
    if physical > sectorsize:
        ss |= SS_MULTIPLE | ((physical // sectorsize).bit_length() - 1)
    if sectorsize > 512:
        ss |= SS_LARGE_LOGICAL
        words = sectorsize // 2
        w[W_LOGICAL_SIZE], w[W_LOGICAL_SIZE + 1] = words & 0xFFFF, words >> 16
    w[W_SECTOR_SIZES] = ss
    w[W_CMDSET3] = w[W_CMDSET3_ENABLED] = CS3_RW_LOG_DMA | VALID_BIT14
    w[W_ALIGNMENT] = VALID_BIT14
    w[W_ROTATION] = rotation & 0xFFFF
    w[W_TRANSPORT] = TRANSPORT_SATA3
    return _finish(w)


def packet(serial, model, firmware, xfer=XFER_DEFAULT):
    """IDENTIFY PACKET DEVICE of the CD/DVD drive."""
    w = [0] * WORDS
    w[W_CONFIG] = CONFIG_CD
    _strings(w, serial, firmware, model)
    w[W_CAPS] = CAPS_DMA | CAPS_LBA
    w[W_CAPS2] = VALID_BIT14
    w[W_VALID] = VALID_64_70 | VALID_88
    _modes(w, xfer)
    w[W_SATA_CAPS] = SATA_GEN1_3
    w[W_SATA_CAPS2] = 3 << 1
    w[W_MAJOR] = MAJOR_ATA4_ACS2
    cs1 = CS_POWERMGT | CS_PACKET | CS_RESET | CS_NOP
    w[W_CMDSET:W_CMDSET + 3] = [cs1, VALID_BIT14, VALID_BIT14]
    w[W_CMDSET_ENABLED:W_CMDSET_ENABLED + 3] = [cs1, 0, VALID_BIT14]
    w[W_TRANSPORT] = TRANSPORT_SATA3
    return _finish(w)


def words(data):
    """The 256 words of IDENTIFY data (for tests and debugging)."""
    return list(struct.unpack(f"<{WORDS}H", data))
