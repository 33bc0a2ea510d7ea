"""The Linux x86 boot protocol's structures, declared with ``construct``.

Sources: ``Documentation/arch/x86/boot.rst`` (sections "The real-mode kernel header", "Details of header
fields", "The 32-bit boot protocol") and ``Documentation/arch/x86/zero-page.rst`` for the offsets, and
``arch/x86/include/uapi/asm/bootparam.h`` (``struct setup_header``, ``struct boot_params``) and
``asm/e820/types.h`` (``struct boot_e820_entry``) for the field sizes. Everything is little-endian and
packed.

The parts of the zero page a loader for the 32-bit protocol never fills (``screen_info``, the APM, IST, EDID,
EFI and EDD blocks) are kept as named byte blocks of the right size, so a parse/build round trip is exact.
"""

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

#: Where things are, as offsets into the bzImage file and into the zero page (the same numbers: the setup
#: header sits at 0x1F1 in both).
SETUP_HEADER_OFFSET = 0x1F1
#: The boot sector's 0xAA55 (``boot_flag``) and the header's "HdrS" magic.
BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448
#: ``loadflags`` bits.
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
#: ``type_of_loader`` for kexec-tools (boot.rst's loader ID table), which xhyve's kexec also writes.
LOADER_TYPE_KEXEC = 0xD
#: ``boot_params.e820_table`` holds this many entries (E820_MAX_ENTRIES_ZEROPAGE).
E820_MAX_ENTRIES_ZEROPAGE = 128
#: ``eddbuf`` holds EDDMAXNR ``struct edd_info`` of 82 bytes each; ``edd_mbr_sig_buffer`` EDD_MBR_SIG_MAX u32.
EDDMAXNR = 6
EDD_INFO_SIZE = 82
EDD_MBR_SIG_MAX = 16

#: ``struct setup_header`` (boot.rst "The real-mode kernel header"), 0x1F1..0x26C: protocol 2.15's fields.
SetupHeader = Struct(
    "setup_sects" / Int8ul,            # 0x1F1  size of the setup in 512-byte sectors (0 means 4)
    "root_flags" / Int16ul,            # 0x1F2
    "syssize" / Int32ul,               # 0x1F4  size of the 32-bit code in 16-byte paragraphs
    "ram_size" / Int16ul,              # 0x1F8  obsolete
    "vid_mode" / Int16ul,              # 0x1FA
    "root_dev" / Int16ul,              # 0x1FC
    "boot_flag" / Int16ul,             # 0x1FE  0xAA55
    "jump" / Int16ul,                  # 0x200  short jump; its second byte + 0x202 is the header's end
    "header" / Int32ul,                # 0x202  "HdrS"
    "version" / Int16ul,               # 0x206  boot protocol version, major << 8 | minor
    "realmode_swtch" / Int32ul,        # 0x208
    "start_sys_seg" / Int16ul,         # 0x20C  obsolete
    "kernel_version" / Int16ul,        # 0x20E  pointer to the version string, minus 0x200
    "type_of_loader" / Int8ul,         # 0x210
    "loadflags" / Int8ul,              # 0x211
    "setup_move_size" / Int16ul,       # 0x212
    "code32_start" / Int32ul,          # 0x214
    "ramdisk_image" / Int32ul,         # 0x218
    "ramdisk_size" / Int32ul,          # 0x21C
    "bootsect_kludge" / Int32ul,       # 0x220  obsolete
    "heap_end_ptr" / Int16ul,          # 0x224
    "ext_loader_ver" / Int8ul,         # 0x226
    "ext_loader_type" / Int8ul,        # 0x227
    "cmd_line_ptr" / Int32ul,          # 0x228
    "initrd_addr_max" / Int32ul,       # 0x22C  highest address the initrd may occupy
    "kernel_alignment" / Int32ul,      # 0x230
    "relocatable_kernel" / Int8ul,     # 0x234
    "min_alignment" / Int8ul,          # 0x235
    "xloadflags" / Int16ul,            # 0x236
    "cmdline_size" / Int32ul,          # 0x238  longest command line, not counting the terminating zero
    "hardware_subarch" / Int32ul,      # 0x23C
    "hardware_subarch_data" / Int64ul,  # 0x240
    "payload_offset" / Int32ul,        # 0x248
    "payload_length" / Int32ul,        # 0x24C
    "setup_data" / Int64ul,            # 0x250
    "pref_address" / Int64ul,          # 0x258
    "init_size" / Int32ul,             # 0x260  linear memory the kernel needs from its runtime start
    "handover_offset" / Int32ul,       # 0x264
    "kernel_info_offset" / Int32ul,    # 0x268
)
SETUP_HEADER_SIZE = SetupHeader.sizeof()
SETUP_HEADER_END = SETUP_HEADER_OFFSET + SETUP_HEADER_SIZE  # 0x26C

