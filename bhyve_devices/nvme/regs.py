"""NVM Express 1.4 controller registers, queue entries and the codes of the commands this controller knows
(NVM Express Base Specification 1.4, chapters 3, 4 and 5; the NVM command set, chapter 6).

The layouts are declared with ``construct`` and name their section; the hot path never parses with them: it uses
the precomputed ``struct`` formats below (:data:`SQE`, :data:`CQE`) and the named shifts and masks, and the unit
tests check that both agree (``tests/unit/test_nvme_layouts.py``).

- 3.1 controller registers at BAR 0: :data:`CAP_REG` (3.1.1), :data:`CC_REG` (3.1.5), :data:`CSTS_REG`
  (3.1.6), :data:`AQA_REG` (3.1.8), the register file up to the doorbells :data:`REGISTER_FILE`; the doorbells
  at :data:`DOORBELL_BASE` + (2y [+1]) * (4 << CAP.DSTRD) (3.1.24, 3.1.25).
- 4.2 the 64-byte submission queue entry :data:`SUBMISSION_ENTRY`; 4.6 the 16-byte completion queue entry
  :data:`COMPLETION_ENTRY` with its 4.6.1 status field (:func:`status`).
- 5.2 and 6.2: the admin and NVM opcodes, 5.14 log page identifiers, 5.15 Identify CNS values, 5.21 feature
  identifiers, 5.2.1 asynchronous event types and information.

Not supported: the controller memory buffer, persistent memory region and boot partition registers (they read
as zero), NVM subsystem reset (NSSR writes are dropped), CAP.DSTRD other than 0, memory pages other than 4 KiB.
"""

import struct

from construct import BitsInteger, BitStruct, ByteSwapped, Flag, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

# -- 3.1 register offsets --------------------------------------------------------------------------------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REGISTER_FILE_SIZE = 0x40           # CAP .. ACQ and the (zero) CMB registers read from one image
DOORBELL_BASE = 0x1000
BAR0_MIN_SIZE = 0x4000              # 16 KiB, the least a controller decodes (Windows' driver checks)
NVME_VERSION = 0x00010400           # 1.4.0

#: 3.1.1 Controller Capabilities (64 bits).
CAP_REG = ByteSwapped(BitStruct(
    "reserved58" / BitsInteger(6), "cmbs" / Flag, "pmrs" / Flag, "mpsmax" / BitsInteger(4),
    "mpsmin" / BitsInteger(4), "reserved46" / BitsInteger(2), "bps" / Flag, "css" / BitsInteger(8),
    "nssrs" / Flag, "dstrd" / BitsInteger(4), "to" / BitsInteger(8), "reserved19" / BitsInteger(5),
    "ams" / BitsInteger(2), "cqr" / Flag, "mqes" / BitsInteger(16)))
#: 3.1.5 Controller Configuration.
CC_REG = ByteSwapped(BitStruct(
    "reserved24" / BitsInteger(8), "iocqes" / BitsInteger(4), "iosqes" / BitsInteger(4), "shn" / BitsInteger(2),
    "ams" / BitsInteger(3), "mps" / BitsInteger(4), "css" / BitsInteger(3), "reserved1" / BitsInteger(3),
    "en" / Flag))
#: 3.1.6 Controller Status.
CSTS_REG = ByteSwapped(BitStruct(
    "reserved6" / BitsInteger(26), "pp" / Flag, "nssro" / Flag, "shst" / BitsInteger(2), "cfs" / Flag,
    "rdy" / Flag))
#: 3.1.8 Admin Queue Attributes (both sizes 0-based).
AQA_REG = ByteSwapped(BitStruct(
    "reserved28" / BitsInteger(4), "acqs" / BitsInteger(12), "reserved12" / BitsInteger(4),
    "asqs" / BitsInteger(12)))
#: 3.1 the registers below the doorbells that this controller implements, in order.
REGISTER_FILE = Struct(
    "cap" / Int64ul, "vs" / Int32ul, "intms" / Int32ul, "intmc" / Int32ul, "cc" / Int32ul, Padding(4),
    "csts" / Int32ul, "nssr" / Int32ul, "aqa" / Int32ul, "asq" / Int64ul, "acq" / Int64ul,
    "cmbloc" / Int32ul, "cmbsz" / Int32ul)

# CAP fields this controller sets (3.1.1)
CAP_CQR = 1 << 16                   # contiguous queues required
CAP_TO_SHIFT = 24                   # worst-case ready time, 500 ms units
CAP_DSTRD_SHIFT = 32
CAP_CSS_NVM = 1 << 37               # the NVM command set
DSTRD = 0                           # doorbell stride 4 << 0 bytes
DOORBELL_STRIDE = 4 << DSTRD
READY_TIMEOUT = 30                  # CAP.TO: 15 s

