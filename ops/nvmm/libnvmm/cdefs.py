"""cffi declarations of libnvmm user version 2 (NetBSD 10) for ABI mode.

Follows the NetBSD 10 NVMM user ABI on amd64 as measured in ``shared/reference/nvmm-abi.md``: ``struct
nvmm_x64_state``, ``nvmm_x86_exit``, ``nvmm_x86_event``, ``nvmm_capability`` and the vCPU confs of
``sys/dev/nvmm/x86/nvmm_x86.h`` 1.21, ``struct nvmm_comm_page`` of ``sys/dev/nvmm/nvmm.h`` 1.16, ``struct fxsave``
of ``x86/cpu_extended_state.h``, and ``nvmm_machine``, ``nvmm_vcpu``, ``nvmm_io``, ``nvmm_mem`` and the functions of
``lib/libnvmm/nvmm.h`` 1.19. The text below was written from those tables (field, offset, size, type), not taken
from NetBSD's headers; ``tests/unit/test_libnvmm_abi.py`` pins every size, offset and bitfield to the tables.

Alignment attributes cffi's C parser cannot read, and how each one is still matched exactly:

* ``union fp_addr`` is ``__packed __aligned(4)`` (size 8, align 4): declared in a ``pack=4`` cdef.
* ``struct fpacc87`` is ``__packed`` with align 2 (size 10): declared in a ``pack=2`` cdef.
* ``struct fpaccfx`` holds an ``fpacc87`` carrying ``__aligned(16)``. Here the member shares an anonymous union with
  a ``long double``, whose psABI alignment on x86-64 is 16 and size 16 (NetBSD/amd64 and Linux alike; the x87
  80-bit value is the union's first 10 bytes either way). So ``struct fpaccfx`` is 16 bytes, aligned 16; ``struct
  fxsave`` and ``struct nvmm_x64_state`` are aligned 16, and ``nvmm_comm_page.state`` lands at 32 (8 bytes of
  padding after ``state_commit``) with the later fields at 1040/1048/1064 and size 1072, as measured. The test
  checks those offsets and ``ffi.alignof``; the provider checks them again before it touches a comm page.

``FFI()`` here only parses declarations: building it needs neither a compiler nor libnvmm; ``dlopen`` happens in
``provider.py`` when a provider is opened.

Not supported: ``nvmm_ctl``/``nvmm_root_init`` and ``struct nvmm_ctl_mach_info``'s use (declared for the layout
tests only), ``nvmm_vcpu_dump``, and user version 1 (NetBSD 9: ``nvmm_vcpu`` without ``stop``) or the version-3
forks.
"""

from cffi import FFI

#: ``union fp_addr`` (``__packed __aligned(4)``): cdef'd with ``pack=4``.
CDEF_PACK4 = """
union fp_addr {
    uint64_t fa_64;
    struct {
        uint32_t fa_off;
        uint16_t fa_seg;
        uint16_t fa_opcode;
    } fa_32;
};
"""

#: ``struct fpacc87`` (``__packed``, 10 bytes, align 2): cdef'd with ``pack=2``.
CDEF_PACK2 = """
struct fpacc87 {
    uint64_t f87_mantissa;
    uint16_t f87_exp_sign;
};
"""

