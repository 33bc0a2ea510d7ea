"""The data structures an NVMe controller hands over or reads besides its queue entries (NVM Express Base
Specification 1.4): the Identify data (5.15.2: controller, namespace, namespace identification descriptors), the
log pages (5.14.1: error information, SMART / health, firmware slot, commands supported and effects), the SGL
descriptor (4.4) and the Dataset Management range (6.7).

All are ``construct`` layouts, built once (Identify) or per Get Log Page (admin commands, never the I/O path); the
two read by the I/O path, the SGL descriptor and the DSM range, also have ``struct`` formats (:data:`SGL_DESC`,
:data:`DSM_RANGE_FMT`) checked against their layouts in the tests.

Not supported: the NVMe-MI, fabrics and vendor-specific areas (zeros), telemetry, persistent event and ANA logs.
"""

import struct

from construct import Array, BitsInteger, BitStruct, ByteSwapped, Bytes, BytesInteger, Flag, Int8ul, Int16ul, \
    Int32ul, Int64ul, Padding, Struct

U128 = BytesInteger(16, swapped=True)

#: 5.15.2.1 (figure 248) Power State Descriptor, 32 bytes.
POWER_STATE = Struct(
    "mp" / Int16ul, Padding(1), "flags" / Int8ul, "enlat" / Int32ul, "exlat" / Int32ul,
    "rrt" / Int8ul, "rrl" / Int8ul, "rwt" / Int8ul, "rwl" / Int8ul, "idlp" / Int16ul, "ips" / Int8ul, Padding(1),
    "actp" / Int16ul, "apw_aps" / Int8ul, Padding(9))

#: 5.15.2.1 (figure 247) Identify Controller data structure, 4096 bytes.
IDENTIFY_CONTROLLER = Struct(
    "vid" / Int16ul, "ssvid" / Int16ul, "sn" / Bytes(20), "mn" / Bytes(40), "fr" / Bytes(8),
    "rab" / Int8ul, "ieee" / Bytes(3), "cmic" / Int8ul, "mdts" / Int8ul, "cntlid" / Int16ul, "ver" / Int32ul,
    "rtd3r" / Int32ul, "rtd3e" / Int32ul, "oaes" / Int32ul, "ctratt" / Int32ul, "rrls" / Int16ul, Padding(9),
    "cntrltype" / Int8ul, "fguid" / Bytes(16), "crdt" / Array(3, Int16ul), Padding(106), Padding(16),
    # admin command set attributes (256)
    "oacs" / Int16ul, "acl" / Int8ul, "aerl" / Int8ul, "frmw" / Int8ul, "lpa" / Int8ul, "elpe" / Int8ul,
    "npss" / Int8ul, "avscc" / Int8ul, "apsta" / Int8ul, "wctemp" / Int16ul, "cctemp" / Int16ul,
    "mtfa" / Int16ul, "hmpre" / Int32ul, "hmmin" / Int32ul, "tnvmcap" / U128, "unvmcap" / U128,
    "rpmbs" / Int32ul, "edstt" / Int16ul, "dsto" / Int8ul, "fwug" / Int8ul, "kas" / Int16ul, "hctma" / Int16ul,
    "mntmt" / Int16ul, "mxtmt" / Int16ul, "sanicap" / Int32ul, "hmminds" / Int32ul, "hmmaxd" / Int16ul,
    "nsetidmax" / Int16ul, "endgidmax" / Int16ul, "anatt" / Int8ul, "anacap" / Int8ul, "anagrpmax" / Int32ul,
    "nanagrpid" / Int32ul, "pels" / Int32ul, Padding(156),
    # NVM command set attributes (512)
    "sqes" / Int8ul, "cqes" / Int8ul, "maxcmd" / Int16ul, "nn" / Int32ul, "oncs" / Int16ul, "fuses" / Int16ul,
    "fna" / Int8ul, "vwc" / Int8ul, "awun" / Int16ul, "awupf" / Int16ul, "nvscc" / Int8ul, "nwpc" / Int8ul,
    "acwu" / Int16ul, Padding(2), "sgls" / Int32ul, "mnan" / Int32ul, Padding(224),
    "subnqn" / Bytes(256), Padding(768), Padding(256),
    "psd" / Array(32, POWER_STATE), "vendor" / Bytes(1024))

