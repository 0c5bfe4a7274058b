"""Access control, checked with a real unprivileged account.

A system user (``dmemfs-test``) is created for the module when it does not
exist, and removed again afterwards.  Everything it does runs in a child
process under ``setpriv --reuid --regid --clear-groups`` with no
capabilities, so the kernel and the daemon see a real other user.  The
tests prove that:

- a mount made by root is open to every user, as tmpfs is: the kernel
  enforces the usual permission checks (the daemon mounts with
  ``default_permissions``), and the daemon records the caller as the owner
  of what it creates;
- a conformance matrix of operations the user does (about 250 in 19 groups,
  in directories of every kind) ends as on tmpfs, errno for errno, and leaves
  the same tree, on both data paths;
- with ``private`` only root gets into the mount (FUSE's own rule);
- the control socket is root's alone: mode 0600, and even with the file mode
  opened up the daemon refuses a peer whose uid is not root;
- the metrics endpoint listens on loopback only.

The mounts whose paths the other user must reach live in a 0755 directory of
their own, since pytest's temporary directories are 0700.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mounting import (
    Mount,
    dmemfs,
    free_port,
    kernel_fs,
    metrics,
    path_options,
    unescape,
)

from dmemfs_fuse.insight import dmemctl
from dmemfs_fuse.insight.control import socket_path

pytestmark = pytest.mark.mount

USER = "dmemfs-test"
OPTIONS = "size=64M,pagesize=2M"

# Runs as the other user, on the standard library only (so any python3 will do).
# argv[1] is a JSON list of operations; stdout gets one JSON result per
# operation: ["ok", value] or [errno name, message].
PROBE = r"""
import errno, json, os, socket, sys

def ask(path, line):
    # connect errors are the op's result; after that, whatever came back and how it ended
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        data = b""
        try:
            sock.sendall(line.encode() + b"\n")
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return [data.decode(), None]
                data += chunk
        except OSError as exc:
            return [data.decode(), errno.errorcode.get(exc.errno, str(exc.errno))]

def run(op, args):
    if op == "whoami":
        status = open("/proc/self/status").read().splitlines()
        caps = [line.split()[1] for line in status if line.startswith("CapEff:")][0]
        return [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups(), caps]
    if op == "stat":
        st = os.stat(args[0])
        return [st.st_uid, st.st_gid, st.st_mode]
    if op == "listdir":
        return sorted(os.listdir(args[0]))
    if op == "read":
        with open(args[0], "rb") as f:
            return f.read().decode()
    if op == "write":
        fd = os.open(args[0], os.O_WRONLY | os.O_APPEND)
        try:
            return os.write(fd, args[1].encode())
        finally:
            os.close(fd)
    if op == "create":
        fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, args[2])
        try:
            return os.write(fd, args[1].encode())
        finally:
            os.close(fd)
    if op == "truncate":
        return os.truncate(args[0], args[1])
    if op == "open_trunc":
        return os.close(os.open(args[0], os.O_WRONLY | os.O_TRUNC))
    if op == "mmap_write":
        import mmap
        fd = os.open(args[0], os.O_RDWR)
        try:
            with mmap.mmap(fd, 1) as area:
                area[0:1] = b"z"
                area.flush()
        finally:
            os.close(fd)
        return None
    if op == "mkdir":
        return os.mkdir(args[0], args[1])
    if op == "symlink":
        return os.symlink(args[0], args[1])
    if op == "unlink":
        return os.unlink(args[0])
    if op == "rename":
        return os.rename(args[0], args[1])
    if op == "chmod":
        return os.chmod(args[0], args[1])
    if op == "chown":
        return os.chown(args[0], args[1], args[2])
    if op == "rmdir":
        return os.rmdir(args[0])
    if op == "link":
        return os.link(args[0], args[1])
    if op == "utime":
        return os.utime(args[0], None if args[1] is None else (args[1], args[1]))
    if op == "setxattr":
        return os.setxattr(args[0], args[1], args[2].encode())
    if op == "access":
        return os.access(args[0], args[1])
    if op == "open_dir":
        return os.close(os.open(args[0], os.O_RDONLY | os.O_DIRECTORY))
    if op == "connect":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(args[0])
        return None
    if op == "ask":
        return ask(args[0], args[1])
    raise ValueError(op)

out = []
for op, *args in json.loads(sys.argv[1]):
    try:
        out.append(["ok", run(op, args)])
    except OSError as exc:
        out.append([errno.errorcode.get(exc.errno, str(exc.errno)), str(exc)])
