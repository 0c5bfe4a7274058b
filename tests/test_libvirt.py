"""End-to-end: a libvirt guest whose RAM is on dmemfs (issue #14).

Debian's libvirt (libvirt-daemon-system, which creates the libvirt-qemu user
QEMU runs as) is started by the test, where no systemd runs: a private
libvirtd in a mount namespace of its own, with the host's /etc/libvirt copied
and qemu.conf extended, and libvirt's run, lib, log and cache directories
bind-mounted from a scratch directory.  The host's libvirt is neither used nor
changed.  qemu.conf sets ``memory_backing_dir`` to the dmemfs mount; a TCG
domain boots the test guest of tools/guest-image by direct kernel boot with
``<memoryBacking><source type='file'/><access mode='shared'/>
<allocation mode='immediate'/>``.

While the guest runs, ``dmemctl`` shows its RAM taken from the pool, the RAM
file (``libvirt/qemu/ID-NAME/pc.ram`` on the mount) belongs to libvirt-qemu,
and the guest's pattern is in it at the guest-physical pages it printed.
After ``virsh destroy`` and ``virsh undefine`` every dpage is back and libvirt
has left nothing on the mount.  The second form gives the guest a NUMA cell
with ``memAccess='shared'``, as vhost-user setups do: libvirt then names the
backend per cell (``ram-node0``).  A mount made with ``-o private`` refuses
libvirt's QEMU, and the start fails with the reason.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import Mount, dmemctl, dmemfs, path_options
from test_qemu import GUEST_MIB, MIB, PAGE, PATTERN_MIB, Guest, Run, assert_pattern_in_file
from test_qemu import guest as guest  # noqa: PLC0414 - the fixture, shared

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU_USER = "libvirt-qemu"  # Debian's build of libvirt runs QEMU as this user
# libvirt's own directories, each replaced in libvirtd's namespace by one of the scratch tree
# (the cache by one that the module's tests share).
LIBVIRT_DIRS = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "log": "/var/log/libvirt",
                "etc": "/etc/libvirt"}
START_TIMEOUT = 90.0
BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Libvirt:
    """A private libvirtd, reached through its socket in the scratch tree."""

    root: Path
    proc: subprocess.Popen[bytes]

    @property
    def uri(self) -> str:
        """qemu:///system, on this libvirtd's socket."""
        return f"qemu:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run virsh against this libvirtd; with *check*, fail with its output unless 0."""
        result = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True,
                                text=True, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, (f"virsh {' '.join(args)}: {result.stderr}"
                                            f"{self.log()}")
        return result

    def log(self, domain: str | None = None) -> str:
        """The tail of libvirtd's log, or of the QEMU log of *domain*."""
        path = self.root / ("libvirtd.log" if domain is None else f"log/qemu/{domain}.log")
        return "\n".join(path.read_text().splitlines()[-40:]) if path.exists() else ""


def kvm_as_udev_makes_it(where: Path) -> list[str]:
    """Shell steps that give libvirtd's namespace a /dev/kvm of group kvm, mode 0660.

    On a host with udev, /dev/kvm is root:kvm and QEMU's user (in group kvm) may open
    it. Where no udev runs, as here, it is root's alone: libvirtd then probes QEMU with
    KVM (as root) but finds KVM unusable for libvirt-qemu, so it calls its cached probe
    stale and probes again at every lookup, many times within one ``virsh define``.
    The node is made on a tmpfs of the namespace's own, so the host's /dev is not
    changed.
    """
    try:
        st = os.stat("/dev/kvm")
    except FileNotFoundError:
        return []
    node = where / "kvm"
    return [f"mkdir -p {where}", f"mount -t tmpfs -o size=64k,mode=0755 dmemfs-test-dev {where}",
            f"mknod -m 0660 {node} c {os.major(st.st_rdev)} {os.minor(st.st_rdev)}",
            f"chgrp kvm {node}", f"mount --bind {node} /dev/kvm"]


