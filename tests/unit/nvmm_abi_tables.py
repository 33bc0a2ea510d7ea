"""NetBSD 10's NVMM ABI as measured, the tables of ``shared/reference/nvmm-abi.md`` row for row (gcc 12 on the
NetBSD 10 headers: ``sizeof``, ``_Alignof``, ``offsetof``, bitfields found by setting one field to -1 and scanning the
bits), for ``test_libnvmm_abi.py`` to compare with the cdefs, the constants and the state layouts.

Not here: anything the reference does not measure (the kernel's private structures, other NetBSD releases).
"""

import re

# (C type, size, align): nvmm-abi.md "Struct summary" and the "####" headings
STRUCTS = {
    'struct nvmm_x86_exit_memory': (32, 8), 'struct nvmm_x86_exit_io': (24, 8),
    'struct nvmm_x86_exit_rdmsr': (16, 8), 'struct nvmm_x86_exit_wrmsr': (24, 8),
    'struct nvmm_x86_exit_insn': (8, 8), 'struct nvmm_x86_exit_invalid': (8, 8), 'struct nvmm_x86_exit': (64, 8),
    'struct nvmm_x86_event': (16, 8), 'struct nvmm_cap_md': (80, 8), 'struct nvmm_capability': (104, 8),
    'struct nvmm_x64_state_seg': (16, 8), 'struct nvmm_x64_state_intr': (8, 8), 'struct nvmm_x64_state': (1008, 16),
    'union fp_addr': (8, 4), 'struct fpacc87': (10, 2), 'struct fpaccfx': (16, 16), 'struct xmmreg': (16, 1),
    'struct fxsave': (512, 16), 'struct nvmm_vcpu_conf_cpuid': (40, 4), 'struct nvmm_vcpu_conf_tpr': (4, 4),
    'struct nvmm_comm_page': (1072, 16), 'struct nvmm_assist_callbacks': (16, 8), 'struct nvmm_machine': (24, 8),
    'struct nvmm_vcpu': (56, 8), 'struct nvmm_io': (40, 8), 'struct nvmm_mem': (48, 8),
    'struct nvmm_ioc_capability': (104, 8), 'struct nvmm_ioc_machine_create': (4, 4),
    'struct nvmm_ioc_machine_destroy': (4, 4), 'struct nvmm_ioc_machine_configure': (24, 8),
    'struct nvmm_ioc_vcpu_create': (8, 4), 'struct nvmm_ioc_vcpu_destroy': (8, 4),
    'struct nvmm_ioc_vcpu_configure': (24, 8), 'struct nvmm_ioc_vcpu_setstate': (8, 4),
    'struct nvmm_ioc_vcpu_getstate': (8, 4), 'struct nvmm_ioc_vcpu_inject': (8, 4),
    'struct nvmm_ioc_vcpu_run': (72, 8), 'struct nvmm_ioc_hva_map': (32, 8), 'struct nvmm_ioc_hva_unmap': (32, 8),
    'struct nvmm_ioc_gpa_map': (40, 8), 'struct nvmm_ioc_gpa_unmap': (24, 8), 'struct nvmm_ctl_mach_info': (32, 8),
    'struct nvmm_ioc_ctl': (24, 8),
}

