"""Just enough ELF64 (little-endian) to assemble the base: DT_NEEDED/RUNPATH, PT_INTERP and named sections.

Used on files unpacked from Debian packages and on kernel modules; never executes them. Offsets and counts are
checked against the file size so a truncated or odd file is an ``ElfError``, never a wild read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_PT_INTERP = 3
_PT_DYNAMIC = 2
_DT_NULL = 0
_DT_NEEDED = 1
_DT_STRTAB = 5
_DT_RUNPATH = 29
_DT_RPATH = 15
_PT_LOAD = 1
_MAX_HEADERS = 4096


class ElfError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class DynamicInfo:
    interpreter: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def dynamic_info(data: bytes) -> DynamicInfo:
    """Interpreter, DT_NEEDED and DT_RUNPATH/RPATH of an executable or shared object (empty when static)."""
    phoff, phentsize, phnum = _header(data)[0:3]
    phdrs = [struct.unpack_from("<IIQQQQQQ", data, _bounded(data, phoff + i * phentsize, 56)) for i in range(phnum)]
    interp: str | None = None
    dynamic: tuple[int, int] | None = None
    for p_type, _flags, p_offset, _vaddr, _paddr, p_filesz, _memsz, _align in phdrs:
        if p_type == _PT_INTERP:
            _bounded(data, p_offset, p_filesz)
            interp = data[p_offset : p_offset + p_filesz].split(b"\0", 1)[0].decode()
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return DynamicInfo(interp, (), ())
    entries: list[tuple[int, int]] = []
    off, size = dynamic
    _bounded(data, off, size)
    for pos in range(off, off + size - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        entries.append((tag, val))
    strtab_vaddr = next((v for t, v in entries if t == _DT_STRTAB), None)
    if strtab_vaddr is None:
        raise ElfError("dynamic section without DT_STRTAB")
    strtab = _vaddr_to_offset(phdrs, strtab_vaddr, data)
    needed = tuple(_cstr(data, strtab + v) for t, v in entries if t == _DT_NEEDED)
    runpath: list[str] = []
    for t, v in entries:
        if t in (_DT_RUNPATH, _DT_RPATH):
            runpath.extend(p for p in _cstr(data, strtab + v).split(":") if p)
    return DynamicInfo(interp, needed, tuple(runpath))


def section(data: bytes, name: str) -> bytes | None:
    """The contents of the section called ``name`` (e.g. ".modinfo"), or None."""
    _phoff, _phentsize, _phnum, shoff, shentsize, shnum, shstrndx = _header(data)
    if shnum == 0:
        return None
    shdrs = [struct.unpack_from("<IIQQQQIIQQ", data, _bounded(data, shoff + i * shentsize, 64)) for i in range(shnum)]
    if shstrndx >= shnum:
        raise ElfError("section name table index out of range")
    names_off = shdrs[shstrndx][4]
    for sh_name, _type, _flags, _addr, sh_offset, sh_size, *_rest in shdrs:
        if _cstr(data, names_off + sh_name) == name:
            _bounded(data, sh_offset, sh_size)
            return data[sh_offset : sh_offset + sh_size]
    return None


def _header(data: bytes) -> tuple[int, int, int, int, int, int, int]:
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise ElfError("not an ELF file")
    if data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        raise ElfError("not a little-endian ELF64 file")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", data, 0x36)
    if phnum > _MAX_HEADERS or shnum > _MAX_HEADERS:
        raise ElfError("too many program or section headers")
    if (phnum and phentsize < 56) or (shnum and shentsize < 64):
        raise ElfError("header entries too small")
    return phoff, phentsize, phnum, shoff, shentsize, shnum, shstrndx


def _vaddr_to_offset(phdrs: list[tuple[int, ...]], vaddr: int, data: bytes) -> int:
    for p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz, *_rest in phdrs:
        if p_type == _PT_LOAD and p_vaddr <= vaddr < p_vaddr + p_filesz:
            return _bounded(data, p_offset + (vaddr - p_vaddr), 1)
    raise ElfError(f"address {vaddr:#x} is in no loaded segment")


def _bounded(data: bytes, offset: int, size: int) -> int:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise ElfError(f"range {offset}+{size} outside the file ({len(data)} bytes)")
    return offset


def _cstr(data: bytes, offset: int) -> str:
    _bounded(data, offset, 1)
    end = data.find(b"\0", offset)
    if end < 0:
        raise ElfError("unterminated string")
    return data[offset:end].decode()
