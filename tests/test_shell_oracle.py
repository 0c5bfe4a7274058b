"""Shell commands on a dmemfs, checked against the very same commands on a tmpfs.

Each scenario is a list of steps, every one a ``bash -c`` command run with its
working directory at the root of the filesystem under test.  The scenario runs
once on a fresh tmpfs (the oracle) and once on a fresh dmemfs; for every step
the exit status, stdout and stderr (with the root path replaced) must match.
A snapshot of the whole tree (types, modes, owners, link counts, sizes of
non-directories, symlink targets, content hashes, user.* xattrs) taken at the
end must match as well.

Things that legitimately differ are never printed: inode numbers, block
counts, st_blksize, directory sizes and clock-driven times (explicitly set
times are compared).  The oracle is also checked against each step's stated
expectation, so a typo in a scenario cannot turn into two matching errors.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import Mount, dmemfs, kernel_fs, path_options

DATA_SIZE = 5 * (1 << 20) + 12345  # spans three 2 MiB dpages
AS_USER = "setpriv --reuid=1000 --regid=1000 --clear-groups"
LONG = "$(printf 'n%.0s' $(seq 256))"  # a 256-byte name
LONGEST = "$(printf 'n%.0s' $(seq 255))"  # a 255-byte name

SNAPSHOT = r"""
find . -mindepth 1 \( -type d -printf '%p d %m %n %U %G\n' \) \
    -o \( -type l -printf '%p l %m %n %U %G %s -> %l\n' \) \
    -o -printf '%p %y %m %n %U %G %s\n' | LC_ALL=C sort
find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
find . -mindepth 1 \( -type f -o -type d \) -print0 | LC_ALL=C sort -z |
    while IFS= read -r -d '' p; do
        printf '%s:' "$p"; getfattr -h -d -e hex --absolute-names "$p" 2>&1 |
            grep -v '^# file' | LC_ALL=C sort | tr '\n' ' '; echo
    done
"""


@dataclass(frozen=True)
class Step:
    """One shell command; *fails* is a piece of the oracle's stderr when it must fail."""

    cmd: str
    fails: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What one command did: exit status, stdout, stderr (root path replaced by $ROOT)."""

    rc: int
    out: str
    err: str


def ok(cmd: str) -> Step:
    """A step that must succeed on the oracle."""
    return Step(cmd)


def fails(cmd: str, message: str) -> Step:
    """A step that must fail on the oracle with *message* in its stderr."""
    return Step(cmd, message)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deterministic pseudo-random bytes, outside both filesystems."""
    path = tmp_path_factory.mktemp("data") / "data.bin"
    path.write_bytes(random.Random(20240601).randbytes(DATA_SIZE))
    return path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs, the oracle; always unmounted."""
    with kernel_fs(tmp_path / "tmpfs", "tmpfs", "size=256M,mode=1777") as path:
        yield path


@pytest.fixture
def dmem(tmp_path: Path, data_path: str) -> Iterator[Mount]:
    """A 64 MiB dmemfs on *data_path*, which other users may enter by default, as the tmpfs
    allows."""
    with dmemfs(tmp_path, f"size=64M,pagesize=2M,{path_options(data_path)}") as mount:
        yield mount
    assert mount.exit_code == 0, f"daemon exit code {mount.exit_code}:\n{mount.log()}"


def run_steps(root: Path, steps: list[Step], data: Path) -> list[Outcome]:
    """Run every step in *root*, then the snapshot; return what each did."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C",
           "TZ": "UTC", "HOME": "/", "DATA": str(data)}
    outcomes = []
    for step in [*steps, Step(SNAPSHOT)]:
        proc = subprocess.run(["bash", "-c", step.cmd], cwd=root, env=env, capture_output=True,
                              timeout=60, check=False)
        outcomes.append(Outcome(proc.returncode,
                                proc.stdout.decode(errors="replace").replace(str(root), "$ROOT"),
                                proc.stderr.decode(errors="replace").replace(str(root), "$ROOT")))
    return outcomes


