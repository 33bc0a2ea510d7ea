"""Local APIC register page: offsets, writable masks and the construct layout of the 4 KiB page.

Intel SDM vol. 3A chapter 10 (11 in newer editions) "Advanced Programmable Interrupt Controller (APIC)":
table 10-1 "Local APIC Register Address Map" (xAPIC MMIO offsets), table 10-6 "Local APIC Register Address Map
Supported by x2APIC" (MSR 0x800 + offset/16), figure 10-8 "Local Vector Table (LVT)", figure 10-10 "Divide
Configuration Register", figure 10-12 "Interrupt Command Register (ICR)", section 10.5.3 "Error Handling".

:data:`LAPIC_PAGE` is the construct description of the page (each register is a 32-bit little-endian word at
the start of a 16-byte slot, as in bhyve's ``struct LAPIC``). It documents the layout and is used to export and
import a vlapic's state; the vlapic's hot path works on plain ints keyed by offset.

Not supported here: the extended APIC registers of AMD (offsets 0x400+), the 8-bit x2APIC reserved-bit #GP checks
(see :mod:`bhyve_devices.vlapic`).
"""

from construct import Int32ul, Padding, Struct

#: Where the local APIC page sits after reset (IA32_APIC_BASE's default; bhyve's ``DEFAULT_APIC_BASE``) and its
#: size, one 4 KiB page (bhyve's ``APIC_SIZE``): the one definition, which the MP table, the MADT and the ops layer
#: import.
DEFAULT_APIC_BASE = 0xFEE00000
APIC_SIZE = 0x1000

# Register offsets (SDM table 10-1; anchors (f)).
ID = 0x020
VER = 0x030
TPR = 0x080
APR = 0x090
PPR = 0x0A0
EOI = 0x0B0
RRD = 0x0C0
LDR = 0x0D0
DFR = 0x0E0
SVR = 0x0F0
ISR0 = 0x100
TMR0 = 0x180
IRR0 = 0x200
ESR = 0x280
LVT_CMCI = 0x2F0
ICR_LO = 0x300
ICR_HI = 0x310
LVT_TIMER = 0x320
LVT_THERMAL = 0x330
LVT_PMC = 0x340
LVT_LINT0 = 0x350
LVT_LINT1 = 0x360
LVT_ERROR = 0x370
TIMER_ICR = 0x380
TIMER_CCR = 0x390
TIMER_DCR = 0x3E0
SELF_IPI = 0x3F0

LVT_OFFSETS = (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PMC, LVT_LINT0, LVT_LINT1, LVT_ERROR)

# Version register: bhyve's VLAPIC_VERSION (0x14, an integrated APIC, as QEMU's), max LVT entry index 6 = CMCI
# present. No EOI-broadcast suppression (bit 24 clear), so SVR bit 12 is not writable. The MP table's processor
# entries carry the same VERSION (Linux compares the two: "BIOS bug: APIC version mismatch").
VERSION = 0x14
MAX_LVT = 6
VER_VALUE = (MAX_LVT << 16) | VERSION

# SVR bits.
SVR_VECTOR = 0xFF
SVR_ENABLE = 1 << 8
SVR_FOCUS_DISABLE = 1 << 9
SVR_WRITABLE = SVR_VECTOR | SVR_ENABLE | SVR_FOCUS_DISABLE

# LVT bits (figure 10-8).
LVT_VECTOR = 0xFF
LVT_DELMODE = 0x700
LVT_DELSTAT = 1 << 12
LVT_POLARITY = 1 << 13
LVT_REMOTE_IRR = 1 << 14
LVT_TRIGGER = 1 << 15
LVT_MASKED = 1 << 16
TIMER_MODE_SHIFT = 17
TIMER_MODE_MASK = 3 << TIMER_MODE_SHIFT
TIMER_ONESHOT = 0
TIMER_PERIODIC = 1
TIMER_TSC_DEADLINE = 2

DELMODE_FIXED = 0
DELMODE_LOWPRI = 1
DELMODE_SMI = 2
DELMODE_NMI = 4
DELMODE_INIT = 5
DELMODE_STARTUP = 6
DELMODE_EXTINT = 7