print(json.dumps(out))
"""

Op = tuple[Any, ...]


@dataclass(frozen=True)
class User:
    """An unprivileged account and how to run the probe as it."""

    name: str
    uid: int
    gid: int
    python: str

    def run(self, *ops: Op) -> list[tuple[str, Any]]:
        """Do *ops* in one probe process as this user; one ('ok', value) or (errno, msg) each."""
        result = subprocess.run(
            as_user(self.uid, self.gid, self.python, "-I", "-c", PROBE,
                    json.dumps([list(op) for op in ops])),
            capture_output=True, text=True, timeout=60, check=False, cwd="/")
        assert result.returncode == 0, f"the probe failed as {self.name}:\n{result.stderr}"
        return [(status, value) for status, value in json.loads(result.stdout)]

    def status(self, *op: Any) -> str:
        """'ok' or the errno name of one operation done as this user."""
        return self.run(op)[0][0]

    def value(self, *op: Any) -> Any:
        """The result of one operation that must succeed as this user."""
        status, value = self.run(op)[0]
        assert status == "ok", f"{op} as {self.name}: {status} {value}"
        return value


def as_user(uid: int, gid: int, *argv: str) -> list[str]:
    """*argv* run as *uid*:*gid*: real and effective ids set, no groups, no capabilities."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def getent(database: str, key: str) -> list[str] | None:
    """The fields of *key* in an NSS database, or None if it has no such entry."""
    result = subprocess.run(["getent", database, key], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip().split(":") if result.returncode == 0 else None


def python_for(uid: int, gid: int) -> str:
    """An interpreter the user can run (the venv's may sit behind a 0700 home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(as_user(uid, gid, candidate, "-I", "-c", "import json, socket"),
                               capture_output=True, check=False, cwd="/")
        if probe.returncode == 0:
            return candidate
    pytest.fail(f"no python3 that uid {uid} may run")


@pytest.fixture(scope="module")
def other() -> Iterator[User]:
    """The unprivileged user: created for the module if missing, removed if we created it."""
    for tool in ("setpriv", "useradd", "userdel", "getent"):
        if shutil.which(tool) is None:
            pytest.fail(f"access tests need {tool} (util-linux, passwd, libc-bin)")
    group_existed = getent("group", USER) is not None
    created = False
    if getent("passwd", USER) is None:
        result = subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                 "/usr/sbin/nologin", USER], capture_output=True, text=True,
                                check=False)
        assert result.returncode == 0, f"useradd {USER}: {result.stderr}"
        created = True
    try:
        entry = getent("passwd", USER)
        assert entry is not None, f"{USER} was not created"
        uid, gid = int(entry[2]), int(entry[3])
        assert uid != 0 and gid != 0, f"{USER} is privileged: {entry}"
        yield User(USER, uid, gid, python_for(uid, gid))
    finally:
        if created:
            subprocess.run(["userdel", USER], check=False, capture_output=True)
            if not group_existed and getent("group", USER) is not None:
                subprocess.run(["groupdel", USER], check=False, capture_output=True)
            assert getent("passwd", USER) is None, f"could not remove the user {USER}"


def fuse_mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [unescape(line.split()[1]) for line in mounts
                if line.split()[2].startswith("fuse")
                and unescape(line.split()[1]).startswith(str(path) + "/")]


@pytest.fixture(scope="module")
def public_dir() -> Iterator[Path]:
    """A 0755 directory for mountpoints that the other user can reach."""
    path = Path(tempfile.mkdtemp(prefix="dmemfs-access-")).resolve()
    path.chmod(0o755)
    try:
        yield path
    finally:
        left = fuse_mounts_under(path)
        if not left:  # never walk into a mount that is still up
            shutil.rmtree(path, ignore_errors=True)
        assert not left, f"mounts left behind: {left}"


@pytest.fixture(scope="module")
def shared(public_dir: Path, other: User) -> Iterator[Mount]:
    """One dmemfs mounted with the default options (open to every user, like tmpfs) for the
    permission tests."""
    with dmemfs(public_dir, OPTIONS, name="shared") as mount:
        yield mount
    assert mount.exit_code == 0, mount.log()


def mount_options(path: Path) -> set[str]:
    """The options /proc/mounts shows for the mount at *path*."""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if unescape(fields[1]) == str(path):
                return set(fields[3].split(","))
    raise AssertionError(f"{path} is not mounted")


def root_file(path: Path, data: bytes, mode: int) -> Path:
    """Create *path* as root with *data* and exactly *mode*."""
    path.write_bytes(data)
    path.chmod(mode)
    return path


# -- who may enter the mount ----------------------------------------------------------------


def test_probe_runs_unprivileged(other: User) -> None:
    """The probe really runs as the other user, with no groups and no capabilities.

    Every other test's EACCES/EPERM would be meaningless if it did not.
    """
    uid, euid, gid, egid, groups, caps = other.value("whoami")
    assert (uid, euid, gid, egid, groups) == (other.uid, other.uid, other.gid, other.gid, [])
    assert int(caps, 16) == 0


def test_a_private_mount_admits_only_root(public_dir: Path, other: User) -> None:
    """With private FUSE turns every other user away, even from stat of the mountpoint.

    The user can stat the mountpoint's parent, so the refusal comes from FUSE, not from a
    directory it cannot search; root, on the same paths, gets in.
    """
    with dmemfs(public_dir, f"{OPTIONS},private", name="private") as mount:
        assert "allow_other" not in mount_options(mount.path)
        root_file(mount.path / "f", b"root's", 0o644)
        assert os.stat(mount.path).st_mode & 0o777 == 0o777  # 1777: the mode does not stop it
        assert (mount.path / "f").read_bytes() == b"root's"
        results = other.run(("stat", str(public_dir)), ("stat", str(mount.path)),
                            ("listdir", str(mount.path)), ("stat", str(mount.path / "f")),
                            ("read", str(mount.path / "f")),
                            ("create", str(mount.path / "mine"), "x", 0o644))
        assert [status for status, _ in results] == ["ok", "EACCES", "EACCES", "EACCES",
                                                     "EACCES", "EACCES"], results
        assert os.listdir(mount.path) == ["f"]
    assert mount.exit_code == 0, mount.log()


def test_a_default_mount_is_open_with_default_permissions(shared: Mount, other: User) -> None:
    """Root's mount lets the user in by default, and the kernel (default_permissions) does
    the checks."""
    options = mount_options(shared.path)
    assert {"allow_other", "default_permissions"} <= options, options
    uid, gid, mode = other.value("stat", str(shared.path))
    assert (uid, gid, stat.S_IMODE(mode)) == (0, 0, 0o1777)


def test_explicit_allow_other_still_works(public_dir: Path, other: User) -> None:
    """fstab lines written for the old default keep working."""
    with dmemfs(public_dir, f"{OPTIONS},allow_other", name="explicit") as mount:
        assert "allow_other" in mount_options(mount.path)
        assert other.status("stat", str(mount.path)) == "ok"
    assert mount.exit_code == 0, mount.log()


def test_a_user_uses_its_own_files_on_a_default_mount(shared: Mount, other: User) -> None:
    """Create, write, read, map and truncate, as on tmpfs."""
    f = shared.path / "users-own"
    results = other.run(("create", str(f), "abc", 0o600), ("write", str(f), "def"),
                        ("read", str(f)), ("mmap_write", str(f)), ("read", str(f)),
                        ("truncate", str(f), 2), ("read", str(f)))
    assert [status for status, _ in results] == ["ok"] * 7, results
    assert [results[2][1], results[4][1], results[6][1]] == ["abcdef", "zbcdef", "zb"]
    assert f.read_bytes() == b"zb"


# -- the kernel's permission checks on a mount open to all ------------------------------------


def test_created_files_belong_to_their_creator(shared: Mount, other: User) -> None:
    """Files, directories and symlinks the user makes in the 1777 root are its own.

    The daemon takes the owner from the request's credentials; root sees the same owner.
    """
    f, d, link = shared.path / "own-file", shared.path / "own-dir", shared.path / "own-link"
    results = other.run(("create", str(f), "mine", 0o640), ("mkdir", str(d), 0o750),
                        ("create", str(d / "inner"), "", 0o600), ("symlink", f.name, str(link)),
                        ("stat", str(f)))
    assert [status for status, _ in results] == ["ok"] * 5, results
    assert results[4][1][:2] == [other.uid, other.gid]
    for path, mode in ((f, 0o640), (d, 0o750), (d / "inner", 0o600), (link, 0o777)):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (other.uid, other.gid), path
        assert stat.S_IMODE(st.st_mode) == mode, path
    assert os.readlink(link) == f.name
    assert f.read_bytes() == b"mine"
    assert other.value("read", str(f)) == "mine"


def test_user_cannot_write_a_root_file(shared: Mount, other: User) -> None:
    """A root-owned 0644 file: the user may read it but not write or truncate it (EACCES)."""
    f = root_file(shared.path / "root-0644", b"kept", 0o644)
    results = other.run(("read", str(f)), ("write", str(f), "x"), ("truncate", str(f), 0))
    assert [status for status, _ in results] == ["ok", "EACCES", "EACCES"], results
    assert results[0][1] == "kept"
    assert f.read_bytes() == b"kept"
    f.chmod(0o646)  # the same write, allowed by the mode: the check follows the mode
    assert other.status("write", str(f), "+") == "ok"
    assert f.read_bytes() == b"kept+"


def test_user_cannot_read_a_private_root_file(shared: Mount, other: User) -> None:
    """A root-owned 0600 file can be looked at (stat) but not read."""
    f = root_file(shared.path / "root-0600", b"secret", 0o600)
    results = other.run(("stat", str(f)), ("read", str(f)))
    assert [status for status, _ in results] == ["ok", "EACCES"], results
    assert results[0][1][:2] == [0, 0]


def test_user_cannot_create_in_a_root_directory(shared: Mount, other: User) -> None:
    """A root-owned 0755 directory takes no new names from the user."""
    d = shared.path / "root-dir"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    results = other.run(("listdir", str(d)), ("create", str(d / "x"), "", 0o644),
                        ("mkdir", str(d / "y"), 0o755))
    assert [status for status, _ in results] == ["ok", "EACCES", "EACCES"], results
    assert os.listdir(d) == []


def test_sticky_directory_protects_other_users_files(shared: Mount, other: User) -> None:
    """In a 1777 directory the user may remove its own files but not root's (EPERM).

    The same root file in a 0777 directory without the sticky bit can be removed, so the
    sticky bit the daemon stores is what stops it.
    """
    sticky, plain = shared.path / "sticky", shared.path / "plain"
    for d, mode in ((sticky, 0o1777), (plain, 0o777)):
        d.mkdir()
        d.chmod(mode)
        root_file(d / "roots", b"r", 0o666)
    assert stat.S_IMODE(os.stat(sticky).st_mode) == 0o1777
    results = other.run(
        ("unlink", str(sticky / "roots")),
        ("rename", str(sticky / "roots"), str(sticky / "moved")),
        ("create", str(sticky / "users"), "u", 0o644),
        ("unlink", str(sticky / "users")),
        ("unlink", str(plain / "roots")))
    assert [status for status, _ in results] == ["EPERM", "EPERM", "ok", "ok", "ok"], results
    assert os.listdir(sticky) == ["roots"]
    assert os.listdir(plain) == []


def test_user_cannot_chmod_or_chown_root_files(shared: Mount, other: User) -> None:
    """chmod and chown of root's file are EPERM; mode and owner stay as they were.

    On its own file the user may chmod, but may not give it away to root.
    """
    f = root_file(shared.path / "root-attrs", b"a", 0o666)
    mine = shared.path / "user-attrs"
    results = other.run(
        ("chmod", str(f), 0o777),
        ("chown", str(f), other.uid, other.gid),
        ("chown", str(f), -1, other.gid),
        ("create", str(mine), "", 0o644),
        ("chmod", str(mine), 0o600),
        ("chown", str(mine), 0, 0))
    assert [status for status, _ in results] == ["EPERM", "EPERM", "EPERM", "ok", "ok",
                                                 "EPERM"], results
    st = os.stat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o666)
    st = os.stat(mine)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (other.uid, other.gid, 0o600)


def test_user_write_clears_setuid(shared: Mount, other: User) -> None:
    """A write by an unprivileged owner drops the setuid and setgid bits of its file.

    The kernel turns the write into a mode change that the daemon has to store; a
    setuid file that kept its bit after being rewritten would be a privilege hole.
    """
    f = shared.path / "suid"
    results = other.run(("create", str(f), "a", 0o755), ("chmod", str(f), 0o6755),
                        ("stat", str(f)), ("write", str(f), "b"), ("stat", str(f)))
    assert [status for status, _ in results] == ["ok"] * 5, results
    assert stat.S_IMODE(results[2][1][2]) == 0o6755
    assert stat.S_IMODE(results[4][1][2]) == 0o755
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o755
    assert f.read_bytes() == b"ab"


@pytest.fixture(scope="module")
def shared_tmpfs(public_dir: Path) -> Iterator[Path]:
    """A tmpfs beside the shared mount: the oracle for what the kernel does to modes."""
    with kernel_fs(public_dir / "oracle", "tmpfs", "size=16M,mode=1777") as path:
        yield path


def _write_through_inherited_fd(path: Path, user: User) -> None:
    """Root opens the file and hands the descriptor to a child running as *user*, which
    writes while root keeps it open: the kernel judges the writer, not the opener."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        subprocess.run(as_user(user.uid, user.gid, user.python, "-I", "-c",
                               f"import os; os.write({fd}, b'c')"),
                       pass_fds=(fd,), check=True, timeout=60)
    finally:
        os.close(fd)