# C type -> [(field path, offset, size, align)], nvmm-abi.md "Fields" tables, row for row
FIELDS = {
    'struct nvmm_x86_exit_memory': [
        ('prot', 0, 4, 4), ('gpa', 8, 8, 8), ('inst_len', 16, 1, 1), ('inst_bytes', 17, 15, 1),
    ],
    'struct nvmm_x86_exit_io': [
        ('in', 0, 1, 1), ('port', 2, 2, 2), ('seg', 4, 1, 1), ('address_size', 5, 1, 1), ('operand_size', 6, 1, 1),
        ('rep', 7, 1, 1), ('str', 8, 1, 1), ('npc', 16, 8, 8),
    ],
    'struct nvmm_x86_exit_rdmsr': [
        ('msr', 0, 4, 4), ('npc', 8, 8, 8),
    ],
    'struct nvmm_x86_exit_wrmsr': [
        ('msr', 0, 4, 4), ('val', 8, 8, 8), ('npc', 16, 8, 8),
    ],
    'struct nvmm_x86_exit_insn': [
        ('npc', 0, 8, 8),
    ],
    'struct nvmm_x86_exit_invalid': [
        ('hwcode', 0, 8, 8),
    ],
    'struct nvmm_x86_exit': [
        ('reason', 0, 8, 8), ('u', 8, 32, 8), ('u.mem', 8, 32, 8), ('u.io', 8, 24, 8), ('u.rdmsr', 8, 16, 8),
        ('u.wrmsr', 8, 24, 8), ('u.insn', 8, 8, 8), ('u.inv', 8, 8, 8), ('u.mem.prot', 8, 4, 4),
        ('u.mem.gpa', 16, 8, 8), ('u.mem.inst_len', 24, 1, 1), ('u.mem.inst_bytes', 25, 15, 1),
        ('u.io.in', 8, 1, 1), ('u.io.port', 10, 2, 2), ('u.io.seg', 12, 1, 1), ('u.io.address_size', 13, 1, 1),
        ('u.io.operand_size', 14, 1, 1), ('u.io.rep', 15, 1, 1), ('u.io.str', 16, 1, 1), ('u.io.npc', 24, 8, 8),
        ('u.rdmsr.msr', 8, 4, 4), ('u.rdmsr.npc', 16, 8, 8), ('u.wrmsr.msr', 8, 4, 4), ('u.wrmsr.val', 16, 8, 8),
        ('u.wrmsr.npc', 24, 8, 8), ('u.insn.npc', 8, 8, 8), ('u.inv.hwcode', 8, 8, 8), ('exitstate', 40, 24, 8),
        ('exitstate.rflags', 40, 8, 8), ('exitstate.cr8', 48, 8, 8),
    ],
    'struct nvmm_x86_event': [
        ('type', 0, 4, 4), ('vector', 4, 1, 1), ('u', 8, 8, 8), ('u.excp', 8, 8, 8), ('u.excp.error', 8, 8, 8),
    ],
    'struct nvmm_cap_md': [
        ('mach_conf_support', 0, 8, 8), ('vcpu_conf_support', 8, 8, 8), ('xcr0_mask', 16, 8, 8),
        ('mxcsr_mask', 24, 4, 4), ('conf_cpuid_maxops', 28, 4, 4), ('rsvd', 32, 48, 8),
    ],
    'struct nvmm_capability': [
        ('version', 0, 4, 4), ('state_size', 4, 4, 4), ('max_machines', 8, 4, 4), ('max_vcpus', 12, 4, 4),
        ('max_ram', 16, 8, 8), ('arch', 24, 80, 8), ('arch.mach_conf_support', 24, 8, 8),
        ('arch.vcpu_conf_support', 32, 8, 8), ('arch.xcr0_mask', 40, 8, 8), ('arch.mxcsr_mask', 48, 4, 4),
        ('arch.conf_cpuid_maxops', 52, 4, 4), ('arch.rsvd', 56, 48, 8),
    ],
    'struct nvmm_x64_state_seg': [
        ('selector', 0, 2, 2), ('attrib', 2, 2, 2), ('limit', 4, 4, 4), ('base', 8, 8, 8),
    ],
    'struct nvmm_x64_state': [
        ('segs', 0, 160, 8), ('gprs', 160, 144, 8), ('crs', 304, 48, 8), ('drs', 352, 48, 8), ('msrs', 400, 88, 8),
        ('intr', 488, 8, 8), ('fpu', 496, 512, 16), ('segs[1]', 16, 16, 8), ('segs[9]', 144, 16, 8),
        ('gprs[17]', 296, 8, 8), ('crs[5]', 344, 8, 8), ('drs[5]', 392, 8, 8), ('msrs[10]', 480, 8, 8),
        ('fpu.fx_mxcsr', 520, 4, 4), ('fpu.fx_xmm', 656, 256, 1),
    ],
    'union fp_addr': [
        ('fa_64', 0, 8, 8), ('fa_32', 0, 8, 4), ('fa_32.fa_off', 0, 4, 4), ('fa_32.fa_seg', 4, 2, 2),
        ('fa_32.fa_opcode', 6, 2, 2),
    ],
    'struct fpacc87': [
        ('f87_mantissa', 0, 8, 8), ('f87_exp_sign', 8, 2, 2),
    ],
    'struct fpaccfx': [
        ('r', 0, 10, 2),
    ],
    'struct xmmreg': [
        ('xmm_bytes', 0, 16, 1),
    ],
    'struct fxsave': [
        ('fx_cw', 0, 2, 2), ('fx_sw', 2, 2, 2), ('fx_tw', 4, 1, 1), ('fx_zero', 5, 1, 1), ('fx_opcode', 6, 2, 2),
        ('fx_ip', 8, 8, 4), ('fx_dp', 16, 8, 4), ('fx_mxcsr', 24, 4, 4), ('fx_mxcsr_mask', 28, 4, 4),
        ('fx_87_ac', 32, 128, 16), ('fx_xmm', 160, 256, 1), ('fx_rsvd', 416, 96, 1),
    ],
    'struct nvmm_vcpu_conf_cpuid': [
        ('leaf', 4, 4, 4), ('u', 8, 32, 4), ('u.mask', 8, 32, 4), ('u.mask.set', 8, 16, 4),
        ('u.mask.set.eax', 8, 4, 4), ('u.mask.set.ebx', 12, 4, 4), ('u.mask.set.ecx', 16, 4, 4),
        ('u.mask.set.edx', 20, 4, 4), ('u.mask.del', 24, 16, 4), ('u.mask.del.eax', 24, 4, 4),
        ('u.mask.del.ebx', 28, 4, 4), ('u.mask.del.ecx', 32, 4, 4), ('u.mask.del.edx', 36, 4, 4),
    ],
    'struct nvmm_comm_page': [
        ('state_wanted', 0, 8, 8), ('state_cached', 8, 8, 8), ('state_commit', 16, 8, 8), ('state', 32, 1008, 16),
        ('event_commit', 1040, 1, 1), ('event', 1048, 16, 8), ('stop', 1064, 4, 4),
    ],
    'struct nvmm_assist_callbacks': [
        ('io', 0, 8, 8), ('mem', 8, 8, 8),
    ],
    'struct nvmm_machine': [
        ('machid', 0, 4, 4), ('pages', 8, 8, 8), ('areas', 16, 8, 8),
    ],
    'struct nvmm_vcpu': [
        ('cpuid', 0, 4, 4), ('cbs', 8, 16, 8), ('cbs.io', 8, 8, 8), ('cbs.mem', 16, 8, 8), ('state', 24, 8, 8),
        ('event', 32, 8, 8), ('exit', 40, 8, 8), ('stop', 48, 8, 8),
    ],
    'struct nvmm_io': [
        ('mach', 0, 8, 8), ('vcpu', 8, 8, 8), ('port', 16, 2, 2), ('in', 18, 1, 1), ('size', 24, 8, 8),
        ('data', 32, 8, 8),
    ],
    'struct nvmm_mem': [
        ('mach', 0, 8, 8), ('vcpu', 8, 8, 8), ('gpa', 16, 8, 8), ('write', 24, 1, 1), ('size', 32, 8, 8),
        ('data', 40, 8, 8),
    ],
    'struct nvmm_ioc_capability': [
        ('cap', 0, 104, 8),
    ],
    'struct nvmm_ioc_machine_create': [
        ('machid', 0, 4, 4),
    ],
    'struct nvmm_ioc_machine_destroy': [
        ('machid', 0, 4, 4),
    ],
    'struct nvmm_ioc_machine_configure': [
        ('machid', 0, 4, 4), ('op', 8, 8, 8), ('conf', 16, 8, 8),
    ],
    'struct nvmm_ioc_vcpu_create': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4),
    ],
    'struct nvmm_ioc_vcpu_destroy': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4),
    ],
    'struct nvmm_ioc_vcpu_configure': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4), ('op', 8, 8, 8), ('conf', 16, 8, 8),
    ],
    'struct nvmm_ioc_vcpu_setstate': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4),
    ],
    'struct nvmm_ioc_vcpu_getstate': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4),
    ],
    'struct nvmm_ioc_vcpu_inject': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4),
    ],
    'struct nvmm_ioc_vcpu_run': [
        ('machid', 0, 4, 4), ('cpuid', 4, 4, 4), ('exit', 8, 64, 8),
    ],
    'struct nvmm_ioc_hva_map': [
        ('machid', 0, 4, 4), ('hva', 8, 8, 8), ('size', 16, 8, 8), ('flags', 24, 4, 4),
    ],
    'struct nvmm_ioc_hva_unmap': [
        ('machid', 0, 4, 4), ('hva', 8, 8, 8), ('size', 16, 8, 8), ('flags', 24, 4, 4),
    ],
    'struct nvmm_ioc_gpa_map': [
        ('machid', 0, 4, 4), ('hva', 8, 8, 8), ('gpa', 16, 8, 8), ('size', 24, 8, 8), ('prot', 32, 4, 4),
    ],
    'struct nvmm_ioc_gpa_unmap': [
        ('machid', 0, 4, 4), ('gpa', 8, 8, 8), ('size', 16, 8, 8),
    ],
    'struct nvmm_ctl_mach_info': [
        ('machid', 0, 4, 4), ('nvcpus', 4, 4, 4), ('nram', 8, 8, 8), ('pid', 16, 4, 4), ('time', 24, 8, 8),
    ],
    'struct nvmm_ioc_ctl': [
        ('op', 0, 4, 4), ('data', 8, 8, 8), ('size', 16, 8, 8),
    ],
}

