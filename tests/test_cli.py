"""The `ldmfast` command line, run as a user would."""
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "ldmfast", *args], capture_output=True, text=True, timeout=120)


def test_info_lists_versions_and_backends():
    result = run("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("ldmfast ", "torch ", "triton", "CUDA module", "backends on cpu tensors", "ddim_step"):
        assert expected in out
    assert re.search(r"^\s+ddim_step\s+cpu\s+yes$", out, re.M)  # columns widen with the longest op name
    assert re.search(r"^\s+group_norm\s+cpu\s+yes$", out, re.M)


def test_info_refuses_an_unknown_forced_backend():
    # It printed "forced backend: bogus" and exit 0, while every op call then raised.
    import os
    result = subprocess.run([sys.executable, "-m", "ldmfast", "info"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "LDMFAST_BACKEND": "bogus"})
    assert result.returncode == 2
    assert "forced backend: error: LDMFAST_BACKEND: unknown backend 'bogus'" in result.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("ldmfast")  # installed beside the interpreter running the tests
    if not exe.exists():
        pytest.fail(f"no console script at {exe}: was the package installed into this environment?")
    result = subprocess.run([str(exe), "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_prints_the_installed_version():
    import ldmfast
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ldmfast {ldmfast.__version__}"


def test_no_command_prints_help_and_fails():
    result = run()
    assert result.returncode == 2
    assert "info" in result.stdout
