"""`scripts/reproduce_results.sh`: the Python it runs with, one classifier variant alone, refused stages and options.

`--dry-run` prints each command where the script would run it (the same `run` call, the same argument building), so
these checks cost no training.
"""

import os
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT, SCRIPTS

SCRIPT = SCRIPTS / "reproduce_results.sh"
VARIANTS = ["skin-dualnet-small", "skin-dualnet-small-nometa", "skin-dualnet-small-single"]


def reproduce(*args: str, root=REPO_ROOT, **env: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "VIRTUAL_ENV")}
    return subprocess.run(
        ["bash", str(root / "scripts" / "reproduce_results.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def commands(run: subprocess.CompletedProcess) -> dict[str, str]:
    """Run name -> command line, from the `--dry-run` output (`NAME: COMMAND`)."""
    assert run.returncode == 0, run.stderr
    return dict(line.split(": ", 1) for line in run.stdout.splitlines())


def test_help_lists_the_stages_and_options():
    run = reproduce("--help")
    assert run.returncode == 0 and run.stderr == ""
    for word in ("weights", "segmenter", "classifiers", "evaluate", "classifiers-1920", "export", "seed43"):
        assert f"\n    {word} " in run.stdout
    assert "--variant PRESET" in run.stdout and "--dry-run" in run.stdout and "$PYTHON" in run.stdout
    assert not (REPO_ROOT / "runs" / "--help").exists()


def test_default_stages_in_order():
    names = list(commands(reproduce("--dry-run")))
    assert names[0] == "init-segmenter-small" and names[-1] == "export-skin-dualnet-small"
    assert [name for name in names if name in VARIANTS] == VARIANTS
    assert "ablation-report" in names and "ablation-report-1920" in names
    assert not any(name.endswith("-s43") for name in names)  # seed43 only when asked for


@pytest.mark.parametrize(
    ("env", "python"),
    [
        ({"PYTHON": "/opt/py/bin/python3.12"}, "/opt/py/bin/python3.12"),
        ({"VIRTUAL_ENV": "/srv/env"}, "/srv/env/bin/python"),
        ({"PYTHON": "/opt/py/bin/python3.12", "VIRTUAL_ENV": "/srv/env"}, "/opt/py/bin/python3.12"),
        ({}, ".venv/bin/python"),
    ],
    ids=["PYTHON", "active-venv", "PYTHON-first", "repo-venv"],
)
def test_python_it_runs_with(env, python):
    if not env and not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("this checkout has no .venv")
    for command in commands(reproduce("--dry-run", "segmenter", **env)).values():
        assert command.startswith(f"{python} scripts/"), command


def test_python3_without_any_environment(tmp_path):
    """A checkout without .venv (installed with `pip install -e .` elsewhere) and no active venv: python3."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / SCRIPT.name)
    for command in commands(reproduce("--dry-run", "weights", root=tmp_path)).values():
        assert command.startswith("python3 scripts/convert_efficientnet_lite.py"), command


def test_one_variant_alone():
    run = commands(reproduce("--dry-run", "--variant", "skin-dualnet-small-nometa"))
    assert list(run) == [
        "init-segmenter-small",
        "init-skin-dualnet-small-nometa",
        "segmenter-small",
        "eval-segmenter-small",
        "skin-dualnet-small-nometa",
    ]
    assert "--config runs/init/skin-dualnet-small-nometa " in run["skin-dualnet-small-nometa"]
    assert "--output-dir runs/skin-dualnet-small-nometa" in run["skin-dualnet-small-nometa"]
    # The variant's larger-budget run, without the report that needs all three.
    larger = commands(reproduce("--dry-run", "classifiers-1920", "--variant", "skin-dualnet-small"))
    assert (
        list(larger) == ["skin-dualnet-small-1920"] and "--max-train-samples 1920" in larger["skin-dualnet-small-1920"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "resnet"], "unknown variant 'resnet'; variants: skin-dualnet-small"),
        (["--variant"], "--variant needs a preset"),
        (["train"], "unknown stage 'train'; stages: weights"),
        (["--fast"], "unknown option '--fast'"),
        (["--variant", "skin-dualnet-small", "evaluate"], "compare all three variants"),
    ],
)
def test_refused_arguments(args, message):
    run = reproduce("--dry-run", *args)
    assert run.returncode == 2 and message in run.stderr and run.stdout == ""
