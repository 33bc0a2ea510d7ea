"""AHCI and SATA layouts: the HBA's registers, the command list, the command table, the PRDT, the FISes.

Serial ATA AHCI 1.3.1: 3.1 the generic host control registers (:data:`HBA_REGS`), 3.3 one port's registers
(:data:`PORT_REGS`), 4.2.1 the received-FIS area (:data:`RECEIVED_FIS`), 4.2.2 a command header
(:data:`COMMAND_HEADER`), 4.2.3 the command table (:data:`COMMAND_TABLE`: the command FIS at 0, the ATAPI command at
0x40, then :data:`PRDT_ENTRY` entries from 0x80). Serial ATA 3.x section 10.5: the Register host-to-device FIS
(:data:`FIS_H2D`), Register device-to-host (:data:`FIS_D2H`), Set Device Bits (:data:`FIS_SDB`) and PIO Setup
(:data:`FIS_PIO_SETUP`).

The ``construct`` declarations are the reference (tests round-trip every one); the per-command path reads and
builds the same bytes with the precomputed ``struct`` formats below (:data:`HEADER`, :data:`PRD`, :data:`D2H`...),
whose agreement with the declarations ``tests/unit/test_ahci_layouts.py`` checks. Register and bit names are the
spec's.

Not supported: the FIS-based switching register's fields (PxFBS reads 0), enclosure management, command
completion coalescing, the DMA Setup and Data FISes (the HBA moves data without them).
"""

import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

# -- 3.1 generic host control (offsets in the ABAR) ------------------------------------------------------------
CAP, GHC, IS, PI, VS, CCC_CTL, CCC_PORTS, EM_LOC, EM_CTL, CAP2, BOHC = range(0, 0x2C, 4)
PORT_BASE = 0x100           #: port 0's registers
PORT_STRIDE = 0x80          #: one port's register block
MAX_PORTS = 32
MAX_SLOTS = 32

CAP_S64A = 1 << 31          #: 64-bit addressing
CAP_SNCQ = 1 << 30          #: native command queuing
CAP_SAM = 1 << 18           #: AHCI mode only (GHC.AE reads 1)
CAP_SCLO = 1 << 24          #: command list override
CAP_ISS_SHIFT = 20          #: interface speed: 3 = Gen 3 (6 Gb/s)
CAP_NCS_SHIFT = 8           #: command slots - 1
GHC_HR = 1 << 0             #: HBA reset
GHC_IE = 1 << 1             #: interrupt enable
GHC_MRSM = 1 << 2           #: MSI revert to single message
GHC_AE = 1 << 31            #: AHCI enable
AHCI_VERSION = 0x00010301   #: VS: 1.3.1
SPEED_GEN3 = 3

HBA_REGS = Struct(
    "cap" / Int32ul, "ghc" / Int32ul, "is_" / Int32ul, "pi" / Int32ul, "vs" / Int32ul, "ccc_ctl" / Int32ul,
    "ccc_ports" / Int32ul, "em_loc" / Int32ul, "em_ctl" / Int32ul, "cap2" / Int32ul, "bohc" / Int32ul,
)

# -- 3.3 port registers (offsets in a port's block) -------------------------------------------------------------
(P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD, P_RSV, P_TFD, P_SIG, P_SSTS, P_SCTL, P_SERR, P_SACT, P_CI, P_SNTF,
 P_FBS, P_DEVSLP) = range(0, 0x48, 4)

PORT_REGS = Struct(
    "clb" / Int32ul, "clbu" / Int32ul, "fb" / Int32ul, "fbu" / Int32ul, "is_" / Int32ul, "ie" / Int32ul,
    "cmd" / Int32ul, "reserved" / Int32ul, "tfd" / Int32ul, "sig" / Int32ul, "ssts" / Int32ul, "sctl" / Int32ul,
    "serr" / Int32ul, "sact" / Int32ul, "ci" / Int32ul, "sntf" / Int32ul, "fbs" / Int32ul, "devslp" / Int32ul,
)

CLB_ALIGN = 0x3FF           #: PxCLB bits 9:0 read 0 (1 KiB alignment)
FB_ALIGN = 0xFF             #: PxFB bits 7:0 read 0 (256-byte alignment, no FIS-based switching)

