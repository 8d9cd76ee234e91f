"""EIF writer: golden bytes of a tiny image assembled independently with struct, CRC, PCRs, determinism."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest

from salmiac.eif.writer import (
    EifMetadata,
    build_epoch_from_env,
    kernel_config_info,
    write_eif,
)
from salmiac.errors import RequestError

KERNEL = b"MZ\x00fake-bzImage\xff" * 3
CMDLINE = "reboot=k panic=30 pci=off console=ttyS0"
RAMDISKS = [b"070701bootstrap-initrd", b"070701customer-initrd\x00\x01"]
METADATA = EifMetadata(
    image_name="tiny",
    image_version="1.0",
    build_epoch=1700000000,
    build_tool="salmiac",
    build_tool_version="0.1.0",
    docker_info={"b": 1, "a": [1, "x"], "é": None},
)
# Spec 1.5: compact serde_json, struct field order at the top, nested JSON objects with sorted keys.
METADATA_JSON = (
    b'{"ImageName":"tiny","ImageVersion":"1.0","BuildMetadata":{"BuildTime":"2023-11-14T22:13:20+00:00",'
    b'"BuildTool":"salmiac","BuildToolVersion":"0.1.0","OperatingSystem":"Unknown","KernelVersion":"Unknown"},'
    b'"DockerInfo":{"a":[1,"x"],"b":1,"\xc3\xa9":null},"CustomMetadata":null}'
)


def by_hand(content: bytes) -> bytes:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).digest()


def expected_eif(sections: list[tuple[int, bytes]]) -> bytes:
    """The file EifBuilder would write, assembled field by field from the spec's table."""
    offsets, body, position = [], b"", 548
    for section_type, data in sections:
        offsets.append(position)
        body += struct.pack(">HHQ", section_type, 0, len(data)) + data
        position += 12 + len(data)
    pad = [0] * (32 - len(sections))
    header = (
        b".eif"
        + struct.pack(">HHQQHH", 4, 0, 1 << 30, 2, 0, len(sections))
        + struct.pack(">32Q", *offsets, *pad)
        + struct.pack(">32Q", *(len(d) for _, d in sections), *pad)
        + struct.pack(">I", 0)
    )
    crc = zlib.crc32(header + body)
    return header + struct.pack(">I", crc) + body


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(KERNEL)
    ramdisks = []
    for i, data in enumerate(RAMDISKS):
        path = tmp_path / f"initrd{i}"
        path.write_bytes(data)
        ramdisks.append(path)
    return kernel, ramdisks


def write(dst: Path, inputs: tuple[Path, list[Path]], **kw: object) -> bytes:
    kernel, ramdisks = inputs
    args: dict[str, object] = {"kernel": kernel, "cmdline": CMDLINE, "ramdisks": ramdisks, "metadata": METADATA}
    args.update(kw)
    write_eif(dst, **args)  # type: ignore[arg-type]
    return dst.read_bytes()


def test_metadata_json_exact() -> None:
    assert METADATA.to_json_bytes() == METADATA_JSON