# Per-LVT writable masks (as bhyve's lvt write handler; remote IRR and delivery status are read-only).
LVT_WRITABLE = {
    LVT_TIMER: LVT_VECTOR | LVT_MASKED | TIMER_MODE_MASK,
    LVT_THERMAL: LVT_VECTOR | LVT_DELMODE | LVT_MASKED,
    LVT_PMC: LVT_VECTOR | LVT_DELMODE | LVT_MASKED,
    LVT_CMCI: LVT_VECTOR | LVT_DELMODE | LVT_MASKED,
    LVT_LINT0: LVT_VECTOR | LVT_DELMODE | LVT_POLARITY | LVT_TRIGGER | LVT_MASKED,
    LVT_LINT1: LVT_VECTOR | LVT_DELMODE | LVT_POLARITY | LVT_TRIGGER | LVT_MASKED,
    LVT_ERROR: LVT_VECTOR | LVT_MASKED,
}
LVT_RESET = LVT_MASKED

# ESR bits (section 10.5.3).
ESR_SEND_CHECKSUM = 1 << 0
ESR_RECV_CHECKSUM = 1 << 1
ESR_SEND_ACCEPT = 1 << 2
ESR_RECV_ACCEPT = 1 << 3
ESR_REDIRECTABLE_IPI = 1 << 4
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# ICR low fields (figure 10-12).
ICR_VECTOR = 0xFF
ICR_DELMODE_SHIFT = 8
ICR_LOGICAL = 1 << 11
ICR_DELSTAT = 1 << 12
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
ICR_LO_WRITABLE = 0x000CCFFF
SHORTHAND_NONE = 0
SHORTHAND_SELF = 1
SHORTHAND_ALL_INCL = 2
SHORTHAND_ALL_EXCL = 3

DCR_WRITABLE = 0xB
LDR_XAPIC_WRITABLE = 0xFF000000
DFR_WRITABLE = 0xF0000000
DFR_FLAT = 0xF
DFR_CLUSTER = 0x0

# APIC base MSR (section 10.4.4).
MSR_APICBASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF
APICBASE_BSP = 1 << 8
APICBASE_X2APIC = 1 << 10
APICBASE_ENABLED = 1 << 11
APICBASE_ADDR = 0x000FFFFFFFFFF000

# Timer (anchors (f)): bhyve's 128 MiHz bus clock.
BUS_HZ = 128 * 1024 * 1024


def dcr_divisor(dcr):
    """Divide value for a DCR (figure 10-10): bits 3,1:0 give 2,4,8,16,32,64,128,1."""
    code = ((dcr >> 1) & 4) | (dcr & 3)
    return 1 if code == 7 else 2 << code


# Names of the 16-byte slots in offset order; slots not named are reserved.
REG_NAMES = {
    ID: "id", VER: "version", TPR: "tpr", APR: "apr", PPR: "ppr", EOI: "eoi", RRD: "rrd", LDR: "ldr",
    DFR: "dfr", SVR: "svr", ESR: "esr", LVT_CMCI: "lvt_cmci", ICR_LO: "icr_lo", ICR_HI: "icr_hi",
    LVT_TIMER: "lvt_timer", LVT_THERMAL: "lvt_thermal", LVT_PMC: "lvt_pmc", LVT_LINT0: "lvt_lint0",
    LVT_LINT1: "lvt_lint1", LVT_ERROR: "lvt_error", TIMER_ICR: "icr_timer", TIMER_CCR: "ccr_timer",
    TIMER_DCR: "dcr_timer", SELF_IPI: "self_ipi",
}
for _i in range(8):
    REG_NAMES[ISR0 + 16 * _i] = f"isr{_i}"
    REG_NAMES[TMR0 + 16 * _i] = f"tmr{_i}"
    REG_NAMES[IRR0 + 16 * _i] = f"irr{_i}"
OFFSET_OF = {name: off for off, name in REG_NAMES.items()}


def _page_fields():
    fields = []
    for off in range(0, 0x400, 16):
        name = REG_NAMES.get(off)
        if name is None:
            fields.append(Padding(16))
        else:
            fields.append(name / Int32ul)
            fields.append(Padding(12))
    fields.append(Padding(APIC_SIZE - 0x400))
    return fields


LAPIC_PAGE = Struct(*_page_fields())
"""The LAPIC page as a construct Struct: ``LAPIC_PAGE.parse(page)`` gives a container with ``id``, ``tpr``,
``isr0``..``isr7``, ``lvt_timer`` ... (all 32-bit); ``LAPIC_PAGE.build(dict)`` gives the 4096 bytes."""