#: Everything else, in the psABI's natural layout.
CDEF = """
typedef uint64_t gpaddr_t;
typedef uint64_t gvaddr_t;
typedef uint32_t nvmm_machid_t;
typedef uint32_t nvmm_cpuid_t;
typedef uint64_t nvmm_prot_t;

/* -- FPU area: 512-byte FXSAVE image, 16-aligned ------------------------------------------------------------ */
struct fpaccfx {
    union {
        struct fpacc87 r;
        long double __align16;      /* stands for r's __aligned(16): size 16, align 16 on x86-64 */
    };
};
struct xmmreg {
    uint8_t xmm_bytes[16];
};
struct fxsave {
    uint16_t fx_cw;
    uint16_t fx_sw;
    uint8_t fx_tw;
    uint8_t fx_zero;
    uint16_t fx_opcode;
    union fp_addr fx_ip;
    union fp_addr fx_dp;
    uint32_t fx_mxcsr;
    uint32_t fx_mxcsr_mask;
    struct fpaccfx fx_87_ac[8];
    struct xmmreg fx_xmm[16];
    uint8_t fx_rsvd[96];
};

/* -- vCPU state ------------------------------------------------------------------------------------------------ */
struct nvmm_x64_state_seg {
    uint16_t selector;
    struct {
        uint16_t type:4;
        uint16_t s:1;
        uint16_t dpl:2;
        uint16_t p:1;
        uint16_t avl:1;
        uint16_t l:1;
        uint16_t def:1;
        uint16_t g:1;
        uint16_t rsvd:4;
    } attrib;
    uint32_t limit;
    uint64_t base;
};
struct nvmm_x64_state_intr {
    uint64_t int_shadow:1;
    uint64_t int_window_exiting:1;
    uint64_t nmi_window_exiting:1;
    uint64_t evt_pending:1;
    uint64_t rsvd:60;
};
struct nvmm_x64_state {
    struct nvmm_x64_state_seg segs[10];
    uint64_t gprs[18];
    uint64_t crs[6];
    uint64_t drs[6];
    uint64_t msrs[11];
    struct nvmm_x64_state_intr intr;
    struct fxsave fpu;
};

/* -- exits --------------------------------------------------------------------------------------------------- */
struct nvmm_x86_exit_memory {
    int prot;
    gpaddr_t gpa;
    uint8_t inst_len;
    uint8_t inst_bytes[15];
};
struct nvmm_x86_exit_io {
    bool in;
    uint16_t port;
    int8_t seg;
    uint8_t address_size;
    uint8_t operand_size;
    bool rep;
    bool str;
    uint64_t npc;
};
struct nvmm_x86_exit_rdmsr {
    uint32_t msr;
    uint64_t npc;
};
struct nvmm_x86_exit_wrmsr {
    uint32_t msr;
    uint64_t val;
    uint64_t npc;
};
struct nvmm_x86_exit_insn {
    uint64_t npc;
};
struct nvmm_x86_exit_invalid {
    uint64_t hwcode;
};
struct nvmm_x86_exit {
    uint64_t reason;
    union {
        struct nvmm_x86_exit_memory mem;
        struct nvmm_x86_exit_io io;
        struct nvmm_x86_exit_rdmsr rdmsr;
        struct nvmm_x86_exit_wrmsr wrmsr;
        struct nvmm_x86_exit_insn insn;
        struct nvmm_x86_exit_invalid inv;
    } u;
    struct {
        uint64_t rflags;
        uint64_t cr8;
        uint64_t int_shadow:1;
        uint64_t int_window_exiting:1;
        uint64_t nmi_window_exiting:1;
        uint64_t evt_pending:1;
        uint64_t rsvd:60;
    } exitstate;
};

/* -- event --------------------------------------------------------------------------------------------------- */
struct nvmm_x86_event {
    unsigned int type;
    uint8_t vector;
    union {
        struct {
            uint64_t error;
        } excp;
    } u;
};

/* -- capability ---------------------------------------------------------------------------------------------- */
struct nvmm_cap_md {
    uint64_t mach_conf_support;
    uint64_t vcpu_conf_support;
    uint64_t xcr0_mask;
    uint32_t mxcsr_mask;
    uint32_t conf_cpuid_maxops;
    uint64_t rsvd[6];
};
struct nvmm_capability {
    uint32_t version;
    uint32_t state_size;
    uint32_t max_machines;
    uint32_t max_vcpus;
    uint64_t max_ram;
    struct nvmm_cap_md arch;
};

/* -- vCPU configuration -------------------------------------------------------------------------------------- */
struct nvmm_vcpu_conf_cpuid {
    uint32_t mask:1;
    uint32_t exit:1;
    uint32_t rsvd:30;
    uint32_t leaf;
    union {
        struct {
            struct { uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; } set;
            struct { uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; } del;
        } mask;
    } u;
};
struct nvmm_vcpu_conf_tpr {
    uint32_t exit_changed:1;
    uint32_t rsvd:31;
};

/* -- comm page (one per vCPU, mmap'd from /dev/nvmm by libnvmm) ---------------------------------------------- */
struct nvmm_comm_page {
    uint64_t state_wanted;
    uint64_t state_cached;
    uint64_t state_commit;
    struct nvmm_x64_state state;    /* aligned 16: offset 32 */
    bool event_commit;
    struct nvmm_x86_event event;
    volatile int stop;
};

/* -- libnvmm ------------------------------------------------------------------------------------------------- */
struct nvmm_io;
struct nvmm_mem;
struct nvmm_assist_callbacks {
    void (*io)(struct nvmm_io *);
    void (*mem)(struct nvmm_mem *);
};
struct nvmm_machine {
    nvmm_machid_t machid;
    struct nvmm_comm_page **pages;
    void *areas;
};
struct nvmm_vcpu {
    nvmm_cpuid_t cpuid;
    struct nvmm_assist_callbacks cbs;
    struct nvmm_x64_state *state;
    struct nvmm_x86_event *event;
    struct nvmm_x86_exit *exit;
    volatile int *stop;
};
struct nvmm_io {
    struct nvmm_machine *mach;
    struct nvmm_vcpu *vcpu;
    uint16_t port;
    bool in;
    size_t size;
    uint8_t *data;
};
struct nvmm_mem {
    struct nvmm_machine *mach;
    struct nvmm_vcpu *vcpu;
    gpaddr_t gpa;
    bool write;
    size_t size;
    uint8_t *data;
};

int nvmm_init(void);
int nvmm_capability(struct nvmm_capability *);
int nvmm_machine_create(struct nvmm_machine *);
int nvmm_machine_destroy(struct nvmm_machine *);
int nvmm_machine_configure(struct nvmm_machine *, uint64_t, void *);
int nvmm_vcpu_create(struct nvmm_machine *, nvmm_cpuid_t, struct nvmm_vcpu *);
int nvmm_vcpu_destroy(struct nvmm_machine *, struct nvmm_vcpu *);
int nvmm_vcpu_configure(struct nvmm_machine *, struct nvmm_vcpu *, uint64_t, void *);
int nvmm_vcpu_setstate(struct nvmm_machine *, struct nvmm_vcpu *, uint64_t);
int nvmm_vcpu_getstate(struct nvmm_machine *, struct nvmm_vcpu *, uint64_t);
int nvmm_vcpu_inject(struct nvmm_machine *, struct nvmm_vcpu *);
int nvmm_vcpu_run(struct nvmm_machine *, struct nvmm_vcpu *);
int nvmm_vcpu_stop(struct nvmm_vcpu *);
int nvmm_gpa_map(struct nvmm_machine *, uintptr_t, gpaddr_t, size_t, int);
int nvmm_gpa_unmap(struct nvmm_machine *, uintptr_t, gpaddr_t, size_t);
int nvmm_hva_map(struct nvmm_machine *, uintptr_t, size_t);
int nvmm_hva_unmap(struct nvmm_machine *, uintptr_t, size_t);
int nvmm_gva_to_gpa(struct nvmm_machine *, struct nvmm_vcpu *, gvaddr_t, gpaddr_t *, nvmm_prot_t *);
int nvmm_gpa_to_hva(struct nvmm_machine *, gpaddr_t, uintptr_t *, nvmm_prot_t *);
int nvmm_assist_io(struct nvmm_machine *, struct nvmm_vcpu *);
int nvmm_assist_mem(struct nvmm_machine *, struct nvmm_vcpu *);
"""