def test_golden_bytes(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    dst = tmp_path / "out.eif"
    kernel, ramdisks = inputs
    info = write_eif(dst, kernel=kernel, cmdline=CMDLINE, ramdisks=ramdisks, metadata=METADATA)
    data = dst.read_bytes()
    assert data == expected_eif(
        [(1, KERNEL), (2, CMDLINE.encode()), (5, METADATA_JSON), (3, RAMDISKS[0]), (3, RAMDISKS[1])]
    )
    # The header by hand: 5 sections, contiguous from 548, sizes are data sizes.
    assert struct.unpack_from(">H", data, 0x1A) == (5,)
    k, c, m = len(KERNEL), len(CMDLINE), len(METADATA_JSON)
    assert struct.unpack_from(">5Q", data, 0x1C) == (
        548,
        548 + 12 + k,
        548 + 24 + k + c,
        548 + 36 + k + c + m,
        548 + 48 + k + c + m + len(RAMDISKS[0]),
    )
    assert struct.unpack_from(">5Q", data, 0x11C) == (k, c, m, len(RAMDISKS[0]), len(RAMDISKS[1]))
    assert data[548:560] == struct.pack(">HHQ", 1, 0, k)
    # CRC: zlib.crc32 over the file without bytes 544..547.
    assert struct.unpack_from(">I", data, 544) == (zlib.crc32(data[:544] + data[548:]),)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.path == dst
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644


def test_pcrs_by_hand(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    kernel, ramdisks = inputs
    info = write_eif(tmp_path / "x.eif", kernel=kernel, cmdline=CMDLINE, ramdisks=ramdisks, metadata=METADATA)
    c = CMDLINE.encode()
    assert info.pcrs.pcr0 == by_hand(KERNEL + c + RAMDISKS[0] + RAMDISKS[1])
    assert info.pcrs.pcr1 == by_hand(KERNEL + c + RAMDISKS[0])
    assert info.pcrs.pcr2 == by_hand(RAMDISKS[1])
    assert info.pcrs.pcr8 is None


def test_single_ramdisk_pcr2(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    kernel, ramdisks = inputs
    info = write_eif(tmp_path / "x.eif", kernel=kernel, cmdline=CMDLINE, ramdisks=ramdisks[:1], metadata=METADATA)
    assert info.pcrs.pcr2.hex() == (
        "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a"
    )


def test_deterministic(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    first = write(tmp_path / "a.eif", inputs)
    second = write(tmp_path / "b.eif", inputs)
    assert first == second
    other = write(tmp_path / "c.eif", inputs, metadata=EifMetadata(image_name="tiny", image_version="1.0"))
    assert other != first
    assert b'"BuildTime":"1970-01-01T00:00:00+00:00"' in other


def test_aarch64_flag(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    data = write(tmp_path / "arm.eif", inputs, arch="aarch64")
    assert struct.unpack_from(">H", data, 6) == (1,)


def test_unknown_arch(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    with pytest.raises(RequestError, match="architecture"):
        write(tmp_path / "x.eif", inputs, arch="riscv64")


def test_build_epoch_from_env() -> None:
    assert build_epoch_from_env({}) == 0
    assert build_epoch_from_env({"SOURCE_DATE_EPOCH": ""}) == 0
    assert build_epoch_from_env({"SOURCE_DATE_EPOCH": "1700000000"}) == 1700000000
    for bad in ("-1", "1.5", "abc", "1" * 5000, "99999999999999", "١٢"):
        with pytest.raises(RequestError, match="SOURCE_DATE_EPOCH"):
            build_epoch_from_env({"SOURCE_DATE_EPOCH": bad})


def test_kernel_config_line_three(tmp_path: Path) -> None:
    config = tmp_path / "bzImage.config"
    config.write_text(
        "#\n# Automatically generated file; DO NOT EDIT.\n"
        "# Linux/x86_64 4.14.177-104.253.amzn2.x86_64 Kernel Configuration\n#\nCONFIG_X=y\n"
    )
    assert kernel_config_info(config) == ("Linux", "4.14.177")
    meta = METADATA.with_kernel_config(config)
    assert (meta.operating_system, meta.kernel_version) == ("Linux", "4.14.177")
    assert b'"OperatingSystem":"Linux","KernelVersion":"4.14.177"}' in meta.to_json_bytes()
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(KERNEL)
    ramdisk = tmp_path / "initrd"
    ramdisk.write_bytes(b"r")
    dst = tmp_path / "x.eif"
    write_eif(dst, kernel=kernel, cmdline="c", ramdisks=[ramdisk], metadata=METADATA, kernel_config=config)
    assert b'"OperatingSystem":"Linux","KernelVersion":"4.14.177"}' in dst.read_bytes()
    config.write_text("#\n#\nweird\n")
    assert kernel_config_info(config) == ("Unknown", "Unknown")
    config.write_text("#\n")
    with pytest.raises(RequestError, match="fewer than 3 lines"):
        kernel_config_info(config)
    with pytest.raises(RequestError, match="missing"):
        kernel_config_info(tmp_path / "missing")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # Line 3 of nitro-cli's blobs/x86_64/bzImage.config and blobs/aarch64/Image.config (v1.5.0).
        ("# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel Configuration", ("Linux", "4.14.256")),
        ("# Linux/arm64 4.14.256-209.484.amzn2.aarch64 Kernel Configuration", ("Linux", "4.14.256")),
        # Line 3 of Debian's linux-image-6.12.*-cloud-amd64 config (our enclave kernel).
        ("# Linux/x86 6.12.118 Kernel Configuration", ("Linux", "6.12.118")),
    ],
)
def test_kernel_config_real_lines(tmp_path: Path, line: str, expected: tuple[str, str]) -> None:
    config = tmp_path / "config"
    config.write_text(f"#\n# Automatically generated file; DO NOT EDIT.\n{line}\n#\n")
    assert kernel_config_info(config) == expected


def test_metadata_rejects_bad_values() -> None:
    with pytest.raises(RequestError, match="custom metadata"):
        EifMetadata(image_name="x", image_version="1", custom_metadata={"k": "v" * 5000})
    with pytest.raises(RequestError, match="JSON"):
        EifMetadata(image_name="x", image_version="1", custom_metadata=float("nan"))
    with pytest.raises(RequestError, match="Unicode"):
        EifMetadata(image_name="\udc80", image_version="1").to_json_bytes()
    with pytest.raises(RequestError, match="build time"):
        EifMetadata(image_name="x", image_version="1", build_epoch=-1)


@pytest.mark.parametrize("cmdline", ["a\0b", "a\nb", "é", "x" * 4097])
def test_bad_cmdline(tmp_path: Path, inputs: tuple[Path, list[Path]], cmdline: str) -> None:
    with pytest.raises(RequestError, match="command line"):
        write(tmp_path / "x.eif", inputs, cmdline=cmdline)
    assert list(tmp_path.glob("*.eif*")) == []


def test_bad_inputs_leave_nothing(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    _, ramdisks = inputs
    dst = tmp_path / "x.eif"
    with pytest.raises(RequestError, match=r"1\.\.29 ramdisks"):
        write(dst, inputs, ramdisks=[])
    with pytest.raises(RequestError, match=r"1\.\.29 ramdisks"):
        write(dst, inputs, ramdisks=ramdisks * 15)
    with pytest.raises(RequestError, match=r"ramdisk .*nope"):
        write(dst, inputs, ramdisks=[tmp_path / "nope"])
    with pytest.raises(RequestError, match="not a regular file"):
        write(dst, inputs, ramdisks=[tmp_path])
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(RequestError, match="empty"):
        write(dst, inputs, kernel=empty)
    with pytest.raises(RequestError, match="output"):
        write(tmp_path / "no-such-dir" / "x.eif", inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bzImage", "empty", "initrd0", "initrd1"]


def test_failure_keeps_previous_file(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    dst = tmp_path / "x.eif"
    dst.write_bytes(b"previous")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RequestError):
        write(dst, inputs, ramdisks=[fifo])
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_ramdisk_allowed(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    data = write(tmp_path / "x.eif", inputs, ramdisks=[empty])
    assert data.endswith(struct.pack(">HHQ", 3, 0, 0))


def test_ramdisk_is_streamed_not_loaded(tmp_path: Path, inputs: tuple[Path, list[Path]]) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    kernel, _ = inputs
    tracemalloc.start()
    try:
        info = write_eif(tmp_path / "big.eif", kernel=kernel, cmdline=CMDLINE, ramdisks=[big], metadata=METADATA)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == 548 + 4 * 12 + len(KERNEL) + len(CMDLINE) + len(METADATA_JSON) + (64 << 20)
    assert peak < 8 << 20, f"peak Python allocation {peak} bytes while writing a 64 MiB ramdisk"
