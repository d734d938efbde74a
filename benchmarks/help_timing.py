"""Time `--help` of every script in scripts/ (Python and shell) and of the Space (space/app.py), and a bare
`import modeling_skinlesion`, and record whether each imported torch.

    python benchmarks/help_timing.py                         # writes benchmarks/help-timing.md
    python benchmarks/help_timing.py --repeats 5 --out /tmp/help.md

Each script is run as a user runs it (`python scripts/NAME.py --help`, `bash scripts/NAME.sh --help`) in a fresh
process, `--repeats` times; the table gives the median and the slowest wall time, the exit code, and, for a Python
script, whether `torch` was in `sys.modules` once the help was printed (a second run through `runpy` tells). The
targets: an answer in under 3 s (issue 13; the Space too, issue 21) and the package import under 1 s (issue 21); the
machine is shared, so read the figures as indicative.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
TARGET_SECONDS = 3.0
IMPORT_TARGET_SECONDS = 1.0
IMPORT = "import modeling_skinlesion"

# Run a script's `--help` through runpy (as `python scripts/NAME.py --help` would) and report what it imported.
PROBE = """
import json, runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
heavy = ("torch", "transformers", "datasets", "timm", "gradio", "modeling_skinlesion")
print("\\n@@probe " + json.dumps({"exit": code, "imported": [m for m in heavy if m in sys.modules]}))
"""


def scripts() -> list[Path]:
    """Every entry point: scripts/*.py (not the `_`-prefixed helper modules) and scripts/*.sh."""
    python = [p for p in sorted(SCRIPTS.glob("*.py")) if not p.name.startswith("_")]
    return python + sorted(SCRIPTS.glob("*.sh")) + [REPO_ROOT / "space" / "app.py"]


def command(script: Path) -> list[str]:
    return ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]


def time_import(repeats: int, env: dict[str, str]) -> dict[str, object]:
    """`python -c "import modeling_skinlesion"` in a fresh process, and what that import loaded."""
    times, cpu_times, codes, imported = [], [], set(), None
    heavy = ("torch", "transformers", "datasets", "timm", "gradio")
    probe = f"{IMPORT}; import sys, json; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        codes.add(run.returncode)
        imported = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else ["import failed"]
    return {
        "script": IMPORT,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "cpu_s": statistics.median(cpu_times),
        "exit": sorted(codes),
        "usage": None,
        "imported": imported,
        "target_s": IMPORT_TARGET_SECONDS,
    }


def time_help(script: Path, repeats: int, env: dict[str, str]) -> dict[str, object]:
    times, cpu_times, codes, usage = [], [], set(), True
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run([*command(script), "--help"], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        codes.add(run.returncode)
        usage = usage and "usage" in run.stdout.lower()
    row: dict[str, object] = {
        "script": str(script.relative_to(REPO_ROOT)) if script.parent.name == "space" else script.name,
        "median_s": statistics.median(times),
        "max_s": max(times),
        "cpu_s": statistics.median(cpu_times),
        "exit": sorted(codes),
        "usage": usage,
        "imported": None,
        "target_s": TARGET_SECONDS,
    }
    if script.suffix == ".py":
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(script)], capture_output=True, text=True, env=env, cwd=REPO_ROOT
        )
        lines = [line for line in probe.stdout.splitlines() if line.startswith("@@probe ")]
        row["imported"] = json.loads(lines[-1].removeprefix("@@probe "))["imported"] if lines else ["probe failed"]
    return row


def markdown(rows: list[dict[str, object]], repeats: int) -> str:
    lines = [
        "# `--help` of every script",
        "",
        f"`python benchmarks/help_timing.py` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs shared with other jobs, Python {platform.python_version()}): wall time of "
        f"`--help` in a fresh process, median and slowest of {repeats} runs; target under {TARGET_SECONDS:g} s "
        f"(the bare package import: under {IMPORT_TARGET_SECONDS:g} s). "
        "CPU is the process's user + system time (median): what it would take on an idle core, whatever the load. "
        '"heavy imports" lists which of torch, transformers, datasets, timm, gradio and the package were loaded by '
        "the time the help was printed (shell scripts: not probed).",
        "",
        "| script | median (s) | slowest (s) | CPU (s) | exit | prints usage | heavy imports | under target |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for row in rows:
        imported = "n/a" if row["imported"] is None else (", ".join(row["imported"]) or "none")
        fast = "yes" if row["median_s"] < row["target_s"] else "NO"
        usage = "n/a" if row["usage"] is None else "yes" if row["usage"] else "no"
        lines.append(
            f"| `{row['script']}` | {row['median_s']:.2f} | {row['max_s']:.2f} | {row['cpu_s']:.2f} "
            f"| {','.join(map(str, row['exit']))} "
            f"| {usage} | {imported} | {fast} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per script; the median is reported (default 3).")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "help-timing.md", help="Markdown table to write."
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="Time only these scripts (file names; 'import' for the package)."
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}.")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    selected = [p for p in scripts() if args.only is None or p.name in args.only]
    rows = [time_import(args.repeats, env)] if args.only is None or "import" in args.only else []
    for script in selected:
        row = time_help(script, args.repeats, env)
        print(
            f"{row['script']:30s} median {row['median_s']:.2f} s, max {row['max_s']:.2f} s, CPU {row['cpu_s']:.2f} s"
        )
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args.repeats))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
