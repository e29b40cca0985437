"""Kernel and initramfs of the test guest, built once per machine.

The kernel comes from the Debian package that ``linux-image-amd64`` depends on;
the initramfs holds busybox-static, a few modules and the scripts from
``guest_init``. Both are cached outside the repository, keyed by the kernel
version and a hash of the scripts and of this builder, so an edit to either
rebuilds and parallel pytest processes share one copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import guest_init
from .errors import RigError

DEFAULT_CACHE = Path("/var/cache/guestsafe-test-rig")
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
APT_LISTS = Path("/var/lib/apt/lists")
KERNEL_NAME = "kernel"
BZIMAGE_NAME = "bzImage"
INITRAMFS_NAME = "initramfs.gz"
# Another checkout may still boot an older build, so only long-unused ones go.
STALE_AFTER_SECONDS = 3 * 24 * 3600


@dataclass(frozen=True)
class GuestAssets:
    """What a test guest boots: a kernel and its initramfs, readable by QEMU."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    # The same kernel as a bzImage, for UEFI guests: OVMF boots only EFI-stub images.
    bzimage: Path


def cache_root() -> Path:
    """Where built assets live; GUESTSAFE_RIG_CACHE overrides the default."""
    return Path(os.environ.get("GUESTSAFE_RIG_CACHE", str(DEFAULT_CACHE)))


@functools.cache
def build_guest_assets() -> GuestAssets:
    """Return the cached kernel and initramfs, building them first if needed."""
    root = cache_root()
    _make_public_dir(root)
    with _locked(root / ".lock"):
        package = _kernel_package(root)
        if package is None:
            return _any_cached_build(root)
        version = package.removeprefix("linux-image-")
        target = root / f"{version}-{_builder_hash()}"
        if not _is_complete(target):
            _build(package, version, target)
        _prune_stale(root, keep=target)
        return _assets_in(target, version)


def _prune_stale(root: Path, keep: Path) -> None:
    """Remove builds no session has used for a while; each source edit makes one (66 MB)."""
    os.utime(keep)  # marks keep as in use
    cutoff = time.time() - STALE_AFTER_SECONDS
    for build in root.iterdir():
        if build.is_dir() and build != keep and build.stat().st_mtime < cutoff:
            shutil.rmtree(build, ignore_errors=True)


def _builder_hash() -> str:
    # The init scripts live in guest_init.py, so hashing both sources covers them.
    digest = hashlib.sha256()
    for source in (Path(__file__), Path(guest_init.__file__)):
        digest.update(source.read_bytes())
    digest.update(BUSYBOX.read_bytes() if BUSYBOX.exists() else b"")
    return digest.hexdigest()[:12]