# CC fields (3.1.5)
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT, CC_QES_MASK = 16, 20, 0xF
CC_WHILE_ENABLED = CC_EN | (CC_SHN_MASK << CC_SHN_SHIFT) | (CC_QES_MASK << CC_IOSQES_SHIFT) | \
    (CC_QES_MASK << CC_IOCQES_SHIFT)            # what may change while CC.EN is set
CC_WRITABLE = CC_WHILE_ENABLED | (CC_CSS_MASK << CC_CSS_SHIFT) | (CC_MPS_MASK << CC_MPS_SHIFT) | \
    (CC_AMS_MASK << CC_AMS_SHIFT)
CSS_NVM, CSS_ADMIN_ONLY = 0, 7

# CSTS fields (3.1.6)
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

# AQA fields (3.1.8)
AQA_ASQS_MASK = 0xFFF
AQA_ACQS_SHIFT = 16
QUEUE_BASE_MASK = ~0xFFF & 0xFFFFFFFFFFFFFFFF     # ASQ/ACQ bits 11:0 are reserved

PAGE_SHIFT = 12                     # CC.MPS 0: 4 KiB memory pages, the only size (MPSMIN = MPSMAX = 0)
PAGE_SIZE = 1 << PAGE_SHIFT
SQE_SIZE, CQE_SIZE = 64, 16
SQES_LOG2, CQES_LOG2 = 6, 4         # CC.IOSQES / CC.IOCQES this controller takes

# -- 4.2 / 4.6 queue entries ---------------------------------------------------------------------------------------
#: 4.2 Submission Queue Entry (figure 105/106: Command Dword 0, NSID, CDW2-3, MPTR, DPTR, CDW10-15).
SUBMISSION_ENTRY = Struct(
    "opcode" / Int8ul, "flags" / BitStruct("psdt" / BitsInteger(2), "reserved" / BitsInteger(4),
                                         "fuse" / BitsInteger(2)),
    "cid" / Int16ul, "nsid" / Int32ul,
    "cdw2" / Int32ul, "cdw3" / Int32ul, "mptr" / Int64ul, "prp1" / Int64ul, "prp2" / Int64ul,
    "cdw10" / Int32ul, "cdw11" / Int32ul, "cdw12" / Int32ul, "cdw13" / Int32ul, "cdw14" / Int32ul,
    "cdw15" / Int32ul)
#: 4.6 Completion Queue Entry (figure 123: DW0, DW1, SQ head, SQ id, CID, phase + status).
COMPLETION_ENTRY = Struct(
    "dw0" / Int32ul, "dw1" / Int32ul, "sqhd" / Int16ul, "sqid" / Int16ul, "cid" / Int16ul,
    "status" / ByteSwapped(BitStruct("dnr" / Flag, "more" / Flag, "crd" / BitsInteger(2),
                                     "sct" / BitsInteger(3), "sc" / BitsInteger(8), "phase" / Flag)))
#: The hot path's formats of the same (opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15).
SQE = struct.Struct("<BBHIIIQQQ6I")
CQE = struct.Struct("<IIHHHH")
#: Positions in an :data:`SQE` tuple.
E_OPCODE, E_FLAGS, E_CID, E_NSID, E_PRP1, E_PRP2 = 0, 1, 2, 3, 7, 8
E_CDW10, E_CDW11, E_CDW12, E_CDW13 = 9, 10, 11, 12
FLAGS_FUSE_MASK = 0x3               # CDW0 bits 9:8
FLAGS_PSDT_SHIFT = 6                # CDW0 bits 15:14
PSDT_PRP, PSDT_SGL, PSDT_SGL_META = 0, 1, 2

# -- 4.6.1 status field ------------------------------------------------------------------------------------------
SCT_GENERIC, SCT_COMMAND, SCT_MEDIA = 0, 1, 2
STATUS_DNR = 1 << 14                # Do Not Retry (in the 15-bit status field; bit 31 of DW3)


def status(sc, sct=SCT_GENERIC, dnr=True):
    """The 15-bit status field (4.6.1): code, type, Do Not Retry."""
    return (sc & 0xFF) | (sct << 8) | (STATUS_DNR if dnr else 0)


