"""`--help` of every script in scripts/: exits 0, prints usage, imports no torch, shows the docstring's example
commands as written, and gives every option a help text with its default at most once (issue 13, point 5).

Each Python script's `--help` runs through `runpy` in a fresh interpreter (as `python scripts/NAME.py --help` would),
which then reports whether `torch` was imported and what the argument parsers held. How long `--help` takes is
measured by `benchmarks/help_timing.py` (benchmarks/help-timing.md), not asserted here.
"""

import ast
import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SCRIPTS

PYTHON_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.py") if not p.name.startswith("_"))
SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh"))

# Runs `SCRIPT --help` and prints, last, one JSON line: the exit code, whether torch was imported, and each option of
# every parser that parsed (its help text as printed, and whether it takes an optional value like `--push [PUSH]`).
PROBE = """
import argparse, json, runpy, sys
from pathlib import Path

script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path.insert(0, str(Path(script).parent))
parsers = []
original = argparse.ArgumentParser.parse_known_args

def recording(self, *args, **kwargs):
    parsers.append(self)
    return original(self, *args, **kwargs)

argparse.ArgumentParser.parse_known_args = recording
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
options = []
for parser in parsers:
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        options.append({
            "name": "/".join(action.option_strings) or action.dest,
            "help": formatter._expand_help(action) if action.help else "",
            "optional_value": bool(action.option_strings) and action.nargs == "?" and action.const is True,
        })
print("\\n@@probe " + json.dumps({"exit": code, "torch": "torch" in sys.modules, "options": options}))
"""


def probe_help(name: str) -> tuple[dict, str]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(SCRIPTS / name)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    head, _, report = run.stdout.rpartition("\n@@probe ")
    assert report, f"{name} --help did not finish: {run.stderr[-2000:]}"
    return json.loads(report), head


def continued_example_lines(path) -> list[str]:
    """The lines of the module docstring, as written in the source, that end in a backslash continuation."""
    source = path.read_text()
    node = ast.parse(source).body[0]
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
        return []
    literal = ast.get_source_segment(source, node)
    return [line.rstrip() for line in literal.splitlines() if line.rstrip().endswith("\\")]


@pytest.mark.parametrize("name", PYTHON_SCRIPTS)
def test_python_script_help(name):
    report, printed = probe_help(name)
    assert report["exit"] == 0, printed
    assert "usage:" in printed
    assert not report["torch"], f"{name} --help imported torch: parse the arguments before the heavy imports"
    lines = {line.rstrip() for line in printed.splitlines()}
    collapsed = [line for line in continued_example_lines(SCRIPTS / name) if line not in lines]
    assert not collapsed, f"{name} --help does not show these example lines as written: {collapsed}"
    assert report["options"], f"{name} --help went through no argparse parser"
    for option in report["options"]:
        assert option["help"].strip(), f"{name}: {option['name']} has no help text"
        assert option["help"].lower().count("default") <= 1, f"{name}: {option['name']}: {option['help']!r}"
        assert not option["optional_value"], f"{name}: {option['name']} takes an optional value; make it a switch"


@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_shell_script_help(name):
    run = subprocess.run(["bash", str(SCRIPTS / name), "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage: bash scripts/" + name in run.stdout
    assert run.stderr == ""  # nothing ran: no stage, no set-up