KILLERS: dict[str, Callable[[Path, User], None]] = {
    "write by the owner": lambda f, u: _ok(u.run(("write", str(f), "b"))),
    "truncate by the owner": lambda f, u: _ok(u.run(("truncate", str(f), 1))),
    "O_TRUNC open by the owner": lambda f, u: _ok(u.run(("open_trunc", str(f)))),
    "chmod by the owner": lambda f, u: _ok(u.run(("chmod", str(f), 0o4755))),
    "mmap write and msync by the owner": lambda f, u: _ok(u.run(("mmap_write", str(f)))),
    "write by the owner through root's fd": _write_through_inherited_fd,
    "write by root": lambda f, u: _append(f, b"r"),
    "truncate by root": lambda f, u: os.truncate(f, 1),
    "O_TRUNC open by root": lambda f, u: os.close(os.open(f, os.O_WRONLY | os.O_TRUNC)),
    "chown by root": lambda f, u: os.chown(f, u.uid, u.gid),
    "chown -1 -1 by root": lambda f, u: os.chown(f, -1, -1),
}


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _ok(results: list[tuple[str, Any]]) -> None:
    assert [status for status, _ in results] == ["ok"] * len(results), results


@pytest.mark.parametrize("mode", [0o6755, 0o6745, 0o4711, 0o2775])
@pytest.mark.parametrize("change", KILLERS)
def test_suid_and_sgid_are_cleared_as_on_tmpfs(shared: Mount, shared_tmpfs: Path, other: User,
                                               change: str, mode: int) -> None:
    """Under killpriv v2 the daemon, not the kernel, clears set-user-ID and set-group-ID
    bits: on writes, truncates and O_TRUNC opens by a caller without CAP_FSETID, and on
    every chown.  tmpfs, where the kernel does it, is the oracle for each case."""
    modes = []
    for where in (shared.path, shared_tmpfs):
        f = where / f"killpriv-{abs(hash((change, mode)))}"
        f.write_bytes(b"a")
        os.chown(f, other.uid, other.gid)
        f.chmod(mode)
        KILLERS[change](f, other)
        modes.append(_mode_seen(f))
        f.unlink()
    assert modes[0] == modes[1], f"dmemfs {modes[0]}, tmpfs {modes[1]} (cached, fresh)"