# (C type, bitfield path, storage unit, unit offset, first bit, width, mask): the "Bitfields" tables
BITFIELDS = [
    ('struct nvmm_x86_exit', 'exitstate.int_shadow', 'uint64_t', 56, 0, 1, 0x1),
    ('struct nvmm_x86_exit', 'exitstate.int_window_exiting', 'uint64_t', 56, 1, 1, 0x2),
    ('struct nvmm_x86_exit', 'exitstate.nmi_window_exiting', 'uint64_t', 56, 2, 1, 0x4),
    ('struct nvmm_x86_exit', 'exitstate.evt_pending', 'uint64_t', 56, 3, 1, 0x8),
    ('struct nvmm_x86_exit', 'exitstate.rsvd', 'uint64_t', 56, 4, 60, 0xfffffffffffffff0),
    ('struct nvmm_x64_state_seg', 'attrib.type', 'uint16_t', 2, 0, 4, 0xf),
    ('struct nvmm_x64_state_seg', 'attrib.s', 'uint16_t', 2, 4, 1, 0x10),
    ('struct nvmm_x64_state_seg', 'attrib.dpl', 'uint16_t', 2, 5, 2, 0x60),
    ('struct nvmm_x64_state_seg', 'attrib.p', 'uint16_t', 2, 7, 1, 0x80),
    ('struct nvmm_x64_state_seg', 'attrib.avl', 'uint16_t', 2, 8, 1, 0x100),
    ('struct nvmm_x64_state_seg', 'attrib.l', 'uint16_t', 2, 9, 1, 0x200),
    ('struct nvmm_x64_state_seg', 'attrib.def', 'uint16_t', 2, 10, 1, 0x400),
    ('struct nvmm_x64_state_seg', 'attrib.g', 'uint16_t', 2, 11, 1, 0x800),
    ('struct nvmm_x64_state_seg', 'attrib.rsvd', 'uint16_t', 2, 12, 4, 0xf000),
    ('struct nvmm_x64_state_intr', 'int_shadow', 'uint64_t', 0, 0, 1, 0x1),
    ('struct nvmm_x64_state_intr', 'int_window_exiting', 'uint64_t', 0, 1, 1, 0x2),
    ('struct nvmm_x64_state_intr', 'nmi_window_exiting', 'uint64_t', 0, 2, 1, 0x4),
    ('struct nvmm_x64_state_intr', 'evt_pending', 'uint64_t', 0, 3, 1, 0x8),
    ('struct nvmm_x64_state_intr', 'rsvd', 'uint64_t', 0, 4, 60, 0xfffffffffffffff0),
    ('struct nvmm_vcpu_conf_cpuid', 'mask', 'uint32_t', 0, 0, 1, 0x1),
    ('struct nvmm_vcpu_conf_cpuid', 'exit', 'uint32_t', 0, 1, 1, 0x2),
    ('struct nvmm_vcpu_conf_cpuid', 'rsvd', 'uint32_t', 0, 2, 30, 0xfffffffc),
    ('struct nvmm_vcpu_conf_tpr', 'exit_changed', 'uint32_t', 0, 0, 1, 0x1),
    ('struct nvmm_vcpu_conf_tpr', 'rsvd', 'uint32_t', 0, 1, 31, 0xfffffffe),
]