def _kernel_package(root: Path) -> str | None:
    """The concrete kernel package of linux-image-amd64, or None if apt has no answer.

    apt-cache takes a second or more here (no binary cache), so the answer is
    kept until apt's package lists change.
    """
    memo = root / "kernel-package.json"
    lists = _apt_lists_state()
    try:
        saved = json.loads(memo.read_text())
        if saved["lists"] == lists:
            return str(saved["package"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    package = _ask_apt_for_kernel_package()
    if package is not None:
        memo.write_text(json.dumps({"lists": lists, "package": package}))
    return package


def _apt_lists_state() -> str:
    digest = hashlib.sha256()
    for path in sorted(APT_LISTS.glob("*")):
        info = path.stat()
        digest.update(f"{path.name} {info.st_mtime_ns} {info.st_size}\n".encode())
    return digest.hexdigest()


def _ask_apt_for_kernel_package() -> str | None:
    try:
        out = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"^\s*Depends:\s*(linux-image-\S+)", out, re.MULTILINE)
    return match.group(1) if match else None


def _any_cached_build(root: Path) -> GuestAssets:
    # Without apt (offline CI runners) an earlier build from this builder still works.
    suffix = f"-{_builder_hash()}"
    builds = sorted(p for p in root.iterdir() if p.name.endswith(suffix) and _is_complete(p))
    if not builds:
        raise RigError(
            f"apt-cache cannot resolve {KERNEL_META_PACKAGE} and {root} holds no "
            "earlier build; run .ci/host-setup.sh (it runs apt-get update)"
        )
    newest = builds[-1]
    return _assets_in(newest, newest.name.removesuffix(suffix))


def _is_complete(target: Path) -> bool:
    names = (INITRAMFS_NAME, KERNEL_NAME, BZIMAGE_NAME)
    return all((target / name).is_file() for name in names)


def _assets_in(target: Path, version: str) -> GuestAssets:
    return GuestAssets(
        target / KERNEL_NAME, target / INITRAMFS_NAME, version, target / BZIMAGE_NAME
    )


def _build(package: str, version: str, target: Path) -> None:
    """Build into a scratch dir next to target and rename it, so readers never see half."""
    if not BUSYBOX.is_file():
        raise RigError(f"{BUSYBOX} is missing; install busybox-static (.ci/host-setup.sh)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch_name:
        scratch = Path(scratch_name)
        tree = _unpack_kernel(package, scratch)
        out = scratch / "out"
        out.mkdir()
        bzimage = tree / "boot" / f"vmlinuz-{version}"
        shutil.copyfile(bzimage, out / BZIMAGE_NAME)
        (out / KERNEL_NAME).write_bytes(_bootable_kernel(bzimage, tree / "boot", version))
        module_dir = tree / "lib" / "modules" / version
        modules = _load_modules(module_dir, guest_init.MODULES)
        device_modules = _load_modules(module_dir, tuple(guest_init.DEVICE_MODULES))
        _check_dependencies(module_dir, device_modules, loaded_before=modules)
        (out / INITRAMFS_NAME).write_bytes(_initramfs(modules, device_modules))
        _make_public_tree(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)


def _bootable_kernel(bzimage_path: Path, boot: Path, version: str) -> bytes:
    """The kernel image to boot: its uncompressed ELF when it has a PVH entry.

    QEMU boots a PVH ELF straight into the kernel. That skips the firmware's
    kernel loading and the bzImage self-decompression, about 3 s under TCG.
    """
    bzimage = bzimage_path.read_bytes()
    config = boot / f"config-{version}"
    if not (config.exists() and "\nCONFIG_PVH=y\n" in config.read_text()):
        return bzimage
    elf = _embedded_elf(bzimage)
    return bzimage if elf is None else elf


def _embedded_elf(bzimage: bytes) -> bytes | None:
    # The bzImage payload is one compressed stream; find it by its magic.
    for magic, decompress in _PAYLOAD_FORMATS:
        start = bzimage.find(magic)
        if start < 0:
            continue
        try:
            elf = decompress(bzimage[start:])
        except (lzma.LZMAError, OSError, EOFError, subprocess.CalledProcessError):
            continue
        if elf.startswith(b"\x7fELF"):
            return elf
    return None


def _xz(data: bytes) -> bytes:
    # A decompressor object stops at the stream's end and ignores what follows.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout


_PAYLOAD_FORMATS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", _xz),
    (b"\x28\xb5\x2f\xfd", _zstd),
    (b"\x1f\x8b\x08", _gzip),
)


def _unpack_kernel(package: str, scratch: Path) -> Path:
    deb = _find_or_download(package, scratch)
    tree = scratch / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return tree


def _find_or_download(package: str, scratch: Path) -> Path:
    # apt's own cache often holds the package already; any version of it will do.
    cached = sorted(Path("/var/cache/apt/archives").glob(f"{package}_*_amd64.deb"))
    if cached:
        return cached[-1]
    # Sandbox user root: the scratch dir is root's 0700, so _apt could not write there.
    result = subprocess.run(
        ["apt-get", "-o", "APT::Sandbox::User=root", "download", package],
        cwd=scratch,
        capture_output=True,
        text=True,
    )
    debs = sorted(scratch.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        raise RigError(f"apt-get download {package} failed: {result.stderr.strip()}")
    return debs[-1]


def _load_modules(module_dir: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Module name -> uncompressed .ko bytes; builtin modules are left out."""
    builtin = _builtin_modules(module_dir)
    found: dict[str, bytes] = {}
    for name in names:
        if name in builtin:
            continue
        path = _module_file(module_dir, name)
        if path is None:
            if name in guest_init.OPTIONAL_MODULES:
                continue
            raise RigError(f"kernel module {name} not found under {module_dir}")
        found[name] = _decompress(path)
    return found


def _check_dependencies(
    module_dir: Path, modules: dict[str, bytes], *, loaded_before: dict[str, bytes]
) -> None:
    """Every module ``modules`` needs (modules.dep) is builtin or loaded before them.

    busybox insmod resolves nothing, so a new kernel that splits a module out
    would otherwise fail only inside the guest, as a GS-WARN line.
    """
    builtin = _builtin_modules(module_dir)
    for name, needs in _dependencies(module_dir).items():
        if name not in modules:
            continue
        missing = [n for n in needs if n not in builtin and n not in loaded_before]
        if missing:
            raise RigError(
                f"kernel module {name} needs {', '.join(missing)}; add them to guest_init.MODULES"
            )


def _dependencies(module_dir: Path) -> dict[str, list[str]]:
    listing = module_dir / "modules.dep"
    if not listing.exists():
        return {}
    deps: dict[str, list[str]] = {}
    for line in listing.read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[_module_name(Path(module))] = [_module_name(Path(n)) for n in needs.split()]
    return deps


def _builtin_modules(module_dir: Path) -> set[str]:
    listing = module_dir / "modules.builtin"
    if not listing.exists():
        return set()
    return {_module_name(Path(line)) for line in listing.read_text().split()}


def _module_name(path: Path) -> str:
    # Module names treat '-' and '_' alike; the files may use either.
    return path.name.split(".ko")[0].replace("-", "_")


def _module_file(module_dir: Path, name: str) -> Path | None:
    for path in module_dir.rglob("*.ko*"):
        if _module_name(path) == name:
            return path
    return None


def _decompress(path: Path) -> bytes:
    # busybox insmod cannot load compressed modules.
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _zstd(data)
    return data


def _initramfs(modules: dict[str, bytes], device_modules: dict[str, bytes]) -> bytes:
    archive = NewcWriter()
    for directory in ("bin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules"):
        archive.directory(directory)
    for directory in ("proc", "sys", "run", "tmp", "var"):
        archive.directory(directory)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_device("dev/console", major=5, minor=1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in _busybox_applets():
        archive.symlink(f"bin/{applet}", "busybox")
    for name, data in {**modules, **device_modules}.items():
        archive.file(f"lib/modules/{name}.ko", data)
    archive.file("etc/gs-modules", "\n".join(modules).encode() + b"\n")
    wanted = [f"{name} {guest_init.DEVICE_MODULES[name]}\n" for name in device_modules]
    archive.file("etc/gs-device-modules", "".join(wanted).encode())
    archive.file("etc/gs-agent.sh", guest_init.AGENT_SH.encode(), mode=0o755)
    archive.file("etc/gs-lib.sh", guest_init.LIB_SH.encode())
    archive.file("etc/acpi/PWRF/00000080", guest_init.POWEROFF_SH.encode(), mode=0o755)
    archive.file("init", guest_init.INIT_SH.encode(), mode=0o755)
    # mtime 0 keeps the image byte-identical across builds.
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def _busybox_applets() -> list[str]:
    out = subprocess.run(
        [str(BUSYBOX), "--list"], check=True, capture_output=True, text=True
    ).stdout
    return sorted({name for name in out.split() if name != "busybox" and "/" not in name})


class NewcWriter:
    """A minimal cpio "newc" archive writer, the format the kernel unpacks.

    Writing it here instead of running cpio lets the image carry /dev/console
    without mknod and come out the same on every build.
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", inode=0)
        return self._out.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._next_inode() if inode is None else inode,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(data),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self._out.write(b"070701" + b"".join(b"%08X" % field for field in fields))
        self._out.write(encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _next_inode(self) -> int:
        self._inode += 1
        return self._inode

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


def _make_public_dir(path: Path) -> None:
    # QEMU runs as libvirt-qemu and must traverse down to the kernel and initramfs.
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def _make_public_tree(path: Path) -> None:
    path.chmod(0o755)
    for child in path.iterdir():
        child.chmod(0o644)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock, so one pytest process builds while the others wait."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