def _mode_seen(path: Path) -> tuple[int, int]:
    """(the mode stat(1) shows, which may come from the kernel's cache; the mode a full
    stat shows, for which a FUSE kernel asks the daemon)."""
    cached = subprocess.run(["stat", "-c", "%a", str(path)], capture_output=True, text=True,
                            check=True).stdout.strip()
    return int(cached, 8), stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o2746, 0o2756, 0o6756, 0o4746])
@pytest.mark.parametrize("op", ["write", "truncate", "open_trunc"])
def test_a_stranger_to_the_group_loses_set_group_id_as_on_tmpfs(
        shared: Mount, shared_tmpfs: Path, other: User, op: str, mode: int) -> None:
    """A caller outside the file's group (root's file, writable by others) loses
    set-group-ID even where the file is not group-executable (setattr_should_drop_sgid,
    Linux 6.2 and later); tmpfs is the oracle."""
    modes = []
    for where in (shared.path, shared_tmpfs):
        f = where / f"stranger-{op}-{mode:o}"
        f.write_bytes(b"a")
        f.chmod(mode)
        args: tuple[Any, ...] = (op, str(f), "b") if op == "write" else \
            (op, str(f), 0) if op == "truncate" else (op, str(f))
        _ok(other.run(args))
        modes.append(_mode_seen(f))
        f.unlink()
    assert modes[0] == modes[1], f"dmemfs {modes[0]}, tmpfs {modes[1]} (cached, fresh)"


