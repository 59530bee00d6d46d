"""The package as a user installs and calls it: `pip install .` into a fresh environment, the
`tclf` command with its subcommands, `python -m tclf`, and the `tclf-*` aliases."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import tclf
from tclf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ALIASES = ["tclf-extract", "tclf-pack", "tclf-train", "tclf-predict", "tclf-eval", "tclf-tune",
           "tclf-data-service"]


def _run(*command, **options):
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **options)


def test_one_tclf_command_with_a_version_and_python_m():
    done = _run(os.path.join(BIN, "tclf"), "--help")
    assert done.returncode == 0, done.stderr
    for name in cli.SUBCOMMANDS:
        assert f"\n  {name} " in done.stdout, name
    done = _run(os.path.join(BIN, "tclf"), "--version")
    assert (done.returncode, done.stdout) == (0, f"tclf {tclf.__version__}\n")
    done = _run(sys.executable, "-m", "tclf", "train", "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: tclf train [OPTIONS]")
    assert "--deterministic" in done.stdout and "--resume" in done.stdout


def test_each_alias_is_the_subcommand():
    for alias in ALIASES:
        done = _run(os.path.join(BIN, alias), "--help")
        assert done.returncode == 0, (alias, done.stderr)
        assert done.stdout.startswith(f"Usage: {alias} "), alias
        sub = _run(os.path.join(BIN, "tclf"), alias.removeprefix("tclf-"), "--help")
        assert sub.returncode == 0
        # The same command: the same help, but for the name in the usage line.
        assert sub.stdout.split("\n", 1)[1] == done.stdout.split("\n", 1)[1], alias


def test_pip_install_dot_into_a_fresh_venv_offline(tmp_path):
    """`pip install .` of the repository's files into a new venv, with --no-index: nothing is
    downloaded. The dependencies are this environment's (a .pth file puts its site-packages
    after the new venv's own), so pip still checks every pin against installed versions."""
    fresh = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", str(fresh)).returncode == 0
    python = str(fresh / "bin" / "python")
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    with open(os.path.join(purelib.stdout.strip(), "_tclf_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "src"  # The files git tracks: a clean clone's, whatever is built here.
    files = _run("git", "ls-files", "-z", cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        os.makedirs(source / os.path.dirname(name), exist_ok=True)
        with open(os.path.join(ROOT, name), "rb") as src, open(source / name, "wb") as dst:
            dst.write(src.read())
    done = _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index",
                "--no-build-isolation", str(source))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = _run(str(fresh / "bin" / "tclf"), "--version")
    assert (done.returncode, done.stdout) == (0, f"tclf {tclf.__version__}\n"), done.stderr
    where = _run(python, "-c", "import tclf, tclf.cli, tclf.data.audio; print(tclf.__file__)",
                 cwd=tmp_path)  # Not the checkout's folder, which `python -c` would import.
    assert where.stdout.startswith(str(fresh)), where.stdout + where.stderr
    done = _run(str(fresh / "bin" / "tclf-extract"), "--help")
    assert done.returncode == 0 and "Usage: tclf-extract" in done.stdout
