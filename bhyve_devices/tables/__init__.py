"""Firmware tables built in Python: ACPI (:mod:`.acpi`, DSDT AML from :mod:`.aml` / :mod:`.dsdt`) and the
Intel MultiProcessor table (:mod:`.mptable`), placed as bhyve's ``acpitbl.c`` and ``mptbl.c`` place them."""