# -- a user's view, compared with tmpfs -------------------------------------------------------

# The tree the conformance matrix works on, built by root on dmemfs and on tmpfs alike:
# (path, directory?, mode, owner: root's or the user's).  Directories cover the cases the
# kernel's may_create, may_delete and the sticky and set-group-ID rules tell apart.
CONFORMANCE_TREE: list[tuple[str, bool, int, str]] = [
    ("d755", True, 0o755, "root"), ("d755/f644", False, 0o644, "root"),
    ("d755/f600", False, 0o600, "root"), ("d755/f666", False, 0o666, "root"),
    ("d777", True, 0o777, "root"), ("d777/root", False, 0o644, "root"),
    ("d777/mine", False, 0o600, "user"), ("d777/sub", True, 0o755, "root"),
    ("d1777", True, 0o1777, "root"), ("d1777/root", False, 0o666, "root"),
    ("d1777/mine", False, 0o644, "user"), ("d1777/rootdir", True, 0o777, "root"),
    ("d2777", True, 0o2777, "root"), ("d2777/mine", False, 0o4755, "user"),
    ("d700", True, 0o700, "root"), ("d700/f", False, 0o666, "root"),
    ("d311", True, 0o311, "root"), ("d311/f", False, 0o644, "root"),
    ("mydir", True, 0o755, "user"), ("mydir/rootfile", False, 0o600, "root"),
    ("mydir/ro", False, 0o444, "user"),
]


