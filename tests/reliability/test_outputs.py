"""The output writer of ``dsr1 quantize``, ``dsr1 prune`` and ``save_pretrained`` (dsr1.outputs).

No data loss: an output dir is replaced only when it holds nothing but a previous output of the
same command (its marker), never when it is or contains the model, never the current dir or home
when they hold anything else. Bad locations are refused before a model is loaded. Writes are
atomic: writers killed with SIGKILL at every step leave the previous output or the new one,
never a mix, never a touched user file, and never anything that blocks the next ``--overwrite``.

Tests run as root here, where permission bits do not stop writes, so unwritable locations are
real ones that refuse even root (``/proc``, ``/sys``, a file in the way); the chmod case is
skipped as root.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.outputs import (
    MARKER,
    MARKER_TMP,
    OLD_PREFIX,
    TMP_PREFIX,
    plan_output,
    read_marker,
    umask,
    write_marker,
)

TINY = Path(__file__).resolve().parents[2] / "core" / "dsr1" / "assets" / "dsr1-tiny"
QUANT = ["--quant", "int8"]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline, a private DSR1_HOME, no family overrides from the caller's shell."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DSR1_OFFLINE", "1")
    monkeypatch.setenv("DSR1_HOME", str(tmp_path / "dsr1home"))
    for var in [v for v in os.environ if v.startswith("DSR1_") and v not in ("DSR1_HOME", "DSR1_OFFLINE")]:
        monkeypatch.delenv(var)


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: a refusal must come before any heavy work."""
    from dsr1.auto import AutoModel

    def loads(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the output location was refused")

    monkeypatch.setattr(AutoModel, "from_pretrained", loads)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The issue's layout: ``P/src_model`` (a copy of dsr1-tiny) and a user file ``P/notes.txt``; cwd is P's parent."""
    p = tmp_path / "P"
    shutil.copytree(TINY, p / "src_model")
    (p / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return p


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` → a digest of its content (files), "dir" or the link target."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def litter(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if p.name.startswith((TMP_PREFIX, OLD_PREFIX))]


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsr1: error: ") and "\n" not in err, err
    return err


def write_output(out: Path | str, command: str, tag: str, overwrite: bool = True) -> None:
    """An output of ``command`` written through the shared writer: two files and a subdir holding ``tag``."""
    with plan_output(out, command, overwrite=overwrite).writing() as tmp:
        (tmp / "config.json").write_text(tag)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(tag.encode() * 100)


# --- the example and the model as output ------------------------------------------------


def test_quantize_into_the_parent_of_the_model_deletes_nothing(project: Path, capsys: pytest.CaptureFixture[str],
                                                               no_loading: None) -> None:
    before = tree(project)
    (project.parent / "plink").symlink_to("P")
    (project.parent / "mlink").symlink_to("P/src_model")
    for out, model in (("P", "./P/src_model"), ("plink", "./P/src_model"), ("P", "./mlink"), (".", "P/src_model")):
        err = error_line(capsys, "quantize", "--model", model, *QUANT, "--output-dir", out, "--overwrite")
        assert f"--output-dir '{out}' contains the input '{model}'" in err and "write to a new or empty dir" in err
    err = error_line(capsys, "quantize", "--model", "./P/src_model", *QUANT, "--output-dir", "P/src_model",
                     "--overwrite")
    assert "--output-dir 'P/src_model' is the model dir itself" in err
    err = error_line(capsys, "prune", "--model", "./P/src_model", "--target-sparsity", "0.5", "--output-dir", "P",
                     "--overwrite")
    assert "output dir 'P' contains the input './P/src_model'" in err
    assert tree(project) == before and not litter(project, project.parent)


def test_quantize_beside_the_model_then_overwrite_through_a_symlink(project: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = tree(project)
    mask = os.umask(0o027)
    try:
        assert main(["quantize", "--model", "./P/src_model", *QUANT, "--output-dir", "P/int8", "--json"]) == 0
    finally:
        os.umask(mask)
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_before"] == (project / "src_model" / "model.safetensors").stat().st_size  # not 0.0 MB
    assert 0 < report["bytes_after"] < report["bytes_before"]
    out = project / "int8"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the umask's mode, not mkdtemp's 0700
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o640
    marker = read_marker(out)
    assert marker is not None and marker["command"] == "quantize" and "model.safetensors" in marker["files"]
    err = error_line(capsys, "quantize", "--model", "./P/src_model", *QUANT, "--output-dir", "P/int8")
    assert "holds a previous dsr1 quantize output; pass --overwrite to replace it" in err

    (out / "config.json").write_text("stale")  # so that the replacement shows
    link = project.parent / "int8-link"
    link.symlink_to(out)
    assert main(["quantize", "--model", "./P/src_model", *QUANT, "--output-dir", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(out)  # the link is kept, its target replaced
    assert json.loads((out / "config.json").read_text())["model_type"] == "dsr1_quantized"
    assert not litter(project, project.parent)
    assert {k: v for k, v in tree(project).items() if not k.startswith("int8")} == before


# --- the current dir, home, root ---------------------------------------------------------------


def test_output_dir_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        no_loading: None) -> None:
    here = tmp_path / "work"
    here.mkdir()
    (here / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(here)
    for extra in ([], ["--overwrite"]):
        err = error_line(capsys, "quantize", "--model", str(TINY), *QUANT, "--output-dir", ".", *extra)
        assert ("--output-dir '.' is the current directory and holds files dsr1 quantize did not write (thesis.tex); "
                "write to a new dir instead") in err
    assert (here / "thesis.tex").read_text() == "years of work" and sorted(os.listdir(here)) == ["thesis.tex"]


def test_output_dir_dot_when_empty_is_filled_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "empty"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert main(["quantize", "--model", str(TINY), *QUANT, "--output-dir", "."]) == 0
    assert (here / "model.safetensors").is_file() and read_marker(here) is not None
    write_output(".", "quantize", "second")  # a previous quantize output in the cwd: replaced in place
    assert here.stat().st_ino == inode and Path.cwd() == here  # the shell's cwd still is the output
    assert sorted(os.listdir(here)) == [MARKER, "config.json", "sub"] and (here / "config.json").read_text() == "second"


def test_home_and_root_are_never_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(Dsr1Error, match=r"is your home directory and holds files dsr1 quantize did not write"):
        plan_output("~", "quantize", overwrite=True)
    with pytest.raises(Dsr1Error, match=r"is the filesystem root and holds files dsr1 quantize did not write"):
        plan_output("/", "quantize", overwrite=True)
    assert os.listdir(home) == [".bashrc"]


# --- the rule ----------------------------------------------------------------------------------

#: name → (previous quantize output first?, user files {name: content}, command asking, overwrite, message).
CASES: dict[str, tuple[bool, dict[str, str], str, bool, str]] = {
    "user_file": (False, {"keep.txt": "x"}, "quantize", True,
                  "holds files dsr1 quantize did not write (keep.txt); --overwrite only"),
    "own_plus_user_file": (True, {"notes.txt": "x"}, "quantize", True,
                           "holds files dsr1 quantize did not write (notes.txt)"),
    "other_command": (True, {}, "prune", True, "holds a dsr1 'quantize' output, not a dsr1 prune one"),
    "own_without_overwrite": (True, {}, "quantize", False, "holds a previous dsr1 quantize output; pass --overwrite"),
    "not_a_dsr1_marker": (False, {MARKER: '{"command": "quantize"}', "data.csv": "x"}, "quantize", True,
                          "holds files dsr1 quantize did not write (.dsr1-output.json, data.csv)"),
    "many_user_files": (False, {f"f{i:02d}": "x" for i in range(40)}, "quantize", True,
                        "did not write (f00, f01, f02 and 37 more)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused(case: str, tmp_path: Path) -> None:
    own, files, command, overwrite, message = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    if own:
        write_output(out, "quantize", "previous")
    for name, text in files.items():
        (out / name).write_text(text)
    before = tree(tmp_path)
    with pytest.raises(Dsr1Error) as err:
        plan_output(out, command, overwrite=overwrite)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert tree(tmp_path) == before


def test_empty_and_own_dirs_are_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_output(out, "quantize", "one", overwrite=False)  # empty: no --overwrite needed
    write_output(out, "quantize", "two")
    assert (out / "config.json").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["out"]
    marker = read_marker(out)
    assert marker is not None and (marker["command"], marker["files"]) == ("quantize", ["config.json", "sub"])


def test_prune_uses_the_same_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_loading: None) -> None:
    out = tmp_path / "out"
    write_output(out, "quantize", "previous")
    argv = ["prune", "--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", str(out), "--overwrite"]
    assert "holds a dsr1 'quantize' output, not a dsr1 prune one" in error_line(capsys, *argv)
    shutil.rmtree(out)
    out.mkdir()
    write_marker(out, {"command": "prune"})
    (out / "stage-0.50").mkdir()
    (out / "report.json").write_text("{}")
    (out / "my-notes.md").write_text("mine")
    assert "holds files dsr1 prune did not write (my-notes.md)" in error_line(capsys, *argv)
    assert (out / "my-notes.md").read_text() == "mine"


def test_prune_replaces_its_own_output_and_marks_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_marker(out, {"command": "prune"})
    (out / "stage-0.30").mkdir()  # a stage of an earlier run, gone after this one
    (out / "report.json").write_text("{}")
    assert main(["prune", "--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", str(out),
                 "--overwrite", "--no-speed", "--quiet", "--eval-tokens", "256", "--eval-window", "128",
                 "--calibration-samples", "2", "--calibration-len", "32"]) == 0
    assert sorted(os.listdir(out)) == [MARKER, "curve.csv", "curve.png", "report.json", "stage-0.50"]
    assert read_marker(out)["command"] == "prune"  # type: ignore[index]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_pretrained_never_replaces_its_source(tmp_path: Path) -> None:
    from dsr1.auto import AutoModel

    src = tmp_path / "models" / "tiny"
    shutil.copytree(TINY, src)
    model = AutoModel.from_pretrained(src)
    before = tree(tmp_path)
    for target in (src, src.parent):
        with pytest.raises(Dsr1Error, match="is the model dir itself|contains the input"):
            model.save_pretrained(target)
    assert tree(tmp_path) == before


# --- bad locations, refused before loading -------------------------------------------------------

#: name → (output dir, message). Each refuses even root.
LOCATIONS: dict[str, tuple[str, str]] = {
    "under_proc": ("/proc/dsr1-out", "is not writable: cannot create a directory in '/proc'"),
    "parent_is_a_file": ("{tmp}/file/out", "cannot be created: '{tmp}/file' is a file, not a directory"),
    "is_a_file": ("{tmp}/file", "is a file, not a directory"),
    "is_a_fifo": ("{tmp}/fifo", "is a FIFO, not a directory"),
    "symlink_loop": ("{tmp}/loop", "cannot be resolved (a symlink loop)"),
    "under_sys": ("/sys/dsr1-out", "is not writable: cannot create a directory in '/sys'"),
}


@pytest.mark.parametrize("case", list(LOCATIONS))
@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_bad_location_refused_before_loading(case: str, command: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], no_loading: None) -> None:
    if case == "under_sys" and _can_mkdir(Path("/sys")):
        pytest.skip("/sys is writable here")
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    out, message = (s.format(tmp=tmp_path) for s in LOCATIONS[case])
    args = QUANT if command == "quantize" else ["--target-sparsity", "0.5"]
    err = error_line(capsys, command, "--model", "dsr1-tiny", *args, "--output-dir", out)
    assert message in err and "choose a" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 dir: the chmod says nothing")
def test_read_only_dir_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(Dsr1Error, match="is not writable: cannot create a directory in"):
            plan_output(ro / "out", "quantize")
    finally:
        ro.chmod(0o755)


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    for mask, mode in ((0o022, 0o755), (0o002, 0o775), (0o077, 0o700)):
        old = os.umask(mask)
        try:
            out = tmp_path / f"m{mask:03o}" / "deep" / "out"
            write_output(out, "quantize", "x")
        finally:
            os.umask(old)
        for d in (out, out.parent, out / "sub"):
            assert stat.S_IMODE(d.stat().st_mode) == mode, (oct(mask), d)
        assert stat.S_IMODE((out / MARKER).stat().st_mode) == 0o666 & ~mask


# --- leftovers of interrupted runs -----------------------------------------------------------------


def test_leftovers_are_cleaned_and_never_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output(out, "quantize", "previous")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = {"building-dead": (TMP_PREFIX + "out-a", {"state": "building", "pid": int(dead.stdout)}),
                 "building-live": (TMP_PREFIX + "out-b", {"state": "building", "pid": os.getpid()}),
                 "old": (OLD_PREFIX + "out-c", {"command": "quantize", "files": ["config.json"]})}
    for name, info in leftovers.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("half")
        write_marker(tmp_path / name, {**info, "host": socket.gethostname()})
    (tmp_path / (OLD_PREFIX + "out-empty")).mkdir()  # killed before its marker was written
    (tmp_path / (TMP_PREFIX + "mine")).mkdir()  # a user's dir that only looks like ours
    (tmp_path / (TMP_PREFIX + "mine") / "data").write_text("mine")
    write_output(out, "quantize", "new")
    assert sorted(os.listdir(tmp_path)) == [TMP_PREFIX + "mine", TMP_PREFIX + "out-b", "out"]
    assert (out / "config.json").read_text() == "new"


# --- fault injection: SIGKILL at every step ------------------------------------------------------

#: A writer that counts its filesystem calls and kills itself (SIGKILL) at call number argv[1]: the
#: shared writer on its own (argv: target, tag), or ``dsr1 quantize`` (argv: the command line), counted
#: from the moment its output starts to be written.
CHILD = r"""
import io, os, shutil, signal, sys
from dsr1 import outputs

kill_at, mode, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
steps, active = 0, mode != "quantize"

def counted(fn):
    def step(*a, **kw):
        global steps
        steps += active
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return step

if mode == "two-renames":
    outputs._exchange = lambda a, b: False  # a platform without renameat2(RENAME_EXCHANGE)
for module, names in ((os, ("mkdir", "rmdir", "rename", "replace", "unlink", "chmod")), (io, ("open",)),
                      (shutil, ("rmtree",)), (outputs, ("_exchange",))):
    for name in names:
        setattr(module, name, counted(getattr(module, name)))
if mode == "quantize":
    from dsr1.cli import main

    real = outputs.OutputPlan.writing

    def writing(self):
        global active
        active = True
        return real(self)

    outputs.OutputPlan.writing = writing
    sys.exit(main(args))
target, tag = args
if mode == "in-place":
    os.chdir(target)
    target = "."
with outputs.plan_output(target, "quantize", overwrite=True).writing() as tmp:
    (tmp / "config.json").write_text(tag)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(tag.encode() * 100)
print(steps)
"""


def _child(kill_at: int, mode: str, *args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(kill_at), mode, *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kwargs)


def _content(out: Path, leftovers: bool = False) -> dict[str, str]:
    """The output without its marker (and, ``leftovers``, without build dirs of an in-place write)."""
    return {k: v for k, v in tree(out).items()
            if k != MARKER and not (leftovers and k.startswith((TMP_PREFIX, OLD_PREFIX, MARKER_TMP)))}


@pytest.mark.parametrize("mode", ["exchange", "two-renames", "in-place"])
def test_sigkill_at_every_step_of_a_write(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / "ref"
    write_output(ref / "old", "quantize", "old")
    write_output(ref / "new", "quantize", "new")
    old, new = _content(ref / "old"), _content(ref / "new")
    done = _child(0, mode, ref / "old", "new")  # no kill: how many steps a write takes
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps > 10
    for kill_at in range(1, steps + 1):
        work = tmp_path / f"k{kill_at}"
        write_output(work / "out", "quantize", "old")
        (work / "user.txt").write_text("mine")
        (work / "other").mkdir()
        (work / "other" / "data").write_text("mine")
        killed = _child(kill_at, mode, work / "out", "new")
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        out = work / "out"
        marker = read_marker(out) if out.exists() else None
        if mode == "two-renames" and not out.exists():
            pass  # the moment between the two renames: nothing under the final name
        elif mode == "in-place" and marker is not None and marker.get("state") == "incomplete":
            pass  # filled entry by entry; the marker says so and lists every name
        else:  # in place, an interrupted write leaves its hidden build dirs inside (the next run removes them)
            assert marker is not None and _content(out, mode == "in-place") in (old, new), kill_at
            assert set(marker["files"]) == set(_content(out, mode == "in-place")) - {"sub/weights.bin"}, kill_at
        assert (work / "user.txt").read_text() == "mine" and (work / "other" / "data").read_text() == "mine"
        if mode == "in-place":  # the next run starts in the output dir, as the killed one did
            monkeypatch.chdir(out)
        write_output("." if mode == "in-place" else out, "quantize", "final")  # the next --overwrite
        monkeypatch.chdir(tmp_path)
        assert (out / "config.json").read_text() == "final" and sorted(os.listdir(out)) == [MARKER, "config.json", "sub"]
        assert sorted(os.listdir(work)) == ["other", "out", "user.txt"], (kill_at, os.listdir(work))


def test_sigkill_while_dsr1_quantize_writes(project: Path) -> None:
    out = project / "int8"
    write_output(out, "quantize", "previous")
    previous = _content(out)
    before = tree(project / "src_model"), (project / "notes.txt").read_text()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kill_at in random.Random(19).sample(range(1, 15), 2):  # both inside the write (it takes more steps)
        argv = ["quantize", "--model", "P/src_model", *QUANT, "--output-dir", "P/int8", "--overwrite"]
        killed = _child(kill_at, "quantize", *argv, env=env, cwd=project.parent)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        marker = read_marker(out)
        assert marker is not None and marker["files"] == sorted(set(os.listdir(out)) - {MARKER}), kill_at
        if _content(out) != previous:  # the new output, whole
            config = json.loads((out / "config.json").read_text())
            assert "model.safetensors" in marker["files"] and config["model_type"] == "dsr1_quantized", kill_at
        assert (tree(project / "src_model"), (project / "notes.txt").read_text()) == before
    assert main(["quantize", "--model", "P/src_model", *QUANT, "--output-dir", "P/int8", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "dsr1_quantized"
    assert not litter(project) and sorted(os.listdir(project)) == ["int8", "notes.txt", "src_model"]


def _can_mkdir(where: Path) -> bool:
    try:
        (where / "dsr1-probe").mkdir()
    except OSError:
        return False
    (where / "dsr1-probe").rmdir()
    return True