@contextmanager
def libvirtd(root: Path, cache: Path, qemu_conf: str) -> Iterator[Libvirt]:
    """Run a private libvirtd for the block, its qemu.conf extended by *qemu_conf*, its
    /var/cache/libvirt (where it keeps what it probed of QEMU) the directory *cache*.

    On every path out, each domain is destroyed and undefined, libvirtd is stopped,
    and any QEMU of this scratch tree that is left is killed.  libvirtd has a network
    namespace of its own too: the guests have no network, and nothing it might set up
    (bridges, firewall rules) reaches the host.
    """
    if not os.access(LIBVIRTD, os.X_OK):
        pytest.fail(f"{LIBVIRTD} is missing: tools/setup installs libvirt-daemon-system")
    shutil.copytree("/etc/libvirt", root / "etc")
    # A host's autostarted networks (Debian's "default") would start dnsmasq and a bridge.
    for link in (root / "etc").glob("*/networks/autostart/*"):
        link.unlink()
    with open(root / "etc" / "qemu.conf", "a") as conf:
        conf.write(qemu_conf)
    with open(root / "etc" / "libvirtd.conf", "a") as conf:
        conf.write(f'\nlog_outputs = "3:file:{root / "libvirtd.log"}"\n')
    dirs = {root / name: target for name, target in LIBVIRT_DIRS.items()}
    dirs[cache] = "/var/cache/libvirt"
    binds = []
    for source, target in dirs.items():
        source.mkdir(exist_ok=True)
        binds.append(f"mkdir -p {target} && mount --bind {source} {target}")
    binds += kvm_as_udev_makes_it(root / "dev")
    # A pid file of its own: a host's libvirtd holds /run/libvirtd.pid.
    script = ("set -e; " + "; ".join(binds) +
              f"; exec {LIBVIRTD} --pid-file {root / 'libvirtd.pid'}")
    with open(root / "libvirtd.out", "wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private",
                                 "sh", "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    libvirt = Libvirt(root, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT

        def answering() -> bool:
            try:
                return libvirt.virsh("version", check=False, timeout=10).returncode == 0
            except subprocess.TimeoutExpired:  # connected, not answering yet: ask again
                return False

        while not answering():
            assert proc.poll() is None, (f"libvirtd exited {proc.returncode}:\n"
                                         f"{(root / 'libvirtd.out').read_text()}{libvirt.log()}")
            assert time.monotonic() < deadline, f"libvirtd not answering:\n{libvirt.log()}"
            time.sleep(0.5)
        yield libvirt
    finally:
        try:
            if proc.poll() is None:
                remove_domains(libvirt)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            kill_leftover_qemus(root / "run" / "qemu")


def remove_domains(libvirt: Libvirt) -> None:
    """Destroy and undefine every domain, as far as virsh answers in time."""
    try:
        names = libvirt.virsh("list", "--all", "--name", check=False, timeout=30).stdout.split()
        for name in names:
            libvirt.virsh("destroy", name, check=False, timeout=30)
            libvirt.virsh("undefine", name, check=False, timeout=30)
    except subprocess.TimeoutExpired:
        pass  # libvirtd is stopped next, and its QEMUs are killed by pid


def kill_leftover_qemus(pid_dir: Path) -> None:
    """Kill the QEMUs whose pid files libvirt left in *pid_dir*. libvirt removes a
    domain's pid file when it stops it; a stopped libvirtd leaves its guests running."""
    for pid_file in pid_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"qemu-system" not in cmdline.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):  # gone already, or not a pid
            continue
        deadline = time.monotonic() + 10  # gone before the mount it maps is unmounted
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@contextmanager
def reachable_directory() -> Iterator[Path]:
    """A fresh directory libvirt-qemu can traverse (pytest's tmp_path is root's alone),
    removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="dmemfs-libvirt-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """Where the mount, the guest's kernel and initramfs and its console log live."""
    with reachable_directory() as path:
        yield path


@pytest.fixture(scope="module")
def libvirt_cache() -> Iterator[Path]:
    """libvirt's cache, shared by the module's tests: libvirtd probes QEMU's capabilities
    on first use, and the probe it caches stays valid while libvirtd, QEMU, /dev/kvm and
    the kernel are the same."""
    with reachable_directory() as path:
        yield path