def conformance_ops(base: Path, uid: int, gid: int) -> dict[str, list[Op]]:
    """Groups of operations the user does on the tree under *base*; each group on a fresh
    tree, each operation in a group on a path of its own, so that the groups' results do
    not depend on each other."""
    files = [base / p for p, is_dir, _, _ in CONFORMANCE_TREE if not is_dir]
    dirs = [base / p for p, is_dir, _, _ in CONFORMANCE_TREE if is_dir]
    return {
        "look": [op for f in files for op in (("stat", str(f)), ("access", str(f), os.W_OK))]
        + [op for d in dirs for op in (("listdir", str(d)), ("open_dir", str(d)))],
        "read": [("read", str(f)) for f in files],
        "write": [("write", str(f), "w") for f in files],
        "truncate": [("truncate", str(f), 1) for f in files],
        "open_trunc": [("open_trunc", str(f)) for f in files],
        "chmod": [("chmod", str(p), 0o640) for p in files + dirs],
        "chown to self": [("chown", str(f), uid, gid) for f in files],
        "chown to root": [("chown", str(f), 0, -1) for f in files],
        "touch": [("utime", str(f), None) for f in files],
        "set times": [("utime", str(f), SET_TIME) for f in files],
        "setxattr": [("setxattr", str(f), "user.k", "v") for f in files],
        "create": [("create", str(d / "new"), "x", 0o6777) for d in dirs],
        "mkdir": [("mkdir", str(d / "newdir"), 0o2777) for d in dirs],
        "symlink": [("symlink", "target", str(d / "link")) for d in dirs],
        "link": [("link", str(f), str(f) + ".link") for f in files],
        "unlink": [("unlink", str(f)) for f in files],
        "rename in place": [("rename", str(f), str(f) + ".moved") for f in files],
        "rename away": [("rename", str(f), str(base / "mydir" / f"{f.parent.name}-{f.name}"))
                        for f in files],
        "rmdir": [("rmdir", str(d)) for d in dirs if d.name in ("sub", "rootdir")],
    }


def build_conformance_tree(base: Path, user: User) -> None:
    """CONFORMANCE_TREE under *base*, made by root."""
    base.mkdir(mode=0o755)
    for rel, is_dir, mode, owner in CONFORMANCE_TREE:
        path = base / rel
        if is_dir:
            path.mkdir()
        else:
            path.write_bytes(b"data")
        if owner == "user":
            os.chown(path, user.uid, user.gid)
        path.chmod(mode)


SET_TIME = 1_000_000_000  # what the "set times" group sets: seen in tree_shape


def tree_shape(base: Path) -> list[tuple[Any, ...]]:
    """What is under *base*, entry by entry: path, type, mode, owner, size, links, whether
    the mtime is SET_TIME, a symlink's target, the user xattrs and a file's bytes."""
    shape = []
    for root, dirnames, filenames in os.walk(base):
        for name in sorted(dirnames + filenames):
            path = Path(root) / name
            st = os.lstat(path)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(
                st.st_mode) else "file"
            mode = 0 if kind == "link" else stat.S_IMODE(st.st_mode)
            size = 0 if kind == "dir" else st.st_size  # a directory's size is the fs's own
            target = os.readlink(path) if kind == "link" else ""
            xattrs = () if kind == "link" else tuple(sorted(
                (n, os.getxattr(path, n)) for n in os.listxattr(path) if n.startswith("user.")))
            data = path.read_bytes() if kind == "file" else b""
            shape.append((str(path.relative_to(base)), kind, mode, st.st_uid, st.st_gid, size,
                          st.st_nlink if kind == "file" else 0, st.st_mtime == SET_TIME,
                          target, xattrs, data))
    return sorted(shape)