# name -> value: nvmm-abi.md "Constants" (all tables)
CONSTANTS = {
    'NVMM_KERN_VERSION': 0x2, 'NVMM_USER_VERSION': 0x2, 'NVMM_VCPU_EXIT_NONE': 0x0,
    'NVMM_VCPU_EXIT_STOPPED': 0xfffffffffffffffe, 'NVMM_VCPU_EXIT_INVALID': 0xffffffffffffffff,
    'NVMM_VCPU_EXIT_MEMORY': 0x1, 'NVMM_VCPU_EXIT_IO': 0x2, 'NVMM_VCPU_EXIT_SHUTDOWN': 0x1000,
    'NVMM_VCPU_EXIT_INT_READY': 0x1001, 'NVMM_VCPU_EXIT_NMI_READY': 0x1002, 'NVMM_VCPU_EXIT_HALTED': 0x1003,
    'NVMM_VCPU_EXIT_TPR_CHANGED': 0x1004, 'NVMM_VCPU_EXIT_RDMSR': 0x2000, 'NVMM_VCPU_EXIT_WRMSR': 0x2001,
    'NVMM_VCPU_EXIT_MONITOR': 0x2002, 'NVMM_VCPU_EXIT_MWAIT': 0x2003, 'NVMM_VCPU_EXIT_CPUID': 0x2004,
    'NVMM_VCPU_EVENT_EXCP': 0x0, 'NVMM_VCPU_EVENT_INTR': 0x1, 'NVMM_CAP_ARCH_VCPU_CONF_CPUID': 0x1,
    'NVMM_CAP_ARCH_VCPU_CONF_TPR': 0x2, 'NVMM_X64_SEG_ES': 0x0, 'NVMM_X64_SEG_CS': 0x1, 'NVMM_X64_SEG_SS': 0x2,
    'NVMM_X64_SEG_DS': 0x3, 'NVMM_X64_SEG_FS': 0x4, 'NVMM_X64_SEG_GS': 0x5, 'NVMM_X64_SEG_GDT': 0x6,
    'NVMM_X64_SEG_IDT': 0x7, 'NVMM_X64_SEG_LDT': 0x8, 'NVMM_X64_SEG_TR': 0x9, 'NVMM_X64_NSEG': 0xa,
    'NVMM_X64_GPR_RAX': 0x0, 'NVMM_X64_GPR_RCX': 0x1, 'NVMM_X64_GPR_RDX': 0x2, 'NVMM_X64_GPR_RBX': 0x3,
    'NVMM_X64_GPR_RSP': 0x4, 'NVMM_X64_GPR_RBP': 0x5, 'NVMM_X64_GPR_RSI': 0x6, 'NVMM_X64_GPR_RDI': 0x7,
    'NVMM_X64_GPR_R8': 0x8, 'NVMM_X64_GPR_R9': 0x9, 'NVMM_X64_GPR_R10': 0xa, 'NVMM_X64_GPR_R11': 0xb,
    'NVMM_X64_GPR_R12': 0xc, 'NVMM_X64_GPR_R13': 0xd, 'NVMM_X64_GPR_R14': 0xe, 'NVMM_X64_GPR_R15': 0xf,
    'NVMM_X64_GPR_RIP': 0x10, 'NVMM_X64_GPR_RFLAGS': 0x11, 'NVMM_X64_NGPR': 0x12, 'NVMM_X64_CR_CR0': 0x0,
    'NVMM_X64_CR_CR2': 0x1, 'NVMM_X64_CR_CR3': 0x2, 'NVMM_X64_CR_CR4': 0x3, 'NVMM_X64_CR_CR8': 0x4,
    'NVMM_X64_CR_XCR0': 0x5, 'NVMM_X64_NCR': 0x6, 'NVMM_X64_DR_DR0': 0x0, 'NVMM_X64_DR_DR1': 0x1,
    'NVMM_X64_DR_DR2': 0x2, 'NVMM_X64_DR_DR3': 0x3, 'NVMM_X64_DR_DR6': 0x4, 'NVMM_X64_DR_DR7': 0x5,
    'NVMM_X64_NDR': 0x6, 'NVMM_X64_MSR_EFER': 0x0, 'NVMM_X64_MSR_STAR': 0x1, 'NVMM_X64_MSR_LSTAR': 0x2,
    'NVMM_X64_MSR_CSTAR': 0x3, 'NVMM_X64_MSR_SFMASK': 0x4, 'NVMM_X64_MSR_KERNELGSBASE': 0x5,
    'NVMM_X64_MSR_SYSENTER_CS': 0x6, 'NVMM_X64_MSR_SYSENTER_ESP': 0x7, 'NVMM_X64_MSR_SYSENTER_EIP': 0x8,
    'NVMM_X64_MSR_PAT': 0x9, 'NVMM_X64_MSR_TSC': 0xa, 'NVMM_X64_NMSR': 0xb, 'NVMM_X64_STATE_SEGS': 0x1,
    'NVMM_X64_STATE_GPRS': 0x2, 'NVMM_X64_STATE_CRS': 0x4, 'NVMM_X64_STATE_DRS': 0x8, 'NVMM_X64_STATE_MSRS': 0x10,
    'NVMM_X64_STATE_INTR': 0x20, 'NVMM_X64_STATE_FPU': 0x40, 'NVMM_X64_STATE_ALL': 0x7f,
    'NVMM_MACH_CONF_LIBNVMM_BEGIN': 0x0, 'NVMM_MACH_CONF_MI_BEGIN': 0x64, 'NVMM_MACH_CONF_MD_BEGIN': 0xc8,
    'NVMM_VCPU_CONF_LIBNVMM_BEGIN': 0x0, 'NVMM_VCPU_CONF_MI_BEGIN': 0x64, 'NVMM_VCPU_CONF_MD_BEGIN': 0xc8,
    'NVMM_VCPU_CONF_CPUID': 0xc8, 'NVMM_VCPU_CONF_TPR': 0xc9, 'NVMM_VCPU_CONF_CALLBACKS': 0x0,
    'NVMM_VCPU_CONF_MD(NVMM_VCPU_CONF_CPUID)': 0x0, 'NVMM_VCPU_CONF_MD(NVMM_VCPU_CONF_TPR)': 0x1,
    'NVMM_PROT_READ': 0x1, 'NVMM_PROT_WRITE': 0x2, 'NVMM_PROT_EXEC': 0x4, 'NVMM_PROT_USER': 0x8,
    'NVMM_PROT_ALL': 0xf, 'NVMM_CTL_MACH_INFO': 0x0, 'NVMM_COMM_OFF(0, 0)': 0x0, 'NVMM_COMM_OFF(1, 0)': 0x100000,
    'NVMM_COMM_OFF(0, 1)': 0x1000, 'NVMM_COMM_OFF(255, 255)': 0xffff000, 'NVMM_IOC_CAPABILITY': 0x40684e00,
    'NVMM_IOC_MACHINE_CREATE': 0xc0044e01, 'NVMM_IOC_MACHINE_DESTROY': 0x80044e02,
    'NVMM_IOC_MACHINE_CONFIGURE': 0x80184e03, 'NVMM_IOC_VCPU_CREATE': 0x80084e04,
    'NVMM_IOC_VCPU_DESTROY': 0x80084e05, 'NVMM_IOC_VCPU_CONFIGURE': 0x80184e06, 'NVMM_IOC_VCPU_SETSTATE': 0x80084e07,
    'NVMM_IOC_VCPU_GETSTATE': 0x80084e08, 'NVMM_IOC_VCPU_INJECT': 0x80084e09, 'NVMM_IOC_VCPU_RUN': 0xc0484e0a,
    'NVMM_IOC_GPA_MAP': 0x80284e0b, 'NVMM_IOC_GPA_UNMAP': 0x80184e0c, 'NVMM_IOC_HVA_MAP': 0x80204e0d,
    'NVMM_IOC_HVA_UNMAP': 0x80204e0e, 'NVMM_IOC_CTL': 0x80184e14, '__INITIAL_NPXCW__': 0x37f,
    '__INITIAL_MXCSR__': 0x1f80, '__INITIAL_MXCSR_MASK__': 0xffbf,
}

#: The anonymous members (nvmm-abi.md, "Anonymous members"): (C type, path, size, align).
ANONYMOUS = [
    ("struct nvmm_x86_exit", "u", 32, 8),
    ("struct nvmm_x86_exit", "exitstate", 24, 8),
    ("struct nvmm_x64_state_seg", "attrib", 2, 2),
]

#: Constants of the tables that ``ops/nvmm/constants.py`` does not carry: macro results checked below, ioctl
#: numbers checked against the ioctl argument sizes, and values libnvmm or the kernel own (COMM_OFF, FPU defaults).
NOT_IN_CONSTANTS = re.compile(r"NVMM_VCPU_CONF_MD\(|NVMM_COMM_OFF\(|NVMM_IOC_|__INITIAL_")
