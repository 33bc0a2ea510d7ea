from bhyve_devices.debugexit import DebugExit, exit_status


def test_write_ends_with_qemu_status():
    got = []
    dev = DebugExit(got.append)
    dev.write(0, 4, 0)
    dev.write(0, 1, 5)
    assert got == [1], "only the first write ends the VM"
    assert exit_status(0x10) == 0x21 and exit_status(0x7F) == 0xFF and exit_status(0x80) == 1


def test_reads_all_ones():
    assert DebugExit(lambda s: None).read(0, 2) == 0xFFFF