def takes_user_xattrs(path: Path) -> bool:
    """Whether the filesystem at *path* stores user.* xattrs (tmpfs does from Linux 6.6)."""
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        return False
    finally:
        probe.unlink()


def test_a_user_sees_a_default_mount_as_tmpfs(public_dir: Path, shared_tmpfs: Path,
                                               other: User, data_path: str) -> None:
    """A conformance matrix run as the unprivileged user: for every group of operations
    (look, read, write, truncate, chmod, chown, times, xattrs, create, mkdir, links, unlink,
    rename, rmdir) on a tree of root's and the user's files in directories of every kind
    (0755, 0777, sticky, set-group-ID, 0700, search-only, the user's own), each operation
    must end as on tmpfs (the same errno, or success), and the trees afterwards must match
    (tree_shape: modes, owners, sizes, links, set times, symlink targets, xattrs, bytes)."""
    differences: list[str] = []
    with dmemfs(public_dir, f"{OPTIONS},{path_options(data_path)}",
                name=f"conformance-{data_path}") as mount:
        groups = conformance_ops(Path("BASE"), other.uid, other.gid)
        if not takes_user_xattrs(shared_tmpfs):
            del groups["setxattr"]  # no oracle for it before Linux 6.6
        for n, (group, ops) in enumerate(groups.items()):
            results, shapes = [], []
            for where in (mount.path, shared_tmpfs):
                base = where / f"conformance-{data_path}-{n}"
                try:
                    build_conformance_tree(base, other)
                    resolved = [tuple(str(a).replace("BASE", str(base)) if isinstance(a, str)
                                      else a for a in op) for op in ops]
                    # an error's message names the path; a success's value must agree too
                    results.append([status if status != "ok" else f"ok {value!r}"
                                    for status, value in other.run(*resolved)])
                    shapes.append(tree_shape(base))
                finally:
                    shutil.rmtree(base, ignore_errors=True)
            for op, ours, theirs in zip(ops, *results, strict=True):
                if ours != theirs:
                    differences.append(f"{group}: {op}: dmemfs {ours}, tmpfs {theirs}")
            if shapes[0] != shapes[1]:
                only = sorted(set(shapes[0]) ^ set(shapes[1]))
                differences.append(f"{group}: trees differ (dmemfs or tmpfs only): {only}")
            # A group that only succeeds or only fails on tmpfs too cannot tell a grant
            # from a refusal; every group has both ("chown to root" is always refused).
            outcomes = {r.startswith("ok") for r in results[1]}
            if outcomes != ({False} if group == "chown to root" else {True, False}):
                differences.append(f"{group}: the matrix has only {outcomes} on tmpfs")
    assert not differences, "\n".join(differences)
    assert mount.exit_code == 0, mount.log()


