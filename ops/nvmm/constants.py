"""NVMM's constants, with libnvmm's names (NetBSD 10: kernel and user version 2).

Values are those of ``sys/dev/nvmm/x86/nvmm_x86.h`` 1.21 and ``lib/libnvmm/nvmm.h`` 1.19 as recorded in
``shared/reference/nvmm-abi.md`` (section "Constants"); ``tests/unit/test_nvmm_constants.py`` pins them.
Every provider speaks these numbers, whatever its hypervisor calls them.

Not here: the version-1 (NetBSD 9) names, and the pre-9 ``NVMM_EXIT_*`` enums.
"""

NVMM_KERN_VERSION = 2
NVMM_USER_VERSION = 2

# Exit reasons (nvmm_x86_exit.reason, uint64_t).
NVMM_VCPU_EXIT_NONE = 0x0
NVMM_VCPU_EXIT_STOPPED = 0xFFFFFFFFFFFFFFFE
NVMM_VCPU_EXIT_INVALID = 0xFFFFFFFFFFFFFFFF
NVMM_VCPU_EXIT_MEMORY = 0x1
NVMM_VCPU_EXIT_IO = 0x2
NVMM_VCPU_EXIT_SHUTDOWN = 0x1000
NVMM_VCPU_EXIT_INT_READY = 0x1001
NVMM_VCPU_EXIT_NMI_READY = 0x1002
NVMM_VCPU_EXIT_HALTED = 0x1003
NVMM_VCPU_EXIT_TPR_CHANGED = 0x1004
NVMM_VCPU_EXIT_RDMSR = 0x2000
NVMM_VCPU_EXIT_WRMSR = 0x2001
NVMM_VCPU_EXIT_MONITOR = 0x2002
NVMM_VCPU_EXIT_MWAIT = 0x2003
NVMM_VCPU_EXIT_CPUID = 0x2004

EXIT_NAMES = {v: k[len("NVMM_VCPU_EXIT_"):] for k, v in dict(globals()).items()
              if k.startswith("NVMM_VCPU_EXIT_")}

# Event types (nvmm_x86_event.type).
NVMM_VCPU_EVENT_EXCP = 0
NVMM_VCPU_EVENT_INTR = 1

# Capability bits (nvmm_cap_md.vcpu_conf_support).
NVMM_CAP_ARCH_VCPU_CONF_CPUID = 1 << 0
NVMM_CAP_ARCH_VCPU_CONF_TPR = 1 << 1

# Segment indexes (nvmm_x64_state.segs[]).
NVMM_X64_SEG_ES = 0
NVMM_X64_SEG_CS = 1
NVMM_X64_SEG_SS = 2
NVMM_X64_SEG_DS = 3
NVMM_X64_SEG_FS = 4
NVMM_X64_SEG_GS = 5
NVMM_X64_SEG_GDT = 6
NVMM_X64_SEG_IDT = 7
NVMM_X64_SEG_LDT = 8
NVMM_X64_SEG_TR = 9
NVMM_X64_NSEG = 10

# GPR indexes (nvmm_x64_state.gprs[]).
NVMM_X64_GPR_RAX = 0
NVMM_X64_GPR_RCX = 1
NVMM_X64_GPR_RDX = 2
NVMM_X64_GPR_RBX = 3
NVMM_X64_GPR_RSP = 4
NVMM_X64_GPR_RBP = 5
NVMM_X64_GPR_RSI = 6
NVMM_X64_GPR_RDI = 7
NVMM_X64_GPR_R8 = 8
NVMM_X64_GPR_R9 = 9
NVMM_X64_GPR_R10 = 10
NVMM_X64_GPR_R11 = 11
NVMM_X64_GPR_R12 = 12
NVMM_X64_GPR_R13 = 13
NVMM_X64_GPR_R14 = 14
NVMM_X64_GPR_R15 = 15
NVMM_X64_GPR_RIP = 16
NVMM_X64_GPR_RFLAGS = 17
NVMM_X64_NGPR = 18

# Control register indexes (nvmm_x64_state.crs[]).
NVMM_X64_CR_CR0 = 0
NVMM_X64_CR_CR2 = 1
NVMM_X64_CR_CR3 = 2
NVMM_X64_CR_CR4 = 3
NVMM_X64_CR_CR8 = 4
NVMM_X64_CR_XCR0 = 5
NVMM_X64_NCR = 6

# Debug register indexes (nvmm_x64_state.drs[]).
NVMM_X64_DR_DR0 = 0
NVMM_X64_DR_DR1 = 1
NVMM_X64_DR_DR2 = 2
NVMM_X64_DR_DR3 = 3
NVMM_X64_DR_DR6 = 4
NVMM_X64_DR_DR7 = 5
NVMM_X64_NDR = 6

