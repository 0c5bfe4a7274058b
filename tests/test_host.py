"""Fitting the host: tools/install, the systemd units, man pages, bash completion, and
boot-time huge page reservation (dmemfs-hugepages).

The units are checked with ``systemd-analyze verify`` as tools/install lays them down
(staged with DESTDIR), inside a private mount namespace whose /usr/local is the staged
one, so that verify sees exactly the staged commands and man pages and nothing of the
host's.  Needs root (unshare, sysfs), man-db/groff and bash-completion.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import require_mounts

from dmemfs_fuse.errors import ConfigError
from dmemfs_fuse.host import bootreserve, cli, manpage
from dmemfs_fuse.host.options import OPTIONS
from dmemfs_fuse.insight import dmemctl
from dmemfs_fuse.memory.hugepages import node_path

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "tools" / "install"
VENV = Path(sys.executable).parent.parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
HUGE_2M = 2 * 1024 * 1024

STAGED_FILES = [
    "usr/local/sbin/dmemfs", "usr/local/sbin/dmemctl", "usr/local/sbin/dmemfs-hugepages",
    "etc/systemd/system/dmemfs@.service", "etc/systemd/system/dmemfs-hugepages.service",
    "usr/local/share/man/man8/dmemfs.8", "usr/local/share/man/man8/dmemctl.8",
    "usr/local/share/man/man8/dmemfs-hugepages.8",
    "usr/share/bash-completion/completions/dmemfs",
    "usr/share/bash-completion/completions/dmemctl",
    "usr/share/bash-completion/completions/dmemfs-hugepages",
    "etc/dmemfs/mnt-dmem.conf.example", "etc/dmemfs/hugepages.conf.example",
]

# Settings that give a service its own mount namespace (systemd.exec(5)): the FUSE mount
# made inside it would not propagate to the host.  See docs/operator.md.
NAMESPACING = {
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers", "ProtectSystem",
    "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths",
    "InaccessiblePaths", "ExecPaths", "NoExecPaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountAPIVFS", "MountImages",
    "ExtensionImages", "ExtensionDirectories", "DynamicUser", "LogNamespace", "MountFlags",
}


def require_root() -> None:
    require_mounts(fuse=False)  # unshare, sysfs nr_hugepages, tmpfs


def install(destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DESTDIR=str(destdir))
    return subprocess.run([str(INSTALL), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`DESTDIR=stage tools/install --venv <this venv>`, once for the module."""
    stage = tmp_path_factory.mktemp("stage")
    result = install(stage, "--venv", str(VENV))
    assert result.returncode == 0, result.stderr
    return stage


# -- tools/install ---------------------------------------------------------------------------

def test_staged_install_lays_down_every_file(staged: Path) -> None:
    laid = sorted(str(p.relative_to(staged)) for p in staged.rglob("*")
                  if p.is_file() or p.is_symlink())
    assert laid == sorted(STAGED_FILES)
    for name in ("dmemfs", "dmemctl"):
        link = staged / "usr/local/sbin" / name
        assert link.is_symlink() and link.resolve() == (VENV / "bin" / name).resolve()
    for rel in STAGED_FILES:
        path = staged / rel
        if not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            assert mode == (0o755 if "/sbin/" in rel else 0o644), f"{rel}: mode {mode:o}"
    assert (staged / "etc/dmemfs/hugepages.conf.example").read_text() == \
        (REPO / "systemd/hugepages.conf.example").read_text()
    assert (staged / "usr/share/bash-completion/completions/dmemctl").read_text() == \
        (REPO / "completions/dmemctl.bash").read_text()


