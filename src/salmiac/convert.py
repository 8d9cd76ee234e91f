"""The converter pipeline: input image → EIF (measured) → output image whose entrypoint is the parent runtime.

    source (any transport) ─► flatten layers ─► app ramdisk (rootfs/ + salmiac/app.json)
                                              └► or: squashfs + dm-verity tree (rootfs.img, beside the EIF),
                                                 its root hash in salmiac/app.json
    enclave base + our package ─► bootstrap ramdisk
    kernel + cmdline + ramdisks ─► EIF (PCR0/1/2) ─► bundle layer (/opt/salmiac) + parent layer ─► output image

Deterministic end to end: same input and same salmiac version give the same EIF bytes and PCRs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import salmiac
from salmiac.eif.writer import EifMetadata, build_epoch_from_env, write_eif
from salmiac.enclave_base import base as enclave_base
from salmiac.enclave_base import debs
from salmiac.enclave_base.kernel import KernelBundle, ensure_kernel
from salmiac.enclave_base.package import write_package
from salmiac.errors import RequestError
from salmiac.image.auth import Credentials
from salmiac.image.cache import BlobCache
from salmiac.image.destination import LayerBlob, write_image
from salmiac.image.flatten import flatten
from salmiac.image.models import ImageConfig
from salmiac.image.reference import Transport, parse_reference
from salmiac.image.source import open_image
from salmiac.image.tree import Tree
from salmiac.progress import Progress
from salmiac.protocol.appconfig import (
    APP_CONFIG_PATH,
    KEY_EPHEMERAL,
    KEY_INSECURE_DEV,
    ROOTFS_DIR,
    ROOTFS_IN_INITRAMFS,
    ROOTFS_VERITY,
    AppConfig,
    RootfsSpec,
)
from salmiac.request import ConversionRequest, ConversionResponse
from salmiac.rootfs.cpio import CpioWriter, write_tree
from salmiac.rootfs.fsimage import SQUASHFS, build_fs_image
from salmiac.rootfs.ramdisk import compress_file
from salmiac.rootfs.verity import format_verity
from salmiac.runconfig import BUNDLE_DIR, EIF_NAME, ROOTFS_IMAGE_NAME, RUN_CONFIG_NAME, RunConfig

# The kernel command line is measured (PCR0/PCR1). Nitro's own, plus what our init and emulator rely on:
# quiet console (app output goes over the control channel), trusted CPU RNG so nothing blocks on entropy.
KERNEL_CMDLINE: Final = (
    "reboot=k panic=30 pci=off console=ttyS0 earlyprintk=ttyS0 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
    "random.trust_cpu=on loglevel=4"
)
LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
# The parent runtime inside the converted image (what runs on the Nitro host): Python and the stdlib, pyroute2 and
# nftables for the network relay, ethtool for a relay without offload (it turns GRO/LRO off on the uplink).
PARENT_PACKAGES: Final = ("python3.11-minimal", "libpython3.11-stdlib", "python3-pyroute2", "nftables", "ethtool")
RUNTIME_HEADROOM_MIB: Final = 256  # kernel, init and a small app beyond the unpacked initramfs
ROOTFS_AUTO_VERITY_BYTES: Final = 256 << 20
"""rootfs "auto": app files above this size go to a verity image served over NBD instead of enclave RAM."""
SALMIAC_LAUNCHER: Final = """#!/usr/bin/python3.11 -I
import sys
sys.path.insert(0, "/opt/salmiac/lib")
from salmiac.cli import main
sys.exit(main())
"""


def default_cache_dir() -> Path:
    env = os.environ.get("SALMIAC_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "salmiac"


@dataclass(frozen=True, slots=True)
class BuiltEif:
    path: Path
    size: int
    sha256: str
    pcrs: dict[str, str]
    unpacked_bytes: int
    app: AppConfig
    rootfs_image: Path | None = None  # the verity rootfs, when the app's files are not in the initramfs


def app_config_for(image: ImageConfig, req: ConversionRequest, image_id: str) -> AppConfig:
    """The measured app config. It names the image by its ID (config digest), not by where it was read
    from, so the same image gives the same PCRs from a registry, an OCI layout or a docker-archive."""
    opts = req.converter_options
    entrypoint = list(opts.entry_point) if opts.entry_point is not None else list(image.entrypoint or [])
    cmd = list(opts.entry_point_args) if opts.entry_point_args is not None else list(image.cmd or [])
    stop_signal = _signal_number(image.stop_signal) if image.stop_signal else 15
    return AppConfig(
        entrypoint=entrypoint,
        cmd=cmd,
        env=list(image.env or []) + list(opts.env_vars),
        working_dir=image.working_dir or "/",
        user=image.user or "",
        stop_signal=stop_signal,
        exposed_ports=sorted(image.exposed_ports or []),
        overlay_persistence=opts.enable_overlay_filesystem_persistence,
        volumes=sorted({v.rstrip("/") or "/" for v in image.volumes} - {"/"}),
        key_provider=KEY_INSECURE_DEV if opts.insecure_dev_key else KEY_EPHEMERAL,
        allow_cmdline_args=opts.allow_cmdline_args,
        image_digest=image_id,
    )


def _signal_number(text: str) -> int:
    import signal as _signal

    name = text.strip().upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(_signal.Signals[name])
    except KeyError:
        raise RequestError(f"image StopSignal {text!r} is not a signal name") from None


def _gzip_file(src: Path, dst: Path) -> None:
    with (
        open(src, "rb") as fin,
        open(dst, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
    ):
        shutil.copyfileobj(fin, gz, 1 << 20)


def build_app_ramdisk(tree: Tree | None, app: AppConfig, dst: Path) -> int:
    """ramdisk[1]: the app's rootfs under rootfs/ (unless it is a verity image) and its config. Returns the
    uncompressed size."""
    raw = dst.with_suffix(".cpio")
    with open(raw, "wb") as f:
        writer = CpioWriter(f)
        if tree is not None:
            write_tree(tree, writer, ROOTFS_DIR)
        writer.add_dir("salmiac", mode=0o755)
        writer.add_file(APP_CONFIG_PATH, app.to_json(), mode=0o444)
        writer.finish()
    size = raw.stat().st_size
    compress_file(raw, dst)
    raw.unlink()
    return size


def build_bootstrap_ramdisk(cache: Path, kernel: KernelBundle, dst: Path) -> int:
    """ramdisk[0]: the enclave base (python, busybox, modules...) followed by our package and /init."""
    base = enclave_base.build_base_report(cache / "enclave-base", kernel, enclave_base.DEFAULT_MODULES)
    pkg_raw = dst.with_suffix(".pkg.cpio")
    with open(pkg_raw, "wb") as f:
        writer = CpioWriter(f)
        write_package(writer)
        writer.finish()
    pkg_size = pkg_raw.stat().st_size
    pkg = dst.with_suffix(".pkg")
    compress_file(pkg_raw, pkg)
    pkg_raw.unlink()
    with open(dst, "wb") as out:
        for part in (base.path, pkg):
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    pkg.unlink()
    return base.uncompressed_bytes + pkg_size


def build_eif(req: ConversionRequest, source_config: ImageConfig, tree: Tree, *, image_name: str,
              image_id: str, workdir: Path, cache: Path, progress: Progress) -> BuiltEif:
    kernel = ensure_kernel(cache / "kernel")
    progress.note(f"kernel {kernel.version}")
    app = app_config_for(source_config, req, image_id)
    mode = req.converter_options.rootfs
    if mode == "auto":
        mode = ROOTFS_VERITY if tree.total_file_bytes() > ROOTFS_AUTO_VERITY_BYTES else ROOTFS_IN_INITRAMFS
    rootfs_image: Path | None = None
    if mode == ROOTFS_VERITY:
        progress.note("building the rootfs image (squashfs + dm-verity)")
        rootfs_image = workdir / ROOTFS_IMAGE_NAME
        fs = build_fs_image(tree, rootfs_image, fs=SQUASHFS)
        verity = format_verity(fs.path)  # appended: one NBD export carries data and hash tree
        app = dataclasses.replace(app, rootfs=RootfsSpec(type=ROOTFS_VERITY, path="/", fs=SQUASHFS,
                                                         verity=verity.to_dict()))
    boot_rd = workdir / "bootstrap.rd"
    app_rd = workdir / "app.rd"
    progress.note("building the enclave base ramdisk")
    unpacked = build_bootstrap_ramdisk(cache, kernel, boot_rd)
    progress.note("building the app ramdisk")
    unpacked += build_app_ramdisk(tree if rootfs_image is None else None, app, app_rd)
    metadata = EifMetadata(
        image_name=image_name, image_version=image_id.removeprefix("sha256:") or "unknown",
        build_epoch=build_epoch_from_env(),
    ).with_kernel_config(kernel.config)
    eif_path = workdir / EIF_NAME
    progress.note("writing the EIF")
    info = write_eif(eif_path, kernel=kernel.bzimage, cmdline=KERNEL_CMDLINE, ramdisks=[boot_rd, app_rd],
                     metadata=metadata)
    for rd in (boot_rd, app_rd):
        rd.unlink()
    pcrs = {k: v for k, v in info.pcrs.to_json().items() if k.startswith("PCR")}
    return BuiltEif(path=eif_path, size=info.size, sha256=info.sha256, pcrs=pcrs, unpacked_bytes=unpacked,
                    app=app, rootfs_image=rootfs_image)


def memory_needed_mib(eif: BuiltEif) -> int:
    """What the enclave needs at least: nitro-cli wants 4 times the EIF; the guest holds the unpacked ramdisks."""
    by_nitro = 4 * eif.size
    by_guest = eif.size + eif.unpacked_bytes + RUNTIME_HEADROOM_MIB * (1 << 20)
    return math.ceil(max(by_nitro, by_guest) / (1 << 20))


# --- output image ---------------------------------------------------------------------------------------------


def _tar_info(name: str, *, mode: int, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode, info.size, info.type = mode, size, kind
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _layer(tar_path: Path, *, gzipped_dst: Path | None = None) -> LayerBlob:
    diff_id = _digest_file(tar_path)
    if gzipped_dst is None:
        return LayerBlob(path=str(tar_path), media_type=LAYER_TAR, digest=diff_id, size=tar_path.stat().st_size,
                         diff_id=diff_id)
    _gzip_file(tar_path, gzipped_dst)
    return LayerBlob(path=str(gzipped_dst), media_type=LAYER_TAR_GZIP, digest=_digest_file(gzipped_dst),
                     size=gzipped_dst.stat().st_size, diff_id=diff_id)


def _add_dir_tree(tar: tarfile.TarFile, host_root: Path, arc_root: str) -> None:
    """Add a host directory we built ourselves, deterministically (sorted, root-owned, mtime 0)."""
    entries = sorted(host_root.rglob("*"), key=lambda p: p.relative_to(host_root).as_posix().encode())
    for p in entries:
        rel = p.relative_to(host_root).as_posix()
        if "__pycache__" in rel.split("/"):
            continue
        name = f"{arc_root}/{rel}" if arc_root else rel
        st = p.lstat()
        if p.is_symlink():
            info = _tar_info(name, mode=0o777, kind=tarfile.SYMTYPE)
            info.linkname = os.readlink(p)
            tar.addfile(info)
        elif p.is_dir():
            tar.addfile(_tar_info(name, mode=st.st_mode & 0o7777, kind=tarfile.DIRTYPE))
        elif p.is_file():
            with open(p, "rb") as f:
                tar.addfile(_tar_info(name, mode=st.st_mode & 0o7777, size=st.st_size), f)


def build_parent_layer(cache: Path, workdir: Path) -> LayerBlob:
    """The parent runtime: Debian's python3.11 and salmiac itself, cached per salmiac version."""
    src_root = Path(salmiac.__file__).parent
    h = hashlib.sha256()
    for p in sorted(src_root.rglob("*.py")):
        h.update(p.relative_to(src_root).as_posix().encode() + b"\0" + p.read_bytes())
    key = h.hexdigest()[:16]
    layer_dir = cache / "parent-layer"
    layer_dir.mkdir(parents=True, exist_ok=True)
    cached = layer_dir / f"{key}.tar.gz"
    cached_meta = layer_dir / f"{key}.json"
    if not (cached.exists() and cached_meta.exists()):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            pkgs = debs.download_closure(list(PARENT_PACKAGES), cache / "debs")
            debs.extract_debs(pkgs, root)
            lib = root / "opt/salmiac/lib/salmiac"
            shutil.copytree(src_root, lib, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            launcher = root / "opt/salmiac/bin/salmiac"
            launcher.parent.mkdir(parents=True)
            launcher.write_text(SALMIAC_LAUNCHER)
            launcher.chmod(0o755)
            tar_path = Path(tmp) / "layer.tar"
            with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
                _add_dir_tree(tar, root, "")
            blob = _layer(tar_path, gzipped_dst=Path(tmp) / "layer.tar.gz")
            os.replace(blob.path, cached)
            cached_meta.write_text(json.dumps({"digest": blob.digest, "diff_id": blob.diff_id, "size": blob.size}))
    meta = json.loads(cached_meta.read_text())
    return LayerBlob(path=str(cached), media_type=LAYER_TAR_GZIP, digest=meta["digest"], size=meta["size"],
                     diff_id=meta["diff_id"])


def build_bundle_layer(eif: BuiltEif, run: RunConfig, workdir: Path) -> LayerBlob:
    tar_path = workdir / "bundle.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        parts = BUNDLE_DIR.split("/")
        for i in range(1, len(parts) + 1):
            tar.addfile(_tar_info("/".join(parts[:i]), mode=0o755, kind=tarfile.DIRTYPE))
        run_bytes = run.to_json()
        tar.addfile(_tar_info(f"{BUNDLE_DIR}/{RUN_CONFIG_NAME}", mode=0o444, size=len(run_bytes)),
                    io.BytesIO(run_bytes))
        with open(eif.path, "rb") as f:
            tar.addfile(_tar_info(f"{BUNDLE_DIR}/{EIF_NAME}", mode=0o444, size=eif.size), f)
        if eif.rootfs_image is not None:
            with open(eif.rootfs_image, "rb") as f:
                size = eif.rootfs_image.stat().st_size
                tar.addfile(_tar_info(f"{BUNDLE_DIR}/{ROOTFS_IMAGE_NAME}", mode=0o444, size=size), f)
    return _layer(tar_path)


def output_config(layers: list[LayerBlob], run: RunConfig, source_name: str) -> bytes:
    labels = {f"com.salmiac.{k.lower()}": v for k, v in sorted(run.pcrs.items())}
    labels["com.salmiac.source-image"] = source_name
    labels["com.salmiac.version"] = salmiac.__version__
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/opt/salmiac/bin/salmiac", "run", "--bundle", "/" + BUNDLE_DIR],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": labels,
            "Volumes": {"/var/lib/salmiac": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "salmiac parent runtime"}, {"created_by": "salmiac enclave bundle"}],
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def is_registry_destination(name: str) -> bool:
    return parse_reference(name).transport is Transport.REGISTRY


