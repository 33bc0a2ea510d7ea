"""x86 helpers shared by the providers: the guest page walk (``mmu``)."""