def domain_xml(name: str, guest: Guest, root: Path, seed: int, numa: bool) -> str:
    """A TCG domain booting the test guest directly, its RAM a shared file on the mount."""
    kib = GUEST_MIB * 1024
    access = "" if numa else "<access mode='shared'/>"
    cpu = (f"<cpu><numa><cell id='0' cpus='0' memory='{kib}' unit='KiB' "
           "memAccess='shared'/></numa></cpu>" if numa else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>{kib}</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='file'/>{access}<allocation mode='immediate'/></memoryBacking>
  {cpu}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{root / 'vmlinuz'}</kernel>
    <initrd>{root / 'initrd'}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet dmemfs_seed={seed:x} dmemfs_mib={PATTERN_MIB}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{guest.qemu}</emulator>
    <serial type='file'><source path='{root / 'console.log'}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def wait_for_pattern(console: Path, libvirt: Libvirt, name: str) -> list[Run]:
    """Wait for the guest's pattern on its console log; the runs it printed."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if "DMEMFS-PATTERN-READY" in text:
            break
        assert "DMEMFS-PATTERN-FAILED" not in text, text
        state = libvirt.virsh("domstate", name, check=False, timeout=30).stdout.strip()
        assert state == "running", f"the guest is {state}:\n{text}\n{libvirt.log(name)}"
        assert time.monotonic() < deadline, f"no pattern within {BOOT_TIMEOUT:.0f} s:\n{text}"
        time.sleep(0.5)
    runs = []
    for line in text.splitlines():
        if line.startswith("DMEMFS-RUN "):
            page, pfn, count = line.split()[1:4]
            runs.append(Run(int(page, 16), int(pfn, 16), int(count)))
    assert sum(r.count for r in runs) == PATTERN_MIB * MIB // PAGE, text
    return runs


def start_on_dmemfs(guest: Guest, scratch: Path, libvirt: Libvirt, numa: bool) -> tuple[str, int]:
    """Define and start a guest on the mount; its name and pattern seed."""
    name = f"dmemfs-{secrets.token_hex(4)}"
    seed = secrets.randbits(48)
    xml = scratch / "domain.xml"
    xml.write_text(domain_xml(name, guest, scratch, seed, numa))
    libvirt.virsh("define", str(xml))
    libvirt.virsh("start", name)
    return name, seed


@contextmanager
def libvirt_on_dmemfs(guest: Guest, scratch: Path, cache: Path,
                      options: str) -> Iterator[tuple[Mount, Libvirt]]:
    """A dmemfs mount with *options* under *scratch*, and a libvirtd whose qemu.conf
    names it as memory_backing_dir; the guest's kernel and initramfs are in *scratch*."""
    for name, source in (("vmlinuz", guest.kernel), ("initrd", guest.initrd)):
        shutil.copy(source, scratch / name)
        (scratch / name).chmod(0o644)
    with dmemfs(scratch, options) as mount:
        conf = (f'\nmemory_backing_dir = "{mount.path}"\n'
                'stdio_handler = "file"\n')  # QEMU's output to a file: no virtlogd here
        with libvirtd(scratch / "libvirt", cache, conf) as libvirt:
            yield mount, libvirt


@pytest.mark.parametrize("numa", [False, True], ids=["memoryBacking", "numa-cell"])
def test_a_libvirt_guest_runs_on_dmemfs(guest: Guest, scratch: Path, libvirt_cache: Path,
                                        data_path: str, numa: bool) -> None:
    """libvirt gives the guest its RAM from memory_backing_dir on the mount: dmemctl shows
    it taken, QEMU runs as libvirt-qemu and owns the file, the pattern lands in it, and
    destroy + undefine give every dpage back."""
    options = f"size=256M,pagesize=2M,{path_options(data_path)}"
    with libvirt_on_dmemfs(guest, scratch, libvirt_cache, options) as (mount, libvirt):
        free = mount.free_dpages()
        need = GUEST_MIB * MIB // mount.statvfs().f_bsize
        name, seed = start_on_dmemfs(guest, scratch, libvirt, numa)
        # allocation mode='immediate' is QEMU's prealloc: all of it before the guest runs
        st = json.loads(dmemctl("-m", str(mount.path), "--json", "status").stdout)
        assert st["free_dpages"] == free - need, st
        runs = wait_for_pattern(scratch / "console.log", libvirt, name)

        ram = [p for p in (mount.path / "libvirt" / "qemu").rglob("*") if p.is_file()]
        assert len(ram) == 1, ram
        (ram_file,) = ram
        assert ram_file.name == ("ram-node0" if numa else "pc.ram"), ram_file
        assert ram_file.stat().st_size == GUEST_MIB * MIB
        assert pwd.getpwuid(ram_file.stat().st_uid).pw_name == QEMU_USER
        domain_dir = ram_file.parent.stat()
        assert (pwd.getpwuid(domain_dir.st_uid).pw_name, stat.S_IMODE(domain_dir.st_mode)) \
            == (QEMU_USER, 0o700)
        pid = int((scratch / "libvirt" / "run" / "qemu" / f"{name}.pid").read_text())
        assert pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name == QEMU_USER
        files = json.loads(dmemctl("-m", str(mount.path), "--json", "files").stdout)
        assert files["files"][0]["allocated"] == GUEST_MIB * MIB, files
        assert_pattern_in_file(ram_file, seed, runs)

        libvirt.virsh("destroy", name)
        assert mount.free_dpages() == free
        assert not ram_file.parent.exists(), "libvirt left the domain's directory"
        assert not [p for p in mount.path.rglob("*") if p.is_file()]
        libvirt.virsh("undefine", name)
        assert mount.free_dpages() == free
        assert name not in libvirt.virsh("list", "--all", "--name").stdout.split()
        assert not Path(f"/proc/{pid}").exists(), "QEMU still runs after destroy"
    assert mount.exit_code == 0, mount.log()  # nothing held the mount at the unmount


def test_a_private_mount_refuses_libvirt_s_qemu(guest: Guest, scratch: Path,
                                               libvirt_cache: Path) -> None:
    """With -o private only root may use the mount: libvirt makes the domain's directory
    (libvirtd is root) but QEMU, as libvirt-qemu, cannot open its RAM file, and the
    start fails with that reason instead of a guest on other memory."""
    with libvirt_on_dmemfs(guest, scratch, libvirt_cache, "size=256M,pagesize=2M,private") \
            as (mount, libvirt):
        free = mount.free_dpages()
        name = f"dmemfs-{secrets.token_hex(4)}"
        xml = scratch / "domain.xml"
        xml.write_text(domain_xml(name, guest, scratch, 1, numa=False))
        libvirt.virsh("define", str(xml))
        result = libvirt.virsh("start", name, check=False)
        assert result.returncode != 0, result.stdout
        assert "can't open backing store" in result.stderr, result.stderr
        assert "Permission denied" in result.stderr, result.stderr
        assert mount.free_dpages() == free
        assert not [p for p in mount.path.rglob("*") if p.is_file()]
    assert mount.exit_code == 0, mount.log()