# MSR indexes (nvmm_x64_state.msrs[]).
NVMM_X64_MSR_EFER = 0
NVMM_X64_MSR_STAR = 1
NVMM_X64_MSR_LSTAR = 2
NVMM_X64_MSR_CSTAR = 3
NVMM_X64_MSR_SFMASK = 4
NVMM_X64_MSR_KERNELGSBASE = 5
NVMM_X64_MSR_SYSENTER_CS = 6
NVMM_X64_MSR_SYSENTER_ESP = 7
NVMM_X64_MSR_SYSENTER_EIP = 8
NVMM_X64_MSR_PAT = 9
NVMM_X64_MSR_TSC = 10
NVMM_X64_NMSR = 11

# State flags (getstate/setstate, comm page state_* words).
NVMM_X64_STATE_SEGS = 0x01
NVMM_X64_STATE_GPRS = 0x02
NVMM_X64_STATE_CRS = 0x04
NVMM_X64_STATE_DRS = 0x08
NVMM_X64_STATE_MSRS = 0x10
NVMM_X64_STATE_INTR = 0x20
NVMM_X64_STATE_FPU = 0x40
NVMM_X64_STATE_ALL = 0x7F

# Configuration slots and ops.
NVMM_MACH_CONF_LIBNVMM_BEGIN = 0
NVMM_MACH_CONF_MI_BEGIN = 100
NVMM_MACH_CONF_MD_BEGIN = 200
NVMM_VCPU_CONF_LIBNVMM_BEGIN = 0
NVMM_VCPU_CONF_MI_BEGIN = 100
NVMM_VCPU_CONF_MD_BEGIN = 200
NVMM_VCPU_CONF_CALLBACKS = NVMM_VCPU_CONF_LIBNVMM_BEGIN
NVMM_VCPU_CONF_CPUID = NVMM_VCPU_CONF_MD_BEGIN
NVMM_VCPU_CONF_TPR = NVMM_VCPU_CONF_MD_BEGIN + 1

# Memory protection (nvmm_gpa_map prot is PROT_*; nvmm_prot_t in exits and walks is NVMM_PROT_*).
NVMM_PROT_READ = 0x1
NVMM_PROT_WRITE = 0x2
NVMM_PROT_EXEC = 0x4
NVMM_PROT_USER = 0x8
NVMM_PROT_ALL = 0xF

NVMM_CTL_MACH_INFO = 0

# libnvmm's REP batching for string I/O (NVMM_IO_BATCH_SIZE in libnvmm_x86.c).
NVMM_IO_BATCH_SIZE = 32

# x86 architectural numbers the primitives need (SDM vol. 3).
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12
CR4_OSXSAVE = 1 << 18
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_CF = 1 << 0
RFLAGS_RESERVED1 = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10

# Exception vectors (SDM vol. 3, table 6-1).
X86_EXC_DE, X86_EXC_DB, X86_EXC_NMI, X86_EXC_BP, X86_EXC_OF = 0, 1, 2, 3, 4
X86_EXC_UD, X86_EXC_NM, X86_EXC_DF, X86_EXC_TS, X86_EXC_NP = 6, 7, 8, 10, 11
X86_EXC_SS, X86_EXC_GP, X86_EXC_PF, X86_EXC_AC, X86_EXC_CP = 12, 13, 14, 17, 21
X86_EXC_SX = 30
#: Vectors whose delivery pushes an error code (NVMM delivers one only for these).
X86_EXC_HAS_ERROR = frozenset({X86_EXC_DF, X86_EXC_TS, X86_EXC_NP, X86_EXC_SS, X86_EXC_GP, X86_EXC_PF,
                               X86_EXC_AC, X86_EXC_CP, X86_EXC_SX})
#: Exception vectors NVMM's kernel refuses in an EXCP event (nvmm_x86_vmx.c/svm.c inject).
NVMM_EXCP_REFUSED = frozenset({X86_EXC_DE, X86_EXC_NMI, X86_EXC_BP})

# CPUID bits the ops layer offers or hides (SDM vol. 2A, CPUID leaf 1)
CPUID_1_ECX_X2APIC = 1 << 21
CPUID_1_ECX_TSC_DEADLINE = 1 << 24

# MSRs NVMM sends to userland that the ops layer handles.
MSR_APICBASE = 0x1B
MSR_X2APIC_BASE = 0x800
MSR_X2APIC_LAST = 0x8FF