def test_staged_commands_run(staged: Path) -> None:
    sbin = staged / "usr/local/sbin"
    for name in ("dmemfs", "dmemctl", "dmemfs-hugepages"):
        result = subprocess.run([str(sbin / name), "--version"], capture_output=True,
                                text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{name} "), result.stdout


def test_units_are_filled_in(staged: Path) -> None:
    for unit in ("dmemfs@.service", "dmemfs-hugepages.service"):
        text = (staged / "etc/systemd/system" / unit).read_text()
        assert not re.search(r"@[A-Z_]+@", text), f"{unit} has placeholders left"
        assert f"RequiresMountsFor={VENV.resolve()}" in text
    service = (staged / "etc/systemd/system/dmemfs@.service").read_text()
    assert "ExecStart=/usr/local/sbin/dmemfs dmemfs %f -f -o ${DMEMFS_OPTIONS}" in service
    hugepages = (staged / "etc/systemd/system/dmemfs-hugepages.service").read_text()
    assert "ExecStart=/usr/local/sbin/dmemfs-hugepages reserve" in hugepages
    assert "ExecStop=/usr/local/sbin/dmemfs-hugepages release" in hugepages


def test_install_keeps_existing_configs_and_is_repeatable(tmp_path: Path) -> None:
    mine = tmp_path / "etc/dmemfs/hugepages.conf.example"
    mine.parent.mkdir(parents=True)
    mine.write_text("node=0 pagesize=2M count=1   # mine\n")
    for _ in range(2):
        result = install(tmp_path, "--venv", str(VENV))
        assert result.returncode == 0, result.stderr
    assert mine.read_text() == "node=0 pagesize=2M count=1   # mine\n"
    assert "kept existing" in result.stderr


def test_uninstall_removes_what_install_laid_down(tmp_path: Path) -> None:
    assert install(tmp_path, "--venv", str(VENV)).returncode == 0
    conf = tmp_path / "etc/dmemfs/mnt-dmem.conf"
    conf.write_text("DMEMFS_OPTIONS=size=1G\n")
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir()
    (wants / "dmemfs@mnt-dmem.service").symlink_to("/etc/systemd/system/dmemfs@.service")
    (wants / "other.service").symlink_to("/etc/systemd/system/other.service")
    result = install(tmp_path, "--uninstall")
    assert result.returncode == 0, result.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                  if p.is_file() or p.is_symlink())
    assert left == ["etc/dmemfs/mnt-dmem.conf",
                    "etc/systemd/system/multi-user.target.wants/other.service"]
    assert "kept" in result.stderr


def test_install_refuses_staging_without_venv(tmp_path: Path) -> None:
    result = install(tmp_path)
    assert result.returncode != 0
    assert "needs --venv" in result.stderr
    assert not any(tmp_path.iterdir())


def test_install_refuses_a_venv_without_the_package(tmp_path: Path) -> None:
    fake = tmp_path / "venv/bin"
    fake.mkdir(parents=True)
    (fake / "python").symlink_to("/usr/bin/python3")
    result = install(tmp_path / "stage", "--venv", str(tmp_path / "venv"))
    assert result.returncode != 0
    assert "cannot import dmemfs_fuse" in result.stderr


# -- systemd units ---------------------------------------------------------------------------

