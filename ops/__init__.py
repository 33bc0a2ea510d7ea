"""vmmshim's CPU layer: bhyve's ``vmm_ops`` table (``ops.vmm_ops``) and the NVMM primitives it runs on
(``ops.nvmm``), with one provider per hypervisor under ``ops/nvmm/``."""