# PxIS / PxIE (3.3.5, 3.3.6)
IS_DHRS = 1 << 0            #: a D2H Register FIS with the I bit
IS_PSS = 1 << 1             #: a PIO Setup FIS with the I bit
IS_DSS = 1 << 2
IS_SDBS = 1 << 3            #: a Set Device Bits FIS with the I bit
IS_UFS = 1 << 4
IS_DPS = 1 << 5
IS_PCS = 1 << 6
IS_OFS = 1 << 24            #: overflow: the device sent more than the PRDT holds
IS_INFS = 1 << 26
IS_IFS = 1 << 27            #: interface fatal error
IS_HBDS = 1 << 28           #: host bus data error
IS_HBFS = 1 << 29           #: host bus fatal error ("a bad software pointer")
IS_TFES = 1 << 30           #: task file error (status ERR)
IE_MASK = 0xFDC000FF        #: the interrupt enables that exist

# PxCMD (3.3.7)
CMD_ST = 1 << 0
CMD_SUD = 1 << 1
CMD_POD = 1 << 2
CMD_CLO = 1 << 3
CMD_FRE = 1 << 4
CMD_CCS_SHIFT = 8
CMD_CCS_MASK = 0x1F << CMD_CCS_SHIFT
CMD_FR = 1 << 14
CMD_CR = 1 << 15
CMD_ATAPI = 1 << 24
CMD_ICC_MASK = 0xF << 28
#: what software may write (ST, CLO, FRE, ATAPI, DLAE, ALPE, ASP, ICC; SUD and POD read 1: no staggered spin-up,
#: no cold presence detection)
CMD_WRITABLE = CMD_ST | CMD_CLO | CMD_FRE | CMD_ATAPI | (1 << 25) | (1 << 26) | (1 << 27) | CMD_ICC_MASK

# PxTFD status and error (3.3.8; ATA status/error)
STS_ERR = 0x01
STS_DRQ = 0x08
STS_DSC = 0x10              #: device seek complete / service (obsolete; drives still set it)
STS_DRDY = 0x40
STS_BSY = 0x80
STS_OK = STS_DRDY | STS_DSC
ERR_ABRT = 0x04
ERR_IDNF = 0x10
ERR_UNC = 0x40

# PxSSTS / PxSCTL (3.3.10, 3.3.11), PxSERR (3.3.12)
SSTS_DET_PRESENT = 0x3      #: device present, communication established
SSTS_IPM_ACTIVE = 0x1 << 8
SCTL_DET_MASK = 0xF
SCTL_DET_COMRESET = 0x1
SCTL_SPD_MASK = 0xF0
SERR_E = 1 << 11            #: internal error (a master/target abort reaching system memory)

SIG_ATA = 0x00000101        #: PxSIG of a disk
SIG_ATAPI = 0xEB140101      #: of a packet device
SIG_NONE = 0xFFFFFFFF
TFD_NONE = 0x7F             #: no device: what a floating bus reads

# -- 4.2.2 command header, 4.2.3 command table, PRDT ------------------------------------------------------------
COMMAND_HEADER_SIZE = 32
CMDLIST_SIZE = COMMAND_HEADER_SIZE * MAX_SLOTS
COMMAND_HEADER = Struct(
    "flags" / Int16ul,      # CFL 4:0 (dwords), A 5 (ATAPI), W 6 (write), P 7, R 8, B 9, C 10, PMP 15:12
    "prdtl" / Int16ul,      # PRDT entries
    "prdbc" / Int32ul,      # bytes transferred, written by the HBA
    "ctba" / Int64ul,       # command table base (128-byte aligned)
    "reserved" / Bytes(16),
)
HDR_CFL_MASK = 0x1F
HDR_ATAPI = 1 << 5
HDR_WRITE = 1 << 6
HDR_RESET = 1 << 8
HDR_PRDBC_OFFSET = 4
CTBA_ALIGN = 0x7F

CFIS_SIZE = 0x40
ACMD_OFFSET = 0x40
ACMD_SIZE = 16
PRDT_OFFSET = 0x80
PRDT_ENTRY_SIZE = 16
PRDT_ENTRY = Struct(
    "dba" / Int64ul,        # data base address (bit 0 reserved: word aligned)
    "reserved" / Int32ul,
    "dbc" / Int32ul,        # byte count - 1 in bits 21:0, I (interrupt on completion) bit 31
)
PRD_DBC_MASK = 0x3FFFFF
PRD_DBA_MASK = ~1 & 0xFFFFFFFFFFFFFFFF
COMMAND_TABLE = Struct(
    "cfis" / Bytes(CFIS_SIZE),
    "acmd" / Bytes(ACMD_SIZE),
    "reserved" / Bytes(PRDT_OFFSET - ACMD_OFFSET - ACMD_SIZE),
)