@pytest.mark.parametrize("path", ["region", "passthrough"])
def test_writes_send_no_getxattr_after_a_files_first(tmp_path: Path, path: str) -> None:
    """With killpriv v2 the kernel sets SB_NOSEC: it asks for security.capability once per
    inode, at its first write, and marks the inode S_NOSEC (before: once per write).
    1,000 4 KiB writes to one file, then 100 to each of 10 files.  On the passthrough
    path no write reaches the daemon at all."""
    served = path == "region"
    port = free_port()

    def count(values: dict[str, float], op: str) -> float:
        return sum(v for k, v in values.items()
                   if k.startswith(f'dmemfs_fuse_requests_total{{op="{op}"'))

    on = "off" if served else "on"
    with dmemfs(tmp_path, f"{OPTIONS},metrics={port},passthrough={on}") as mount:
        for name, writes in [("one", 1000), *((f"ten{n}", 100) for n in range(10))]:
            fd = os.open(mount.path / name, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for i in range(writes):
                    os.pwrite(fd, b"w" * 4096, i * 4096)
            finally:
                os.close(fd)
            if name == "one":
                first = metrics(port)
                assert (count(first, "write"), count(first, "getxattr")) == (
                    (1000, 1) if served else (0, 1))
        values = metrics(port)
    assert (count(values, "write"), count(values, "getxattr")) == (
        (2000, 11) if served else (0, 11))
    assert mount.exit_code == 0, mount.log()


# -- the control socket -----------------------------------------------------------------------


def ask_as_root(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """One control request over the socket at *path*, as dmemctl sends it: the whole reply."""
    reply: dict[str, Any] = json.loads(dmemctl.exchange(path, payload))
    return reply


def test_control_socket_is_root_only(shared: Mount, other: User) -> None:
    """The control socket is root's, mode 0600; the user cannot connect, root can ask."""
    path = socket_path(str(shared.path))
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert other.status("connect", str(path)) == "EACCES"
    reply = ask_as_root(path, {"cmd": "status"})
    assert reply["ok"] is True and reply["result"]["total_dpages"] == 32


def test_peer_credentials_refuse_other_users(tmp_path: Path, public_dir: Path, other: User,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the socket file opened to everyone, the daemon still refuses a non-root peer.

    The daemon puts its socket in a searchable run directory (DMEMFS_RUN_DIR), so the
    only thing between the user and the daemon is first the socket's 0600 mode (EACCES),
    and, once the test makes it 0666, the SO_PEERCRED check: the user gets an EPERM
    reply and no result, while root on the same socket gets its answer.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=public_dir))
    run_dir.chmod(0o755)
    monkeypatch.setenv("DMEMFS_RUN_DIR", str(run_dir))  # the daemon inherits it
    with dmemfs(tmp_path, OPTIONS) as mount:
        path = run_dir / socket_path(str(mount.path)).name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        request = json.dumps({"cmd": "status"})
        assert other.status("ask", str(path), request) == "EACCES"
        path.chmod(0o666)
        status, (text, ending) = other.run(("ask", str(path), request))[0]
        assert status == "ok", text  # connected: the file mode no longer stops it
        # The daemon reads the request, then answers EPERM: the refusal arrives whole.
        assert ending is None, ending
        reply = json.loads(text)
        assert reply["ok"] is False and reply["errno"] == errno.EPERM, reply
        assert "result" not in reply and reply["error"] == "only root may ask"
        assert f"uid {other.uid} refused" in mount.log()
        # the same request from root on the same socket is answered
        assert ask_as_root(path, {"cmd": "status"})["result"]["total_dpages"] == 32
    assert mount.exit_code == 0, mount.log()
    assert not path.exists(), "the daemon left its socket behind"


# -- the metrics endpoint ---------------------------------------------------------------------


def tcp_listeners(port: int) -> list[tuple[str, int]]:
    """(address, socket inode) of every TCP socket listening on *port*, IPv4 and IPv6."""
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: TCP_LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words, each in host byte order
            if sys.byteorder == "little":
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((socket.inet_ntop(family, raw), int(fields[9])))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process *pid* holds open."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[len("socket:["):-1]))
    return out


def global_addresses() -> list[tuple[socket.AddressFamily, str]]:
    """This machine's non-loopback (scope global) addresses, from ip(8)."""
    result = subprocess.run(["ip", "-o", "addr", "show", "scope", "global"],
                            capture_output=True, text=True, check=True)
    out = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields[2] in ("inet", "inet6"):
            family = socket.AF_INET if fields[2] == "inet" else socket.AF_INET6
            out.append((family, fields[3].split("/")[0]))
    return out


def connect_errno(family: socket.AddressFamily, address: str, port: int) -> int:
    """0 if a TCP connection to *address*:*port* is accepted, else its errno."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        return sock.connect_ex((address, port))


def test_metrics_listen_on_loopback_only(tmp_path: Path) -> None:
    """metrics=PORT binds 127.0.0.1 alone: other addresses of the machine are refused.

    The daemon's own socket (matched by inode) is the only listener on the port, on
    127.0.0.1.  For each non-loopback address, a wildcard listener of the test on another
    port is reachable there, so the refusal on the metrics port comes from the binding,
    not from routing or a firewall.
    """
    if shutil.which("ip") is None:
        pytest.fail("this test needs ip(8) (iproute2) to list the machine's addresses")
    addresses = global_addresses()
    if not addresses:
        pytest.skip("the machine has no non-loopback address to try")
    port = free_port()
    with dmemfs(tmp_path, f"{OPTIONS},metrics={port}") as mount:
        listeners = tcp_listeners(port)
        assert [address for address, _ in listeners] == ["127.0.0.1"], listeners
        assert listeners[0][1] in socket_inodes(mount.proc.pid), "not the daemon's socket"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
        for family, address in addresses:
            wildcard = "0.0.0.0" if family == socket.AF_INET else "::"
            with socket.socket(family, socket.SOCK_STREAM) as control:
                if family == socket.AF_INET6:
                    control.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                control.bind((wildcard, 0))
                control.listen(1)
                assert connect_errno(family, address, control.getsockname()[1]) == 0, address
            assert connect_errno(family, address, port) == errno.ECONNREFUSED, address
    assert mount.exit_code == 0, mount.log()
