"""bhyve's ``pci_hostbridge.c``: the ``hostbridge`` and ``amd_hostbridge`` emulations (no BARs, no interrupts).

PCI Local Bus 3.0 chapter 6 (type-0 header, class 06h subclass 00h "host bridge", appendix D) and PCI Express
Base 3.x section 7.8 (the PCI Express capability, ID 0x10). As bhyve: vendor/device 0x1275/0x1275 (NetApp) for
``hostbridge``, 0x1022/0x7432 (AMD) for ``amd_hostbridge``, and a version-2 PCI Express capability of port type
"root port" with a Gen1 x1 link (bhyve's ``pci_emul_add_pciecap(pi, PCIEM_TYPE_ROOT_PORT)``). The capability is
read-only.

Not supported: any host-bridge register (DRAM control, PAM, SMRAM): there is nothing behind them; writable PCIe
control fields.
"""

from construct import Int8ul, Int16ul, Int32ul, Struct

from bhyve_devices.pci.device import PciDevice
from bhyve_devices.pci.registry import register

CAP_ID_PCIE = 0x10
PCIE_CAP_VERSION = 2
PCIE_TYPE_ROOT_PORT = 0x4

PCIE_CAP = Struct(
    "cap_id" / Int8ul, "next" / Int8ul, "pcie_capabilities" / Int16ul,
    "dev_capabilities" / Int32ul, "dev_control" / Int16ul, "dev_status" / Int16ul,
    "link_capabilities" / Int32ul, "link_control" / Int16ul, "link_status" / Int16ul,
    "slot_capabilities" / Int32ul, "slot_control" / Int16ul, "slot_status" / Int16ul,
    "root_control" / Int16ul, "root_capabilities" / Int16ul, "root_status" / Int32ul,
    "dev_capabilities2" / Int32ul, "dev_control2" / Int16ul, "dev_status2" / Int16ul,
    "link_capabilities2" / Int32ul, "link_control2" / Int16ul, "link_status2" / Int16ul,
    "slot_capabilities2" / Int32ul, "slot_control2" / Int16ul, "slot_status2" / Int16ul,
)
"""The PCI Express capability structure as bhyve's ``struct pciecap`` (60 bytes)."""


def pcie_root_port_cap():
    return PCIE_CAP.build(dict(
        cap_id=CAP_ID_PCIE, next=0, pcie_capabilities=PCIE_CAP_VERSION | (PCIE_TYPE_ROOT_PORT << 4),
        dev_capabilities=0, dev_control=0, dev_status=0, link_capabilities=0x411, link_control=0,
        link_status=0x11, slot_capabilities=0, slot_control=0, slot_status=0, root_control=0,
        root_capabilities=0, root_status=0, dev_capabilities2=0, dev_control2=0, dev_status2=0,
        link_capabilities2=0, link_control2=0, link_status2=0, slot_capabilities2=0, slot_control2=0,
        slot_status2=0))


@register("hostbridge")
class Hostbridge(PciDevice):
    VENDOR = 0x1275
    DEVICE = 0x1275

    def __init__(self, opts=None):
        opts = opts or {}
        super().__init__(self.emul_name, int(opts.get("vendor", self.VENDOR)), int(opts.get("devid", self.DEVICE)),
                         0x06, 0x00)
        self.add_capability(pcie_root_port_cap())


@register("amd_hostbridge")
class AmdHostbridge(Hostbridge):
    VENDOR = 0x1022
    DEVICE = 0x7432
