"""One pass over a WebDataset tar's headers: where each sample's bytes lie, and a byte-copy writer.

Mining reads a few small fields (txt, json, sg.json, tags.json) and must write every other field
back unchanged. Going through tarfile + webdataset decodes every member into a dict and re-encodes
it on write: at a million samples that was a large share of the stage's time. Here we walk the
512-byte headers ourselves (tar is a flat list of header + data blocks), record for every sample
the byte range its members occupy and where each field's data is, and later copy those ranges
verbatim, appending one mine.json member per sample. Member names, modes, mtimes and data of the
input survive bit for bit.

Grouping follows webdataset's rules (tariterators.group_by_keys / base_plus_ext): the key is the
member path up to the first dot of its basename, consecutive members with one key are a sample,
extensions are lower-cased, `__*__` meta members and non-regular members belong to no sample.
"""

from __future__ import annotations

import gzip
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")
_REGULAR = (b"0", b"\0", b"7")
# webdataset's TarWriter defaults, so the added member looks like the ones it writes.
_MODE, _USER = 0o444, "bigdata"


class TarFormatError(ValueError):
    """The bytes are not a (complete) tar archive."""


@dataclass
class SampleIndex:
    """Where each sample of one tar lies: byte ranges, and each field's (offset, size)."""

    keys: list[str]
    start: np.ndarray  # int64: first header byte of the sample's first member
    end: np.ndarray  # int64: one past the last data block of its last member
    fields: list[dict[str, tuple[int, int, int]]]  # extension → (data offset, size, header at)
    data_end: int  # where the archive's members end (before the end-of-archive blocks)

    def field(self, data: bytes | memoryview, i: int, ext: str) -> bytes | None:
        where = self.fields[i].get(ext)
        return None if where is None else bytes(data[where[0] : where[0] + where[1]])


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes past 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(data: bytes | memoryview) -> Iterator[tuple[str, bytes, int, int, int]]:
    """(name, typeflag, header chain start, data offset, size) per member, then stops at the end."""
    total = len(data)
    pos = 0
    chain_start = None
    long_name: str | None = None
    pax: dict[str, str] = {}
    headers: list[int] = []
    while pos + BLOCK <= total:
        header = bytes(data[pos : pos + BLOCK])
        if header == _ZERO_BLOCK:
            break
        headers.append(pos)
        if len(headers) == 1:
            _check_sums(data, headers)  # not a tar at all: say so before parsing any further
        try:
            size = _octal(header[124:136])
        except ValueError as err:
            raise TarFormatError(f"bad header at byte {pos}") from err
        kind = header[156:157]
        if chain_start is None:
            chain_start = pos
        body = pos + BLOCK
        following = body + -(-size // BLOCK) * BLOCK
        if following > total:
            raise TarFormatError(f"member at byte {pos} runs past the end of the file")
        if kind in (b"L", b"x", b"g", b"K"):  # extended headers describe the next member
            payload = bytes(data[body : body + size])
            if kind == b"L":
                long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x" and (b"path=" in payload or b"size=" in payload):
                # Only path and size matter here; most pax headers carry just a float mtime
                # (webdataset's TarWriter writes one per member), so skip parsing those.
                pax.update(_pax_records(payload))
            pos = following
            if kind == b"g":
                chain_start = None
            continue
        name = _cstr(header[0:100])
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = _cstr(header[345:500]) + "/" + name
        name = pax.get("path", long_name or name)
        if "size" in pax:
            size = int(pax["size"])
            following = body + -(-size // BLOCK) * BLOCK
        yield name, kind, chain_start, body, size
        chain_start, long_name, pax = None, None, {}
        pos = following
    _check_sums(data, headers)


def _check_sums(data: bytes | memoryview, headers: list[int]) -> None:
    """Every header's checksum, in numpy (summing 512 bytes in Python per member was slow)."""
    # Headers start on 512-byte boundaries (every member is padded to whole blocks), so the
    # archive viewed as rows of 512 bytes has one header per chosen row: a row gather.
    raw = np.frombuffer(data, np.uint8, count=len(data) // BLOCK * BLOCK).reshape(-1, BLOCK)
    for lo in range(0, len(headers), 4096):
        starts = np.asarray(headers[lo : lo + 4096], np.int64)
        blocks = raw[starts // BLOCK]
        field = blocks[:, 148:156].astype(np.int64)
        computed = blocks.sum(axis=1, dtype=np.int64) - field.sum(axis=1) + 8 * 32
        # The stored sum is octal text; its digits alone give its value in every tar writer's
        # layout ("0001234\0 ", "  1234 \0"). Disagreements get tarfile's full rules below.
        digits = (field >= 48) & (field <= 55)
        stored = np.zeros(len(starts), np.int64)
        for k in range(8):
            stored = np.where(digits[:, k], stored * 8 + field[:, k] - 48, stored)
        for i in np.flatnonzero(stored != computed).tolist():
            header = bytes(data[int(starts[i]) : int(starts[i]) + BLOCK])
            signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
            if _octal(header[148:156]) not in (computed[i], signed):
                raise TarFormatError(f"bad header checksum at byte {int(starts[i])}")


def index_samples(data: bytes | memoryview) -> SampleIndex:
    """Index every sample of a tar held in memory (raises TarFormatError on a broken one)."""
    keys: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    fields: list[dict[str, tuple[int, int, int]]] = []
    data_end = 0
    current: str | None = None
    for name, kind, chain_start, body, size in _members(data):
        data_end = body + -(-size // BLOCK) * BLOCK
        if kind not in _REGULAR or _META.match(name):
            continue
        if "/" not in name and name.startswith("__") and name.endswith("__"):
            continue
        match = _KEY_EXT.match(name)
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if key != current:
            keys.append(key)
            starts.append(chain_start)
            ends.append(data_end)
            fields.append({})
            current = key
        if ext in fields[-1]:
            raise TarFormatError(f"{name}: duplicate file name in tar file")
        fields[-1][ext] = (body, size, chain_start)
        ends[-1] = data_end
    return SampleIndex(
        keys=keys,
        start=np.asarray(starts, np.int64),
        end=np.asarray(ends, np.int64),
        fields=fields,
        data_end=data_end,
    )


def unpack(raw: bytes) -> bytes:
    """A gzip-compressed shard is read like a plain one (tarfile's "r|*" did the same)."""
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def member_bytes(name: str, payload: bytes, mtime: float) -> bytes:
    """One tar member (header + data + padding) with webdataset TarWriter's mode and owner.

    A plain ustar header built here (tarfile's TarInfo.tobuf cost ~70 µs a member, one per
    sample); names that ustar cannot hold go through tarfile's pax path.
    """
    padding = b"\0" * (-len(payload) % BLOCK)
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), int(mtime), _MODE
        info.uname = info.gname = _USER
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + payload + padding
    header = bytearray(BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"%07o\0" % _MODE
    header[108:116] = header[116:124] = b"0000000\0"  # uid, gid
    header[124:136] = b"%011o\0" % len(payload)
    header[136:148] = b"%011o\0" % int(mtime)
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    user = _USER.encode()
    header[265 : 265 + len(user)] = user
    header[297 : 297 + len(user)] = user
    # devmajor and devminor stay NUL, as tarfile leaves them for regular files.
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + payload + padding


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to tarfile's 10 KiB record size (what tarfile writes)."""
    size = written + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-size % tarfile.RECORDSIZE))
