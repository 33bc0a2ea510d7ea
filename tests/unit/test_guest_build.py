"""The default guest's initramfs (vmmshim/lab/guest.py): Debian's dmidecode and the libc6 files it needs."""

import gzip
import os
import pathlib
import posixpath
import stat

import pytest

from vmmshim.lab import guest

LIBS = ("lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
INTERP = "lib64/ld-linux-x86-64.so.2"


def _built_initramfs():
    for d in (os.environ.get("VMMSHIM_GUEST_DIR"), guest.guest_dir()):
        if d and (pathlib.Path(d) / "initramfs.gz").is_file():
            return pathlib.Path(d) / "initramfs.gz"
    return None


def _read_newc(data: bytes) -> dict:
    """``{name: (mode, bytes)}`` of a newc cpio (a symlink's bytes: its target)."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad newc magic at {pos}"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_package_list_has_dmidecode_and_its_libc():
    assert ("dmidecode", "usr/sbin/dmidecode") in guest.TOOLS
    assert "libc6" in guest.LIB_PKGS


def test_dmidecode_and_libc6_versions_are_in_the_cache_key(monkeypatch, tmp_path):
    """Their apt candidate versions go into inputs.json's key, like busybox-static's: a new one rebuilds."""
    versions = {"busybox-static": "1:1.35", "dmidecode": "3.4-1", "libc6": "2.36-9+deb12u14"}
    monkeypatch.setenv("VMMSHIM_CACHE", str(tmp_path))
    monkeypatch.setattr(guest, "kernel_package", lambda: ("linux-image-6.1.0-1-amd64", "6.1.1-1"))
    monkeypatch.setattr(guest, "_apt_show", lambda pkg: {"Version": versions[pkg]})
    keys = []

    class Stop(Exception):
        pass

    def fake_digest(*parts):
        keys.append(parts)
        raise Stop

    monkeypatch.setattr(guest, "digest", fake_digest)
    for libc in ("2.36-9+deb12u14", "2.36-9+deb12u15"):
        versions["libc6"] = libc
        with pytest.raises(Stop):
            guest.build_guest()
    assert "dmidecode=3.4-1 libc6=2.36-9+deb12u14" in keys[0]
    assert keys[0] != keys[1]


INITRAMFS = _built_initramfs()


@pytest.mark.skipif(INITRAMFS is None, reason="the default guest is not built (python3 -m vmmshim.lab guest)")
def test_built_initramfs_has_dmidecode_and_what_it_needs(tmp_path):
    files = _read_newc(gzip.decompress(INITRAMFS.read_bytes()))
    mode, body = files["usr/sbin/dmidecode"]
    assert stat.S_ISREG(mode) and mode & 0o111
    for lib in LIBS:
        assert stat.S_ISREG(files[lib][0]), lib
    mode, target = files[INTERP]
    if stat.S_ISLNK(mode):
        assert target == b"/" + LIBS[1].encode()
    for d in ("lib64", "lib/x86_64-linux-gnu", "usr/sbin"):
        assert stat.S_ISDIR(files[d][0]), d

    # every PT_INTERP and DT_NEEDED of the added files resolves inside the archive, nothing on the host
    def resolve(path):
        for _ in range(10):
            mode, body = files[path]
            if not stat.S_ISLNK(mode):
                return path
            t = body.decode()
            path = posixpath.normpath(t.lstrip("/") if t.startswith("/")
                                      else posixpath.join(posixpath.dirname(path), t))
        raise AssertionError(f"symlink loop at {path}")

    interp, needed = guest._elf_deps(files["usr/sbin/dmidecode"][1], "dmidecode")
    assert interp == "/" + INTERP and needed == ["libc.so.6"]
    for name in ("usr/sbin/dmidecode",) + LIBS:
        interp, needed = guest._elf_deps(files[name][1], name)
        if interp:
            assert resolve(interp.lstrip("/")) in files
        for lib in needed:
            assert any(f"{d}/{lib}" in files for d in guest.LIB_DIRS), f"{name} needs {lib}"

    # _tool_files finds the same closure when the archive's own tree stands in for the .debs
    for name, (mode, body) in files.items():
        p = tmp_path / name
        if stat.S_ISDIR(mode):
            p.mkdir(parents=True, exist_ok=True)
        elif name in ("usr/sbin/dmidecode", INTERP) + LIBS:
            p.parent.mkdir(parents=True, exist_ok=True)
            if stat.S_ISLNK(mode):
                p.symlink_to(body.decode())
            else:
                p.write_bytes(body)
                p.chmod(stat.S_IMODE(mode))
    got = guest._tool_files({"dmidecode": tmp_path}, {"libc6": tmp_path})
    assert sorted(got) == sorted(("usr/sbin/dmidecode", INTERP) + LIBS)
    assert got["usr/sbin/dmidecode"][1] == files["usr/sbin/dmidecode"][1]