SUCCESS = 0
# 4.6.1.2.1 generic command status
SC_INVALID_OPCODE = 0x01
SC_INVALID_FIELD = 0x02
SC_DATA_TRANSFER_ERROR = 0x04
SC_INTERNAL_ERROR = 0x06
SC_INVALID_NAMESPACE = 0x0B
SC_SEQUENCE_ERROR = 0x0C
SC_INVALID_SGL_SEGMENT = 0x0D
SC_INVALID_SGL_COUNT = 0x0E
SC_DATA_SGL_LENGTH = 0x0F
SC_SGL_TYPE_INVALID = 0x11
SC_PRP_OFFSET_INVALID = 0x13
SC_NS_WRITE_PROTECTED = 0x20
SC_LBA_OUT_OF_RANGE = 0x80
# 4.6.1.2.2 command specific status
SC_CQ_INVALID = 0x00
SC_INVALID_QID = 0x01
SC_INVALID_QSIZE = 0x02
SC_AER_LIMIT = 0x05
SC_INVALID_VECTOR = 0x08
SC_INVALID_LOG_PAGE = 0x09
SC_INVALID_QUEUE_DELETION = 0x0C
SC_FEATURE_NOT_SAVEABLE = 0x0D
SC_FEATURE_NOT_NS_SPECIFIC = 0x0F
# 4.6.1.2.3 media and data integrity errors
SC_WRITE_FAULT = 0x80
SC_UNRECOVERED_READ = 0x81

INVALID_FIELD = status(SC_INVALID_FIELD)
INVALID_OPCODE = status(SC_INVALID_OPCODE)
INVALID_NAMESPACE = status(SC_INVALID_NAMESPACE)
DATA_TRANSFER_ERROR = status(SC_DATA_TRANSFER_ERROR)
PRP_OFFSET_INVALID = status(SC_PRP_OFFSET_INVALID)
LBA_OUT_OF_RANGE = status(SC_LBA_OUT_OF_RANGE)
INVALID_QID = status(SC_INVALID_QID, SCT_COMMAND)
INVALID_QSIZE = status(SC_INVALID_QSIZE, SCT_COMMAND)


class NvmeError(Exception):
    """A command ends with ``status`` (15-bit field); raised below a command handler, turned into its
    completion by the controller."""

    def __init__(self, st):
        super().__init__(f"NVMe status {st:#x}")
        self.status = st


# -- 5 admin commands (figure 139) -------------------------------------------------------------------------------
ADM_DELETE_SQ = 0x00
ADM_CREATE_SQ = 0x01
ADM_GET_LOG_PAGE = 0x02
ADM_DELETE_CQ = 0x04
ADM_CREATE_CQ = 0x05
ADM_IDENTIFY = 0x06
ADM_ABORT = 0x08
ADM_SET_FEATURES = 0x09
ADM_GET_FEATURES = 0x0A
ADM_ASYNC_EVENT = 0x0C
ADM_DOORBELL_BUFFER = 0x7C

# -- 6 NVM command set I/O commands (figure 346) -----------------------------------------------------------------
NVM_FLUSH = 0x00
NVM_WRITE = 0x01
NVM_READ = 0x02
NVM_WRITE_ZEROES = 0x08
NVM_DSM = 0x09
RW_FUA = 1 << 30                    # CDW12
RW_PRINFO_SHIFT, RW_PRINFO_MASK = 26, 0xF
WZ_DEAC = 1 << 25                   # Write Zeroes: deallocate
DSM_DEALLOCATE = 1 << 2             # CDW11 AD
NSID_ALL = 0xFFFFFFFF

# -- 5.15 Identify CNS -------------------------------------------------------------------------------------------
CNS_NAMESPACE = 0x00
CNS_CONTROLLER = 0x01
CNS_ACTIVE_NSIDS = 0x02
CNS_NS_DESCRIPTORS = 0x03
IDENTIFY_SIZE = 4096

# -- 5.14 log pages --------------------------------------------------------------------------------------------
LOG_ERROR = 0x01
LOG_SMART = 0x02
LOG_FIRMWARE = 0x03
LOG_CHANGED_NS = 0x04
LOG_EFFECTS = 0x05
LOG_RAE = 1 << 15                   # CDW10: retain asynchronous event

# -- 5.21 features -----------------------------------------------------------------------------------------------
FEAT_ARBITRATION = 0x01
FEAT_POWER_MGMT = 0x02
FEAT_TEMP_THRESHOLD = 0x04
FEAT_ERROR_RECOVERY = 0x05
FEAT_WRITE_CACHE = 0x06
FEAT_NUM_QUEUES = 0x07
FEAT_IRQ_COALESCING = 0x08
FEAT_IRQ_CONFIG = 0x09
FEAT_WRITE_ATOMICITY = 0x0A
FEAT_ASYNC_EVENT_CONFIG = 0x0B
FEAT_SAVE = 1 << 31                 # Set Features CDW10 SV
SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_SUPPORTED = 0, 1, 2, 3
FEAT_CAP_NS_SPECIFIC, FEAT_CAP_CHANGEABLE = 1 << 1, 1 << 2

# -- 5.2.1 asynchronous events -----------------------------------------------------------------------------------
AE_TYPE_ERROR = 0
AE_INFO_INVALID_DOORBELL = 0x00     # write to an invalid doorbell register
AE_INFO_INVALID_DB_VALUE = 0x01     # invalid doorbell write value