#: 5.15.2.1 (figure 250) LBA Format data structure.
LBA_FORMAT = Struct("ms" / Int16ul, "lbads" / Int8ul, "rp" / Int8ul)
#: 5.15.2.1 (figure 249) Identify Namespace data structure (NVM command set), 4096 bytes.
IDENTIFY_NAMESPACE = Struct(
    "nsze" / Int64ul, "ncap" / Int64ul, "nuse" / Int64ul, "nsfeat" / Int8ul, "nlbaf" / Int8ul, "flbas" / Int8ul,
    "mc" / Int8ul, "dpc" / Int8ul, "dps" / Int8ul, "nmic" / Int8ul, "rescap" / Int8ul, "fpi" / Int8ul,
    "dlfeat" / Int8ul, "nawun" / Int16ul, "nawupf" / Int16ul, "nacwu" / Int16ul, "nabsn" / Int16ul,
    "nabo" / Int16ul, "nabspf" / Int16ul, "noiob" / Int16ul, "nvmcap" / U128, "npwg" / Int16ul, "npwa" / Int16ul,
    "npdg" / Int16ul, "npda" / Int16ul, "nows" / Int16ul, Padding(18), "anagrpid" / Int32ul, Padding(3),
    "nsattr" / Int8ul, "nvmsetid" / Int16ul, "endgid" / Int16ul, "nguid" / Bytes(16), "eui64" / Bytes(8),
    "lbaf" / Array(16, LBA_FORMAT), Padding(192), "vendor" / Bytes(3712))

#: 5.15.2.1 (figure 251) Namespace Identification Descriptor header (the identifier follows: NIDL bytes).
NS_DESCRIPTOR = Struct("nidt" / Int8ul, "nidl" / Int8ul, Padding(2))
NIDT_EUI64, NIDT_NGUID = 1, 2

#: 5.14.1.1 (figure 194) Error Information Log Entry, 64 bytes.
ERROR_ENTRY = Struct(
    "count" / Int64ul, "sqid" / Int16ul, "cid" / Int16ul, "status" / Int16ul, "param_loc" / Int16ul,
    "lba" / Int64ul, "nsid" / Int32ul, "vsia" / Int8ul, "trtype" / Int8ul, Padding(2), "csi" / Int64ul,
    "ttsi" / Int16ul, Padding(22))
#: 5.14.1.2 (figure 196) SMART / Health Information log page, 512 bytes.
SMART_LOG = Struct(
    "critical_warning" / Int8ul, "temperature" / Int16ul, "avail_spare" / Int8ul, "spare_thresh" / Int8ul,
    "percent_used" / Int8ul, "endurance_warning" / Int8ul, Padding(25),
    "data_units_read" / U128, "data_units_written" / U128, "host_reads" / U128, "host_writes" / U128,
    "busy_time" / U128, "power_cycles" / U128, "power_on_hours" / U128, "unsafe_shutdowns" / U128,
    "media_errors" / U128, "error_entries" / U128, "warning_temp_time" / Int32ul, "critical_temp_time" / Int32ul,
    "temp_sensor" / Array(8, Int16ul), "tmt_count" / Array(2, Int32ul), "tmt_time" / Array(2, Int32ul),
    Padding(280))
#: 5.14.1.3 (figure 197) Firmware Slot Information log page, 512 bytes.
FIRMWARE_LOG = Struct("afi" / Int8ul, Padding(7), "frs" / Array(7, Bytes(8)), Padding(448))
#: 5.14.1.5 (figure 200) Commands Supported and Effects entry; the log (figure 199) is 256 admin + 256 I/O.
EFFECTS_ENTRY = ByteSwapped(BitStruct(
    "reserved20" / BitsInteger(12), "uuid_sel" / Flag, "cse" / BitsInteger(3), "reserved5" / BitsInteger(11),
    "ccc" / Flag, "nic" / Flag, "ncc" / Flag, "lbcc" / Flag, "csupp" / Flag))
EFFECTS_LOG = Struct("acs" / Array(256, EFFECTS_ENTRY), "iocs" / Array(256, EFFECTS_ENTRY), Padding(2048))
EFFECT_CSUPP, EFFECT_LBCC = 1 << 0, 1 << 1
CHANGED_NS_LOG_SIZE = 4096

#: 4.4 (figure 112) SGL descriptor: address, length, 3 reserved bytes, SGL identifier (type 7:4, subtype 3:0).
SGL_DESCRIPTOR = Struct("address" / Int64ul, "length" / Int32ul, Padding(3),
                        "ident" / BitStruct("type" / BitsInteger(4), "subtype" / BitsInteger(4)))
SGL_DESC = struct.Struct("<QI3xB")
SGL_DATA_BLOCK, SGL_BIT_BUCKET, SGL_SEGMENT, SGL_LAST_SEGMENT = 0, 1, 2, 3
SGL_SUBTYPE_ADDRESS = 0

#: 6.7 (figure 364) Dataset Management range: context attributes, length in logical blocks, starting LBA.
DSM_RANGE = Struct("attributes" / Int32ul, "nlb" / Int32ul, "slba" / Int64ul)
DSM_RANGE_FMT = "<IIQ"
DSM_RANGE_SIZE = 16