# -- 4.2.1 received FIS area ------------------------------------------------------------------------------------
RECEIVED_FIS_SIZE = 256
RFIS_DSFIS, RFIS_PSFIS, RFIS_RFIS, RFIS_SDBFIS, RFIS_UFIS = 0x00, 0x20, 0x40, 0x58, 0x60
RECEIVED_FIS = Struct(
    "dsfis" / Bytes(28), "reserved0" / Bytes(4),
    "psfis" / Bytes(20), "reserved1" / Bytes(12),
    "rfis" / Bytes(20), "reserved2" / Bytes(4),
    "sdbfis" / Bytes(8),
    "ufis" / Bytes(64),
    "reserved3" / Bytes(96),
)

# -- Serial ATA 10.5 FISes --------------------------------------------------------------------------------------
FIS_TYPE_H2D = 0x27
FIS_TYPE_D2H = 0x34
FIS_TYPE_SDB = 0xA1
FIS_TYPE_PIO_SETUP = 0x5F
H2D_C = 0x80                #: byte 1: the FIS carries a command (else: the device control register)
FIS_I = 0x40                #: byte 1 of a device-to-host FIS: raise an interrupt
PIO_D = 0x20                #: byte 1 of a PIO Setup FIS: data goes to the host
CONTROL_SRST = 0x04         #: device control: software reset

FIS_H2D = Struct(
    "type" / Int8ul, "pm_c" / Int8ul, "command" / Int8ul, "features" / Int8ul,
    "lba0" / Int8ul, "lba1" / Int8ul, "lba2" / Int8ul, "device" / Int8ul,
    "lba3" / Int8ul, "lba4" / Int8ul, "lba5" / Int8ul, "features_exp" / Int8ul,
    "count" / Int8ul, "count_exp" / Int8ul, "icc" / Int8ul, "control" / Int8ul,
    "auxiliary" / Int32ul,
)
FIS_D2H = Struct(
    "type" / Int8ul, "pm_i" / Int8ul, "status" / Int8ul, "error" / Int8ul,
    "lba0" / Int8ul, "lba1" / Int8ul, "lba2" / Int8ul, "device" / Int8ul,
    "lba3" / Int8ul, "lba4" / Int8ul, "lba5" / Int8ul, "reserved0" / Int8ul,
    "count" / Int8ul, "count_exp" / Int8ul, "reserved1" / Bytes(6),
)
FIS_SDB = Struct(
    "type" / Int8ul, "pm_i_n" / Int8ul, "status" / Int8ul, "error" / Int8ul, "sactive" / Int32ul,
)
FIS_PIO_SETUP = Struct(
    "type" / Int8ul, "pm_d_i" / Int8ul, "status" / Int8ul, "error" / Int8ul,
    "lba0" / Int8ul, "lba1" / Int8ul, "lba2" / Int8ul, "device" / Int8ul,
    "lba3" / Int8ul, "lba4" / Int8ul, "lba5" / Int8ul, "reserved0" / Int8ul,
    "count" / Int8ul, "count_exp" / Int8ul, "reserved1" / Int8ul, "e_status" / Int8ul,
    "transfer_count" / Int16ul, "reserved2" / Int16ul,
)
D2H_SIZE = 20
SDB_SIZE = 8
PIO_SETUP_SIZE = 20

# -- the hot path's formats (the same bytes as the declarations above) ------------------------------------------
#: a command header's first 16 bytes: flags, prdtl, prdbc, ctba
HEADER = struct.Struct("<HHIQ")
#: one PRDT entry: dba, reserved, dbc
PRD = struct.Struct("<QII")
#: the SDB FIS
SDB = struct.Struct("<BBBBI")
#: a D2H FIS: type, I, status, error, then the 7 taskfile bytes 4..10, reserved, count, count_exp, 6 reserved
D2H = struct.Struct("<BBBB7sBBB6x")
#: a PIO Setup FIS: type, D|I, status, error, 7 taskfile bytes, reserved, count, count_exp, reserved, E_Status,
#: transfer count, reserved
PIO_SETUP = struct.Struct("<BBBB7sBBBBBHH")
#: 32-bit registers, for the HBA's and a port's register files
U32 = struct.Struct("<I")


def lba48(cfis):
    """The 48-bit LBA of a Register H2D FIS (bytes 4-6 then 8-10)."""
    return (cfis[4] | cfis[5] << 8 | cfis[6] << 16 | cfis[8] << 24 | cfis[9] << 32 | cfis[10] << 40)


def lba28(cfis):
    """The 28-bit LBA (bytes 4-6 and the device register's low nibble)."""
    return cfis[4] | cfis[5] << 8 | cfis[6] << 16 | (cfis[7] & 0xF) << 24