def verify(stage: Path, *units: Path) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify, with the staged /usr/local (commands, man pages) in place and
    an empty /run (no runtime units of the host; verify leaves nothing there)."""
    require_root()
    script = ('mount --bind "$1/usr/local" /usr/local && mount -t tmpfs tmpfs /run && shift && '
              'exec systemd-analyze verify "$@"')
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(stage), *map(str, units)],
        capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))


def verified(result: subprocess.CompletedProcess[str]) -> bool:
    """verify passed: exit 0 and not a word said (it only warns about a misspelt value)."""
    return result.returncode == 0 and not (result.stdout + result.stderr).strip()


def test_units_pass_systemd_analyze_verify(staged: Path) -> None:
    units = staged / "etc/systemd/system"
    # The instance is loaded from the template next to it.
    result = verify(staged, units / "dmemfs@mnt-dmem.service",
                    units / "dmemfs-hugepages.service")
    assert verified(result), result.stdout + result.stderr


@pytest.mark.parametrize(("what", "old", "new"), [
    ("placeholder left", "ExecStart=/usr/local/sbin/dmemfs", "ExecStart=@BINDIR@/dmemfs"),
    ("missing command", "ExecStart=/usr/local/sbin/dmemfs", "ExecStart=/usr/local/sbin/nope"),
    ("misspelt value", "Type=notify", "Type=notifyy"),
    ("missing man page", "man:dmemctl(8)", "man:dmemctl-nope(8)"),
    ("missing requirement", "Wants=dmemfs-hugepages.service", "Requires=no-such.service"),
])
def test_verify_fails_on_a_broken_unit(staged: Path, tmp_path: Path, what: str, old: str,
                                       new: str) -> None:
    for unit in ("dmemfs@.service", "dmemfs-hugepages.service"):
        shutil.copy(staged / "etc/systemd/system" / unit, tmp_path / unit)
    path = tmp_path / "dmemfs@.service"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    result = verify(staged, tmp_path / "dmemfs@mnt-dmem.service")
    assert not verified(result), f"verify did not notice: {what}"


def exposure_within(stage: Path, unit: Path, threshold: int) -> bool:
    """`systemd-analyze security --offline` rates *unit* at most threshold/10 (0 safe, 10 not)."""
    require_root()
    script = ('mount --bind "$1/usr/local" /usr/local && mount -t tmpfs tmpfs /run && '
              'exec systemd-analyze security --offline=yes --threshold="$2" "$3"')
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         str(stage), str(threshold), str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER=""))
    return result.returncode == 0


def test_units_stay_hardened(staged: Path, tmp_path: Path) -> None:
    units = staged / "etc/systemd/system"
    # 4.0 and 2.9 today; an unhardened service rates 9.6.
    assert exposure_within(staged, units / "dmemfs@mnt-dmem.service", 45)
    assert exposure_within(staged, units / "dmemfs-hugepages.service", 35)
    plain = tmp_path / "plain.service"
    plain.write_text("[Service]\nExecStart=/bin/true\n")
    assert not exposure_within(staged, plain, 45)


def unit_settings(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return {section: dict(parser[section]) for section in parser.sections()}


def test_dmemfs_service_needs_no_mount_namespace(staged: Path) -> None:
    for unit in ("dmemfs@.service", "dmemfs-hugepages.service"):
        service = unit_settings(staged / "etc/systemd/system" / unit)["Service"]
        assert not NAMESPACING & set(service), \
            f"{unit}: {NAMESPACING & set(service)} would hide the mount from the host"
    service = unit_settings(staged / "etc/systemd/system/dmemfs@.service")["Service"]
    assert service["Type"] == "notify"
    assert service["CapabilityBoundingSet"].split() == ["CAP_SYS_ADMIN", "CAP_IPC_LOCK"]
    assert service["LimitMEMLOCK"] == "infinity"
    assert int(service["OOMScoreAdjust"]) <= -500
    assert "/dev/fuse rw" in service["DeviceAllow"]


# -- man pages -------------------------------------------------------------------------------

def render(page: Path) -> str:
    """`man -l` output as plain ASCII text, whitespace collapsed."""
    env = dict(os.environ, LC_ALL="C", MANWIDTH="120", MANPAGER="cat", PAGER="cat")
    env.pop("MAN_KEEP_FORMATTING", None)
    result = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                            env=env, timeout=60, check=True)
    assert not result.stderr.strip(), result.stderr
    return " ".join(result.stdout.split())


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("page", ["dmemfs", "dmemctl", "dmemfs-hugepages"])
def test_man_pages_render_without_warnings(staged: Path, page: str) -> None:
    path = staged / "usr/local/share/man/man8" / f"{page}.8"
    result = subprocess.run(["groff", "-man", "-ww", "-z", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr
    text = render(path)
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "SEE ALSO"):
        assert section in text, f"{page}: no {section}"
    assert path.read_text() == manpage.PAGES[page]()


def test_dmemfs_man_page_has_every_mount_option(staged: Path) -> None:
    text = render(staged / "usr/local/share/man/man8/dmemfs.8")
    for opt in OPTIONS:
        head = f"{opt.name}={opt.value}" if opt.value else opt.name
        assert flat(head) in text, f"dmemfs(8) lacks -o {opt.name}"
        assert flat(opt.text) in text, f"dmemfs(8) lacks the text of {opt.name}"
        assert f"Default: {flat(opt.default)}." in text, f"dmemfs(8) lacks {opt.name}'s default"
    for action in cli.build_parser()._actions:
        for option in action.option_strings:
            assert option in text, f"dmemfs(8) lacks {option}"
    # The mount -t fuse form is the first example, before the command run by hand.
    examples = text[text.index("EXAMPLES"):]
    assert examples.startswith("EXAMPLES Mount 1 GiB of 2 MiB dpages by hand: "
                               "mount -t fuse dmemfs /mnt/dmem -o size=1G,pagesize=2M "), examples
    assert "without mount(8): dmemfs /mnt/dmem -o size=1G,pagesize=2M" in text


def test_dmemctl_man_page_has_every_subcommand(staged: Path) -> None:
    text = render(staged / "usr/local/share/man/man8/dmemctl.8")
    commands = manpage._subcommands(dmemctl.build_parser())
    assert [name for name, _, _ in commands] == \
        ["status", "extents", "policy", "files", "trace", "map", "poison", "scan"]
    for name, helptext, sub in commands:
        assert f" {name} " in text, f"dmemctl(8) lacks {name}"
        assert flat(manpage.sentence(helptext)) in text
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"dmemctl(8) lacks {name} {option}"
    assert "trace on|off" in text
    assert "local | bind:N[,M] | preferred:N | interleave:N-M" in text


def test_manpage_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dmemfs_fuse.host.manpage", "dmemctl"],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.startswith('.TH "DMEMCTL" "8"')
    bad = subprocess.run([sys.executable, "-m", "dmemfs_fuse.host.manpage", "nope"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_roff_escaping() -> None:
    assert manpage.lines(".hidden\n'quoted\n-o a\\b") == ["\\&.hidden", "\\&'quoted",
                                                            "\\-o a\\eb"]


# -- bash completion -------------------------------------------------------------------------

def comp_words(line: str) -> list[str]:
    """COMP_WORDS as bash builds them: split at blanks, and ':' and '=' are words of their own
    (both are in COMP_WORDBREAKS); a line ending in a blank starts an empty word."""
    words: list[str] = []
    for token in line.split():
        words += [w for w in re.split(r"([:=]+)", token) if w]
    if line.endswith(" "):
        words.append("")
    return words


def complete(script: str, function: str, line: str, *, bash_completion: bool = True,
             words: list[str] | None = None) -> list[str]:
    """Run *function* the way bash does at the end of *line*; return COMPREPLY."""
    if bash_completion and not BASH_COMPLETION.exists():
        pytest.fail("bash-completion is not installed (apt-get install bash-completion)")
    words = comp_words(line) if words is None else words
    program = (
        ('source /usr/share/bash-completion/bash_completion\n' if bash_completion else "")
        + f'source "$1"\nCOMP_LINE=$2\nCOMP_POINT=${{#2}}\nshift 2\n'
        'COMP_WORDS=("$@")\nCOMP_CWORD=$((${#COMP_WORDS[@]} - 1))\nCOMPREPLY=()\n'
        f'{function} "${{COMP_WORDS[0]}}" "${{COMP_WORDS[COMP_CWORD]}}" '
        '"${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", program, "bash", str(REPO / "completions" / script),
                             line, *words], capture_output=True, text=True, timeout=30,
                            check=False, cwd="/")
    assert result.returncode == 0, result.stderr
    return [w for w in result.stdout.splitlines() if w]


@pytest.fixture(params=[True, False], ids=["bash-completion", "plain-bash"])
def with_bc(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def test_dmemctl_completes_subcommands(with_bc: bool) -> None:
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl st", bash_completion=with_bc) == \
        ["status"]
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl trace ", bash_completion=with_bc) == \
        ["on", "off"]
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl -m /mnt/dmem tr",
                    bash_completion=with_bc) == ["trace"]


def test_dmemctl_completion_offers_everything_the_parser_has() -> None:
    parser = dmemctl.build_parser()
    offered = complete("dmemctl.bash", "_dmemctl", "dmemctl ")
    assert offered == [name for name, _, _ in manpage._subcommands(parser)]
    options = complete("dmemctl.bash", "_dmemctl", "dmemctl -")
    for action in parser._actions:
        for option in action.option_strings:
            assert option in options, f"completion lacks {option}"
    for name, _, sub in manpage._subcommands(parser):
        sub_options = complete("dmemctl.bash", "_dmemctl", f"dmemctl {name} -")
        for action in sub._actions:
            for option in action.option_strings:
                assert option in sub_options, f"completion lacks {name} {option}"


def test_dmemctl_completes_policies_and_files(tmp_path: Path) -> None:
    nodes = sorted(p.name[4:] for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl policy /mnt/dmem/vm ") == \
        ["local", "bind:", "preferred:", "interleave:"]
    # readline replaces only the text after ':' (it is in COMP_WORDBREAKS)
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl policy /mnt/dmem/vm bind:") == nodes
    assert complete("dmemctl.bash", "_dmemctl", "dmemctl policy /mnt/dmem/vm pre") == \
        ["preferred:"]
    (tmp_path / "vm0").touch()
    (tmp_path / "vm1").touch()
    files = complete("dmemctl.bash", "_dmemctl", f"dmemctl extents {tmp_path}/v")
    assert sorted(files) == [f"{tmp_path}/vm0", f"{tmp_path}/vm1"]


def test_dmemfs_completes_mount_options(with_bc: bool) -> None:
    words = ["dmemfs", "none", "/mnt/dmem", "-o", ""]
    names = complete("dmemfs.bash", "_dmemfs", "dmemfs none /mnt/dmem -o ",
                     bash_completion=with_bc, words=words)
    for opt in OPTIONS:
        assert (f"{opt.name}=" if opt.value else opt.name) in names, f"no -o {opt.name}"
    # after a comma: the next option; after name=: its values (only the text after '=')
    assert complete("dmemfs.bash", "_dmemfs", "dmemfs none /mnt/dmem -o size=1G,page") == \
        ["1G,pagesize="]
    assert complete("dmemfs.bash", "_dmemfs", "dmemfs none /mnt/dmem -o size=1G,pagesize=") == \
        ["4K", "2M", "1G"]


def test_dmemfs_completes_a_source_or_a_mountpoint_first(with_bc: bool, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt-file").touch()
    assert complete("dmemfs.bash", "_dmemfs", "dmemfs no", bash_completion=with_bc) == ["none"]
    # SOURCE may be left out: a directory is offered first as well as after it.
    assert complete("dmemfs.bash", "_dmemfs", f"dmemfs {tmp_path}/mn",
                    bash_completion=with_bc) == [f"{tmp_path}/mnt"]
    assert complete("dmemfs.bash", "_dmemfs", f"dmemfs none {tmp_path}/mn",
                    bash_completion=with_bc) == [f"{tmp_path}/mnt"]
    assert complete("dmemfs.bash", "_dmemfs", f"dmemfs none {tmp_path}/mnt ",
                    bash_completion=with_bc) == []


def test_dmemfs_hugepages_completes_subcommands() -> None:
    assert complete("dmemfs-hugepages.bash", "_dmemfs_hugepages", "dmemfs-hugepages re") == \
        ["reserve", "release"]


# -- dmemfs-hugepages ------------------------------------------------------------------------

def nr_hugepages(node: int = 0, size: int = HUGE_2M) -> int:
    return int(node_path(size, node, "nr_hugepages").read_text())


@pytest.fixture
def restore_hugepages(tmp_path: Path) -> Iterator[Path]:
    """A state file path; whatever it still records is given back, and the pool checked."""
    require_root()
    state = tmp_path / "run" / "hugepages.state"
    before = nr_hugepages()
    try:
        yield state
    finally:
        if state.exists():
            bootreserve.release(state)
        assert nr_hugepages() == before, "huge pages were not given back exactly"


def test_reserve_and_release_change_nr_hugepages_exactly(
        tmp_path: Path, restore_hugepages: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = restore_hugepages
    config = tmp_path / "hugepages.conf"
    config.write_text("# four pages for the test\nnode=0 pagesize=2M count=4  # comment\n")
    args = ["--config", str(config), "--state", str(state)]
    before = nr_hugepages()
    assert bootreserve.main([*args, "reserve"]) == 0
    assert nr_hugepages() == before + 4
    assert bootreserve.load_state(state) == [bootreserve.Added(0, HUGE_2M, 4)]
    assert oct(state.parent.stat().st_mode & 0o777) == "0o700"
    # a second reserve would double the pages: refused, nothing changes
    assert bootreserve.main([*args, "reserve"]) == 1
    assert "release' first" in capsys.readouterr().err
    assert nr_hugepages() == before + 4
    assert bootreserve.main([*args, "status"]) == 0
    out = capsys.readouterr().out
    assert "node 0 pagesize 2M count 4" in out and f"{before + 4} pages" in out
    assert bootreserve.main([*args, "release"]) == 0
    assert nr_hugepages() == before
    assert not state.exists()
    # nothing recorded: release is a no-op
    assert bootreserve.main([*args, "release"]) == 0
    assert nr_hugepages() == before


def test_the_command_reserves_and_releases(tmp_path: Path, restore_hugepages: Path) -> None:
    state = restore_hugepages
    config = tmp_path / "hugepages.conf"
    config.write_text("node=0 pagesize=2M count=4\n")
    args = [sys.executable, "-m", "dmemfs_fuse.host.bootreserve", "--config", str(config),
            "--state", str(state)]
    before = nr_hugepages()
    result = subprocess.run([*args, "reserve"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert nr_hugepages() == before + 4
    assert "reserved 4 huge pages in 1 pool(s)" in result.stderr
    result = subprocess.run([*args, "release"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert nr_hugepages() == before


@pytest.mark.parametrize(("config", "message"), [
    ("node=0 pagesize=2M", "line 1: missing count="),
    ("\n# c\nnode=0 pagesize=2M count=x", "line 3: count=x: must be a whole number"),
    ("node=0 pagesize=2M count=0", "line 1: count=0: must be a whole number larger than 0"),
    ("node=a pagesize=2M count=1", "line 1: node=a: not a node number"),
    ("node=0 pagesize=huge count=1", "line 1: pagesize=huge: not a page size"),
    ("node=0 pagesize=2M count=1 colour=red", "line 1: unknown key 'colour'"),
    ("node=0 pagesize=2M count=1 count=2", "line 1: count= given twice"),
    ("node=0 2M count=1", "line 1: '2M': expected key=value"),
    ("node=0 pagesize=2M count=1\nnode=0 pagesize=2048kB count=2",
     "line 2: node 0 pagesize 2M is already given on line 1"),
    ("node=0 pagesize=4M count=1", "line 1: pagesize=4M: this kernel has no huge pages"),
    ("node=999 pagesize=2M count=1", "line 1: node=999: no such NUMA node"),
])
def test_bad_config_lines_fail_clearly(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "hugepages.conf"
    path.write_text(config + "\n")
    before = nr_hugepages()
    result = subprocess.run([sys.executable, "-m", "dmemfs_fuse.host.bootreserve", "--config",
                             str(path), "--state", str(tmp_path / "state"), "reserve"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dmemfs-hugepages: error: {path} {message}"), lines[0]
    assert nr_hugepages() == before
    assert not (tmp_path / "state").exists()


def test_missing_config_fails_clearly(tmp_path: Path) -> None:
    assert bootreserve.main(["--config", str(tmp_path / "none.conf"), "--state",
                             str(tmp_path / "state"), "reserve"]) == 2
    with pytest.raises(ConfigError, match="No such file"):
        bootreserve.read_config(str(tmp_path / "none.conf"))


def test_example_config_parses() -> None:
    requests = bootreserve.parse_config(
        (REPO / "systemd/hugepages.conf.example").read_text(), "example")
    assert requests == [bootreserve.PoolRequest(0, HUGE_2M, 2048, 10)]


def test_reserve_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool that cannot be raised gives back the pools raised before it (on a fake sysfs,
    so that no real memory has to run out)."""
    fake = tmp_path / "sys"
    (fake / "node0").mkdir(parents=True)
    (fake / "node0" / "nr_hugepages").write_text("10\n")
    (fake / "node1" / "nr_hugepages").mkdir(parents=True)   # a write to it fails

    def fake_path(size: int, node: int, name: str) -> Path:
        return fake / f"node{node}" / name

    monkeypatch.setattr("dmemfs_fuse.memory.hugepages.node_path", fake_path)
    monkeypatch.setattr("dmemfs_fuse.host.bootreserve.node_path", fake_path)
    requests = bootreserve.parse_config("node=0 pagesize=2M count=4\n"
                                        "node=1 pagesize=2M count=4\n", "test.conf")
    state = tmp_path / "state"
    with pytest.raises(bootreserve.ReserveError, match=r"test\.conf line 2: node 1: .*gave back"):
        bootreserve.reserve(requests, state, "test.conf")
    assert (fake / "node0" / "nr_hugepages").read_text().strip() == "10"
    assert not state.exists()