@contextlib.contextmanager
def _workdir(cache: Path) -> Iterator[Path]:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=cache) as tmp:
        yield Path(tmp)


def convert(req: ConversionRequest, *, cache_dir: Path | None = None, progress: Progress | None = None,
            tls_verify: bool = True, ca_file: str | None = None) -> ConversionResponse:
    cache = cache_dir or default_cache_dir()
    progress = progress or Progress(enabled=False)
    creds_in = Credentials(req.input_image.auth.username, req.input_image.auth.password) \
        if req.input_image.auth else None
    creds_out = Credentials(req.output_image.auth.username, req.output_image.auth.password) \
        if req.output_image.auth else None
    with _workdir(cache) as workdir:
        progress.note(f"reading {req.input_image.name}")
        source = open_image(req.input_image.name, credentials=creds_in, cache=BlobCache(cache / "blobs"),
                            tls_verify=tls_verify, ca_file=ca_file)
        try:
            diff_ids = source.config.diff_ids
            if len(diff_ids) != len(source.layers):
                raise RequestError(f"{req.input_image.name}: the config lists {len(diff_ids)} diff_ids for "
                                   f"{len(source.layers)} layers")

            def layer_streams() -> Iterator[tuple[BinaryIO, str | None]]:
                # One layer open at a time: blobs stream from the cache (or registry) into the tree.
                for i, desc in enumerate(source.layers):
                    progress.note(f"layer {i + 1}/{len(source.layers)} {desc.digest[:19]} "
                                  f"({desc.size / (1 << 20):.1f} MiB)")
                    with contextlib.closing(source.open_blob(desc)) as stream:
                        yield stream, diff_ids[i]

            tree = flatten(layer_streams())
            try:
                eif = build_eif(req, source.config, tree, image_name=req.input_image.name,
                                image_id=source.manifest.config.digest, workdir=workdir, cache=cache,
                                progress=progress)
            finally:
                tree.close()
        finally:
            source.close()
        needed = memory_needed_mib(eif)
        opts = req.nitro_enclaves_options
        if opts.mem_size_mib < needed:
            raise RequestError(f"nitro_enclaves_options.mem_size: {opts.mem_size_mib}M is less than the "
                               f"{needed}M this image needs")
        run = RunConfig(cpu_count=opts.cpu_count, memory_mib=opts.mem_size_mib, eif_sha256=eif.sha256,
                        pcrs=eif.pcrs, debug=req.converter_options.debug, image_name=req.input_image.name,
                        rootfs_image=ROOTFS_IMAGE_NAME if eif.rootfs_image is not None else "",
                        disk=eif.app.needs_disk, key_provider=eif.app.key_provider,
                        rw_storage_mib=req.converter_options.rw_storage_size_mib or 0)
        progress.note("writing the output image")
        layers = [build_parent_layer(cache, workdir), build_bundle_layer(eif, run, workdir)]
        config = output_config(layers, run, req.input_image.name)
        dest = req.output_image.name
        if is_registry_destination(dest) and not req.converter_options.push_converted_image:
            raise RequestError(f"output_image.name: {dest!r} is a registry reference but "
                               "converter_options.push_converted_image is false; set it to true to push, or name "
                               "a local destination (oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE)")
        written = write_image(dest, config=config, layers=layers, credentials=creds_out, tls_verify=tls_verify,
                              ca_file=ca_file)
        return ConversionResponse(
            output_image=written.reference, output_digest=written.manifest_digest, pcrs=eif.pcrs,
            eif_size=eif.size, eif_sha256=eif.sha256, memory_needed_mib=needed, mem_size_mib=opts.mem_size_mib,
            cpu_count=opts.cpu_count, pushed=req.converter_options.push_converted_image,
        )