def check_against_oracle(steps: list[Step], oracle_root: Path, dmem_root: Path,
                         data: Path) -> None:
    """Run *steps* on both roots; fail listing every step whose outcome differs."""
    expected = run_steps(oracle_root, steps, data)
    for step, result in zip(steps, expected, strict=False):
        if step.fails is None:
            assert result.rc == 0, f"oracle: {step.cmd!r} failed: {result}"
        else:
            assert result.rc != 0 and step.fails in result.err, \
                f"oracle: {step.cmd!r} should fail with {step.fails!r}: {result}"
    got = run_steps(dmem_root, steps, data)
    differences = [
        f"$ {cmd}\n  tmpfs:  {want}\n  dmemfs: {have}"
        for cmd, want, have in zip([s.cmd for s in steps] + ["<snapshot>"], expected, got,
                                   strict=True)
        if want != have
    ]
    assert not differences, "dmemfs differs from tmpfs:\n" + "\n".join(differences)


SCENARIOS: dict[str, list[Step]] = {
    "contents": [
        ok("printf 'hello\\nworld\\n' > a && cat a"),
        ok("cat a a > b && printf 'more\\n' >> b && cat b && wc -c b"),
        ok("cp a c && cmp a c && stat -c '%s %h %F' c"),
        ok('cp "$DATA" big && sha256sum big && stat -c %s big'),
        ok('dd if="$DATA" of=part bs=4096 skip=3 count=50 status=none && sha256sum part'),
        ok('dd if="$DATA" of=big bs=1000 seek=777 count=3 conv=notrunc status=none'
           ' && sha256sum big'),
        ok('dd if="$DATA" of=big bs=65536 seek=40 conv=notrunc status=none'
           ' && sha256sum big && stat -c %s big'),
        ok("truncate -s 3M sparse && sha256sum sparse && stat -c %s sparse"),
        ok('dd if="$DATA" of=sparse bs=1 seek=2097148 count=9 conv=notrunc status=none'
           ' && sha256sum sparse && od -An -tx1 -j 2097144 -N 16 sparse'),
        ok('dd if="$DATA" of=far bs=4096 seek=1000 count=1 status=none'
           ' && stat -c %s far && sha256sum far'),
        ok("truncate -s 1000 big && sha256sum big && stat -c %s big"),
        ok("truncate -s 5M big && sha256sum big && od -An -tx1 -j 990 -N 20 big"),
        ok("truncate -s -1M big && stat -c %s big && truncate -s +7 big && stat -c %s big"),
        ok("sha256sum big && tail -c 3000 sparse | sha256sum"),
        ok("dd if=/dev/zero of=z bs=1M count=3 status=none && cat z a > za && sha256sum z za"),
        ok('dd if="$DATA" of=direct bs=1M count=2 oflag=direct status=none && sha256sum direct'),
        ok('dd if=direct of=/dev/stdout bs=1M iflag=direct status=none | sha256sum'),
        ok('for i in 1 2 3 4; do (for j in $(seq 150); do echo "$i $j" >> log; done) & done;'
           " wait; LC_ALL=C sort log | sha256sum && wc -l < log && rm log"),  # order varies
        ok('for i in $(seq 4); do cat "$DATA"; done > huge && stat -c %s huge'
           ' && sha256sum huge && cmp huge - < huge && rm huge'),
        ok("touch lk && flock -n lk -c 'flock -n lk true; echo inner=$?'"),
        ok(": > a && stat -c %s a && cat a"),
        ok("printf x > a && truncate -s 0 a && truncate -s 2 a && od -An -tx1 a"),
        fails("cat missing", "No such file or directory"),
        fails("cat missing a", "No such file or directory"),
        fails("cp missing x", "No such file or directory"),
        fails("mkdir d && cat d", "Is a directory"),
        fails("echo x > d", "Is a directory"),
        fails("truncate -s 1 d", "Is a directory"),
        fails("cp d e", "omitting directory"),
        fails("dd if=a of=missing/x status=none", "No such file or directory"),
        ok("ls -A1"),
    ],
    "names": [
        ok("mkdir -p d1/d2/d3 && stat -c '%n %h %a %F' d1 d1/d2 d1/d2/d3"),
        ok("touch d1/f d1/d2/g && ls -A1 d1 d1/d2"),
        fails("rmdir d1", "Directory not empty"),
        fails("rmdir d1/f", "Not a directory"),
        fails("rmdir missing", "No such file or directory"),
        fails("mv d1 d1/d2/", "subdirectory of itself"),
        fails("mv d1 d1/d2/d3/x", "subdirectory of itself"),
        ok("mv d1/f d1/d2/g && ls -A1 d1 d1/d2 && stat -c '%n %h' d1 d1/d2"),
        ok("mkdir e && mv d1/d2 e/ && stat -c '%n %h' d1 e e/d2 && ls -A1 e/d2"),
        ok("mkdir full && touch full/x"),
        fails("mv -T e/d2 full", "Directory not empty"),
        ok("mkdir empty && mv -T e/d2 empty && ls -A1 empty && stat -c '%n %h' . e empty"),
        fails("mv -T empty/g empty/d3", "cannot overwrite directory"),
        ok("touch plain"),
        fails("mv -T empty plain", "cannot overwrite non-directory"),
        ok("mv plain plain2 && mv plain2 plain && ls -A1"),
        ok("ln plain hard && stat -c '%n %h' plain hard"),
        fails("ln plain hard", "File exists"),
        fails("mv hard plain", "are the same file"),
        ok("rm hard && ln plain hard && echo data > hard && cat plain && rm hard"
           " && stat -c '%n %h' plain"),
        fails("ln d1 dlink", "not allowed for directory"),
        ok("ln -s plain sym && readlink sym && stat -c '%N %s %F %a' sym && cat sym"),
        ok("ln -s nowhere dangling && readlink dangling && stat -c '%N %s' dangling"),
        fails("cat dangling", "No such file or directory"),
        fails("ln -s x sym", "File exists"),
        ok("ln -s d1 dsym && ls -A1 dsym/ && cd dsym && pwd -P && cd .. && rm dsym"),
        ok("ln -s ../plain empty/up && cat empty/up && readlink -f empty/up"),
        fails("rm d1", "Is a directory"),
        ok("rm -r d1 e && ls -A1"),
        fails("mkdir plain", "File exists"),
        fails("mkdir -p plain/x", "Not a directory"),
        fails("touch plain/x", "Not a directory"),
        fails(f"touch {LONG}", "File name too long"),
        fails(f"mkdir {LONG}", "File name too long"),
        fails(f"mv plain {LONG}", "File name too long"),
        fails(f"ln -s plain {LONG}", "File name too long"),
        fails(f"stat -c %n {LONG}", "File name too long"),
        ok(f"touch {LONGEST} && ls | wc -L && rm {LONGEST}"),
        ok("ln -s \"$(printf 'x%.0s' $(seq 4095))\" longlink && readlink longlink | wc -c"
           " && stat -c %s longlink && rm longlink"),
        fails("ln -s \"$(printf 'x%.0s' $(seq 4096))\" longlink", "File name too long"),
        ok("mkfifo fifo && stat -c '%n %F %a' fifo && { echo through > fifo & } && cat fifo"),
        ok("ln -P sym symhard && stat -c '%n %h %F' sym symhard && readlink symhard"),
        ok("touch -- $'\\xff\\xfe' $'new\\nline' 'sp ace' '-dash' && ls -A1b"
           " && rm -- $'\\xff\\xfe' $'new\\nline' 'sp ace' '-dash'"),
        ok("mknod cdev c 1 3 && mknod bdev b 7 0 && stat -c '%n %F %t:%T %a' cdev bdev"),
        ok("mknod -m 600 node p && stat -c '%n %F %a' node"),
        ok("mkdir gone && cd gone && rmdir ../gone && ls -A1 && stat -c %h ."),
        fails("mkdir gone2 && cd gone2 && rmdir ../gone2 && touch x", "No such file or directory"),
        ok("mkdir -p t/a/b && touch t/a/b/f t/a/g && ln -s b t/a/l && cp -a t t2 && rm -r t"),
        ok("cp -al t2 t3 && stat -c '%n %h' t2/a/g t3/a/g && rm -r t3"),
        ok("mv t2 tree && find tree | LC_ALL=C sort"),
        ok("rm -rf tree/a/b && find tree | LC_ALL=C sort"),
        fails("rm -r missing", "No such file or directory"),
        ok("ls -A1"),
    ],
    "attributes": [
        ok("touch f && stat -c '%a %u %g %h %s' f"),
        ok("chmod 640 f && stat -c %a f && chmod 7777 f && stat -c %a f"),
        ok("chmod u-s,g-s,o-t f && stat -c %a f && chmod 0 f && stat -c %a f"),
        ok("chown 123:456 f && stat -c '%u %g' f && chown :789 f && stat -c '%u %g' f"),
        ok("chmod 2745 f && chown 5 f && stat -c '%a %u' f"),
        ok("ln -s f sym && chown -h 55:66 sym && stat -c '%n %u %g' sym f"),
        ok("mkdir g && chown 0:1234 g && chmod 2775 g && mkdir g/sub && touch g/file"
           " && mkfifo g/fifo && stat -c '%n %a %u %g' g g/sub g/file g/fifo"),
        ok("mkdir -m 1777 st && mkdir -m 000 z && mkdir -m 4755 s && stat -c '%n %a' st z s"),
        ok("umask 077 && touch u1 && mkdir u2 && mkfifo u3 && stat -c '%n %a' u1 u2 u3"),
        ok("umask 0 && touch u4 && mkdir u5 && stat -c '%n %a' u4 u5"),
        ok("touch -d '2020-02-03 04:05:06' t && stat -c '%Y' t"),
        ok("touch -m -d @1234567890 t && touch -a -d @1000000000 t && stat -c '%X %Y' t"),
        ok("touch -h -d @1500000000 sym && stat -c '%Y' sym"),
        ok("touch -d @1600000000 g && stat -c '%Y' g"),
        fails("chmod 644 missing", "No such file or directory"),
        fails("chown 1 missing", "No such file or directory"),
        fails("touch -c -d @5 missing && stat missing", "No such file or directory"),
        ok("ls -A1"),
    ],
    "suid_kill_on_chown": [
        ok("touch f && chmod 6755 f && chown 1000:1000 f && stat -c '%a %u %g' f"),
        ok("touch h && chmod 4700 h && chown 7 h && stat -c '%a %u' h"),
    ],
    "xattrs": [
        ok("touch f && mkdir d && mkfifo p && ln -s f sym"),
        ok("setfattr -n user.a -v hello f && getfattr -n user.a --only-values f && echo"),
        ok("setfattr -n user.b -v 0x00ff10 f && getfattr -n user.b -e hex f"),
        ok("setfattr -n user.empty f && getfattr -n user.empty f"),
        ok("getfattr -d f | LC_ALL=C sort"),
        fails("getfattr -n user.missing f", "No such attribute"),
        fails("setfattr -x user.missing f", "No such attribute"),
        ok("setfattr -x user.a f && getfattr -d f | LC_ALL=C sort"),
        ok("setfattr -n user.a -v one f && setfattr -n user.a -v two f"
           " && getfattr -n user.a --only-values f"),
        ok("setfattr -n user.d -v dirval d && getfattr -d d"),
        fails("setfattr -h -n user.s -v 1 sym", "Operation not permitted"),
        fails("setfattr -n user.p -v 1 p", "Operation not permitted"),
        ok("setfattr -n user.big -v \"$(head -c 65536 /dev/zero | tr '\\0' a)\" f"
           " && getfattr -n user.big --only-values f | wc -c"),
        fails("setfattr -n user.big2 -v \"$(head -c 65537 /dev/zero | tr '\\0' a)\" f",
              "Argument list too long"),
        ok("cp --preserve=xattr f f2 && getfattr -d f2 | LC_ALL=C sort | cut -c1-40"),
        ok("mv f f3 && getfattr -n user.b -e hex f3"),
        ok("ln f3 f4 && setfattr -n user.via -v link f4 && getfattr -n user.via f3"),
        fails("getfattr -n user.x missing", "No such file or directory"),
    ],
    "as_user": [
        ok("echo secret > rootfile && chmod 600 rootfile"),
        ok("mkdir shared && chmod 1777 shared && mkdir priv && chmod 700 priv && touch priv/x"),
        ok("mkdir open && chmod 777 open && touch open/rootowned shared/rootowned"),
        fails(f"{AS_USER} cat rootfile", "Permission denied"),
        fails(f"{AS_USER} ls priv", "Permission denied"),
        fails(f"{AS_USER} touch priv/new", "Permission denied"),
        fails(f"{AS_USER} bash -c 'echo x >> rootfile'", "Permission denied"),
        ok(f"{AS_USER} touch shared/mine && stat -c '%u %g %a' shared/mine"),
        ok(f"{AS_USER} bash -c 'echo hi >> shared/mine' && cat shared/mine"),
        fails(f"{AS_USER} rm -f shared/rootowned", "Operation not permitted"),
        fails(f"{AS_USER} mv shared/rootowned shared/y", "Operation not permitted"),
        ok(f"{AS_USER} rm -f open/rootowned && ls -A1 open"),
        fails(f"{AS_USER} chmod 777 rootfile", "Operation not permitted"),
        fails(f"{AS_USER} chown 1000 rootfile", "Operation not permitted"),
        fails(f"{AS_USER} chown 0 shared/mine", "Operation not permitted"),
        fails(f"{AS_USER} touch -d @1 rootfile", "Permission denied"),
        fails(f"{AS_USER} truncate -s 0 rootfile", "Permission denied"),
        fails(f"{AS_USER} setfattr -n user.x -v 1 rootfile", "Permission denied"),
        ok(f"{AS_USER} setfattr -n user.x -v 1 shared/mine && getfattr -d shared/mine"),
        ok(f"{AS_USER} chmod 2755 shared/mine && stat -c %a shared/mine"),
        ok(f"{AS_USER} chmod 755 shared/mine && {AS_USER} chgrp 0 shared/mine 2>&1;"
           " stat -c '%a %g' shared/mine"),
        ok("mkdir sg && chown 0:4321 sg && chmod 2777 sg"
           f" && {AS_USER} mkdir sg/sub && {AS_USER} touch sg/f"
           " && stat -c '%n %a %u %g' sg/sub sg/f"),
        ok(f"{AS_USER} mkdir shared/ud && {AS_USER} ln -s x shared/ud/l"
           " && stat -c '%n %u %g' shared/ud shared/ud/l"),
        fails(f"{AS_USER} ln rootfile shared/hl", "Operation not permitted"),
        ok(f"{AS_USER} cat /proc/self/status | grep -c '^Uid:.*1000'"),
    ],
    "open_descriptors": [
        ok("printf old > a && printf new > b && exec 3< a && mv b a && cat <&3 && echo && cat a"),
        ok("printf keep > c && exec 3< c && rm c && cat <&3 && echo && readlink /proc/self/fd/3"
           " && stat -L -c '%h %s' /proc/self/fd/3"),
        ok("printf x > d && exec 3>> d && rm d && echo more >&3 && cat /proc/self/fd/3"),
        ok("mkdir dd && exec 3< dd && rmdir dd && ls -A /proc/self/fd/3/"
           " && stat -L -c %h /proc/self/fd/3"),
        ok("printf 1234567 > e && exec 3<> e && truncate -s 3 e && cat <&3 && echo"),
        ok("ls -A1"),
    ],
    "suid_kill_on_write": [
        ok("touch s1 s2 && chmod 4777 s1 && chmod 6777 s2"),
        ok(f"{AS_USER} bash -c 'echo x >> s1' && stat -c %a s1"),
        ok(f"{AS_USER} truncate -s 0 s2 && stat -c %a s2"),
    ],
}

@pytest.mark.mount
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_tmpfs(name: str, tmpfs: Path, dmem: Mount, data_file: Path) -> None:
    check_against_oracle(SCENARIOS[name], tmpfs, dmem.path, data_file)
