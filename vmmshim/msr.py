"""MSRs bhyve's userland emulates (``usr.sbin/bhyve/xmsr.c``): the ones a Linux, FreeBSD or NetBSD guest probes
that NVMM sends to userland and that are not the vlapic's. Reads of the rest, and writes the table refuses,
give #GP unless ``-w`` (``x86.ignore_msrs``), where reads give 0 and writes are dropped, as bhyve does.

Only MSRs the ops layer lets through reach this table: an architectural MSR the guest's CPUID does not offer
(IA32_SPEC_CTRL without IBRS/STIBP/SSBD, the MTRRs without MTRR, ...) raised #GP there, ``-w`` or not, and the ones
the ops layer emulates (IA32_SPEC_CTRL, IA32_ARCH_CAPABILITIES, IA32_TSC_ADJUST) never come here
(``ops/arch_msrs.py``, ``docs/msr.md``). ``-w`` thus turns only unknown MSRs into reads of 0.

Not supported: real MTRR semantics (they read as "no MTRRs"), the AMD northbridge MSRs beyond what
bhyve answers, microcode update.
"""

MSR_MCG_CAP, MSR_MCG_STATUS = 0x179, 0x17A
MSR_MTRRCAP, MSR_MTRR_DEF_TYPE = 0xFE, 0x2FF
MSR_MTRR_FIRST, MSR_MTRR_LAST = 0x200, 0x26F
MSR_MISC_ENABLE = 0x1A0
MSR_PLATFORM_INFO = 0xCE
MSR_BIOS_SIGN = 0x8B
MSR_PLATFORM_ID = 0x17
MSR_AMD_HWCR = 0xC0010015
MSR_AMD_NB_CFG = 0xC001001F
MSR_AMD_PERFCTL_FIRST, MSR_AMD_PERFCTL_LAST = 0xC0010000, 0xC0010007
MSR_AMD_SYSCFG = 0xC0010010
MSR_AMD_LS_CFG = 0xC0011020
MSR_AMD_DE_CFG = 0xC0011029
MSR_TURBO_RATIO = 0x1AD

_READ_ZERO = {MSR_MCG_CAP, MSR_MCG_STATUS, MSR_MTRRCAP, MSR_MTRR_DEF_TYPE, MSR_PLATFORM_INFO, MSR_BIOS_SIGN,
              MSR_PLATFORM_ID, MSR_AMD_HWCR, MSR_AMD_NB_CFG, MSR_AMD_SYSCFG, MSR_AMD_LS_CFG, MSR_AMD_DE_CFG,
              MSR_TURBO_RATIO}
_WRITE_IGNORED = {MSR_MCG_STATUS, MSR_MTRR_DEF_TYPE, MSR_BIOS_SIGN, MSR_AMD_HWCR, MSR_AMD_NB_CFG,
                  MSR_AMD_LS_CFG, MSR_AMD_DE_CFG}


class MsrEmulator:
    def __init__(self, ignore_unknown=False):
        self.ignore_unknown = ignore_unknown
        self.misc_enable = 1 << 0   # fast strings; no MONITOR/MWAIT (bit 18 clear)
        self.unknown = []           # (rdmsr/wrmsr, msr) the guest tried, for diagnostics

    def rdmsr(self, msr):
        """The value, or ``None`` for #GP."""
        if msr in _READ_ZERO or MSR_MTRR_FIRST <= msr <= MSR_MTRR_LAST or \
                MSR_AMD_PERFCTL_FIRST <= msr <= MSR_AMD_PERFCTL_LAST:
            return 0
        if msr == MSR_MISC_ENABLE:
            return self.misc_enable
        self.unknown.append(("rdmsr", msr))
        return 0 if self.ignore_unknown else None

    def wrmsr(self, msr, value):
        """True when accepted, False for #GP."""
        if msr in _WRITE_IGNORED or MSR_MTRR_FIRST <= msr <= MSR_MTRR_LAST or \
                MSR_AMD_PERFCTL_FIRST <= msr <= MSR_AMD_PERFCTL_LAST:
            return True
        if msr == MSR_MISC_ENABLE:
            self.misc_enable = value & ~(1 << 18)
            return True
        self.unknown.append(("wrmsr", msr))
        return self.ignore_unknown