#: ``struct boot_e820_entry``: 20 bytes, packed.
E820Entry = Struct(
    "addr" / Int64ul,
    "size" / Int64ul,
    "type" / Int32ul,
)

#: ``struct boot_params``, the 4 KiB "zero page" (zero-page.rst).
BootParams = Struct(
    "screen_info" / Bytes(0x40),                       # 0x000
    "apm_bios_info" / Bytes(0x14),                     # 0x040
    "pad2" / Bytes(4),                                # 0x054
    "tboot_addr" / Int64ul,                            # 0x058
    "ist_info" / Bytes(0x10),                          # 0x060
    "acpi_rsdp_addr" / Int64ul,                        # 0x070
    "pad3" / Bytes(8),                                # 0x078
    "hd0_info" / Bytes(16),                            # 0x080  obsolete
    "hd1_info" / Bytes(16),                            # 0x090  obsolete
    "sys_desc_table" / Bytes(0x10),                    # 0x0A0  obsolete
    "olpc_ofw_header" / Bytes(0x10),                   # 0x0B0
    "ext_ramdisk_image" / Int32ul,                     # 0x0C0
    "ext_ramdisk_size" / Int32ul,                      # 0x0C4
    "ext_cmd_line_ptr" / Int32ul,                      # 0x0C8
    "pad4" / Bytes(112),                              # 0x0CC
    "cc_blob_address" / Int32ul,                       # 0x13C
    "edid_info" / Bytes(0x80),                         # 0x140
    "efi_info" / Bytes(0x20),                          # 0x1C0
    "alt_mem_k" / Int32ul,                             # 0x1E0  KiB of memory above 1 MiB
    "scratch" / Int32ul,                               # 0x1E4  the kernel's early stack uses it
    "e820_entries" / Int8ul,                           # 0x1E8
    "eddbuf_entries" / Int8ul,                         # 0x1E9
    "edd_mbr_sig_buf_entries" / Int8ul,                # 0x1EA
    "kbd_status" / Int8ul,                             # 0x1EB
    "secure_boot" / Int8ul,                            # 0x1EC
    "pad5" / Bytes(2),                                # 0x1ED
    "sentinel" / Int8ul,                               # 0x1EF  nonzero: the loader did not clear the page
    "pad6" / Bytes(1),                                # 0x1F0
    "hdr" / SetupHeader,                               # 0x1F1
    "pad7" / Bytes(0x290 - SETUP_HEADER_END),         # 0x26C
    "edd_mbr_sig_buffer" / Array(EDD_MBR_SIG_MAX, Int32ul),         # 0x290
    "e820_table" / Array(E820_MAX_ENTRIES_ZEROPAGE, E820Entry),     # 0x2D0
    "pad8" / Bytes(48),                               # 0xCD0
    "eddbuf" / Bytes(EDDMAXNR * EDD_INFO_SIZE),        # 0xD00
    "pad9" / Bytes(276),                              # 0xEEC
)
BOOT_PARAMS_SIZE = 0x1000
assert BootParams.sizeof() == BOOT_PARAMS_SIZE
assert SETUP_HEADER_END == 0x26C

__all__ = [
    "BootParams", "SetupHeader", "E820Entry", "SETUP_HEADER_OFFSET", "SETUP_HEADER_SIZE", "SETUP_HEADER_END",
    "BOOT_PARAMS_SIZE", "BOOT_FLAG", "HDRS_MAGIC", "LOADED_HIGH", "KASLR_FLAG", "QUIET_FLAG", "KEEP_SEGMENTS",
    "CAN_USE_HEAP", "LOADER_TYPE_KEXEC", "E820_MAX_ENTRIES_ZEROPAGE",
]
