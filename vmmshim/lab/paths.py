"""Where the lab keeps what it builds: always outside the clone."""

import hashlib
import os
import pathlib
import re

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def cache_dir() -> pathlib.Path:
    """``$VMMSHIM_CACHE``, else ``~/.cache/vmmshim``."""
    env = os.environ.get("VMMSHIM_CACHE")
    base = pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "vmmshim"
    return base


def digest(*parts) -> str:
    """A short, stable hash of the inputs of a build."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode()
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _deb822_uris(text: str):
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []):
            for uri in fields.get("uris", []):
                yield uri, fields.get("suites", [])


def _oneline_uris(text: str):
    for line in text.splitlines():
        line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            yield line[1], [line[2]]


def apt_mirror(suite: str = "bookworm") -> str:
    """The Debian mirror this machine's apt already uses for ``suite`` (``$VMMSHIM_LAB_MIRROR`` wins)."""
    env = os.environ.get("VMMSHIM_LAB_MIRROR")
    if env:
        return env
    files = [pathlib.Path("/etc/apt/sources.list")]
    d = pathlib.Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.iterdir())
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        entries = _deb822_uris(text) if f.suffix == ".sources" else _oneline_uris(text)
        for uri, suites in entries:
            if suite in suites:
                return uri.rstrip("/")
    return "http://deb.debian.org/debian"