#: The kernel's ioctl arguments (``nvmm_ioctl.h``), declared only so the tests can pin them against the ioctl
#: numbers (whose length field is their size); the provider never issues an ioctl itself.
CDEF_IOCTL = """
struct nvmm_ioc_capability { struct nvmm_capability cap; };
struct nvmm_ioc_machine_create { nvmm_machid_t machid; };
struct nvmm_ioc_machine_destroy { nvmm_machid_t machid; };
struct nvmm_ioc_machine_configure { nvmm_machid_t machid; uint64_t op; void *conf; };
struct nvmm_ioc_vcpu_create { nvmm_machid_t machid; nvmm_cpuid_t cpuid; };
struct nvmm_ioc_vcpu_destroy { nvmm_machid_t machid; nvmm_cpuid_t cpuid; };
struct nvmm_ioc_vcpu_configure { nvmm_machid_t machid; nvmm_cpuid_t cpuid; uint64_t op; void *conf; };
struct nvmm_ioc_vcpu_setstate { nvmm_machid_t machid; nvmm_cpuid_t cpuid; };
struct nvmm_ioc_vcpu_getstate { nvmm_machid_t machid; nvmm_cpuid_t cpuid; };
struct nvmm_ioc_vcpu_inject { nvmm_machid_t machid; nvmm_cpuid_t cpuid; };
struct nvmm_ioc_vcpu_run { nvmm_machid_t machid; nvmm_cpuid_t cpuid; struct nvmm_x86_exit exit; };
struct nvmm_ioc_hva_map { nvmm_machid_t machid; uintptr_t hva; size_t size; int flags; };
struct nvmm_ioc_hva_unmap { nvmm_machid_t machid; uintptr_t hva; size_t size; int flags; };
struct nvmm_ioc_gpa_map { nvmm_machid_t machid; uintptr_t hva; gpaddr_t gpa; size_t size; int prot; };
struct nvmm_ioc_gpa_unmap { nvmm_machid_t machid; gpaddr_t gpa; size_t size; };
struct nvmm_ctl_mach_info {
    nvmm_machid_t machid;
    uint32_t nvcpus;
    uint64_t nram;
    int32_t pid;        /* pid_t: __int32_t on NetBSD */
    int64_t time;       /* time_t: __int64_t on NetBSD */
};
struct nvmm_ioc_ctl { int op; void *data; size_t size; };
"""


def make_ffi():
    """A fresh ``FFI`` holding every declaration above (no compiler, no library needed)."""
    ffi = FFI()
    ffi.cdef(CDEF_PACK4, pack=4)
    ffi.cdef(CDEF_PACK2, pack=2)
    ffi.cdef(CDEF)
    ffi.cdef(CDEF_IOCTL)
    return ffi


#: The shared declarations; ``provider.py`` dlopens libnvmm through it.
ffi = make_ffi()

#: Library names tried by ``dlopen``, in order (base system's ``/usr/lib/libnvmm.so`` first).
LIBNAMES = ("libnvmm.so", "libnvmm.so.0")
