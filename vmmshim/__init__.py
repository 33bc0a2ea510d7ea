"""vmmshim: the VM, loaders and command line above the vmm_ops table."""
