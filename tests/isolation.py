"""Run Python code in a process that cannot import this repository's package, as a Hub user would.

`run_isolated(code, cwd)` sends the code to one such process kept for the whole test session (started on first use),
so the suite imports torch and transformers there once instead of once per test. Each piece of code runs in a fresh
namespace, from its own working directory; remote-code modules loaded from different folders are different modules
(transformers names them after the folder and a hash of its files), so one test never runs another's model code.
Code that needs its own environment variables (libraries read them at import time) gets a fresh process instead.
"""

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

_BLOCKER = '''
import importlib.abc
import sys


class _BlockSkinLesion(importlib.abc.MetaPathFinder):
    """The package is installed (editable) in this venv; a real Hub user does not have it."""

    def find_spec(self, name, path=None, target=None):
        if name == "modeling_skinlesion" or name.startswith("modeling_skinlesion."):
            raise ImportError(f"{name} is blocked: this process must load the model through remote code only")
        return None


sys.meta_path.insert(0, _BlockSkinLesion())
'''

_DONE = "\x1eISOLATED-DONE\x1e"

# The worker's loop: one JSON request per stdin line ({"script": path, "cwd": folder}); it runs the script file as
# __main__ with Python-level stdout captured, then writes the marker and a JSON reply on one line.
_WORKER_LOOP = f"""
import contextlib
import io
import json
import os
import traceback

for _line in sys.stdin:
    _request = json.loads(_line)
    os.chdir(_request["cwd"])
    _out = io.StringIO()
    _error = None
    try:
        with contextlib.redirect_stdout(_out):
            _source = open(_request["script"]).read()
            _globals = {{"__name__": "__main__", "__file__": _request["script"]}}
            exec(compile(_source, _request["script"], "exec"), _globals)
    except SystemExit as _exit:
        if _exit.code not in (None, 0):
            _error = f"SystemExit({{_exit.code!r}})"
    except BaseException:
        _error = traceback.format_exc()
    sys.__stdout__.write({_DONE!r} + json.dumps({{"stdout": _out.getvalue(), "error": _error}}) + "\\n")
    sys.__stdout__.flush()
"""


def _environment(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "PYTHONNOUSERSITE": "1"})
    env.update(extra or {})
    return env


class _Worker:
    """One isolated Python process that runs script files on request."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="isolated-worker-"))
        (self.folder / "worker.py").write_text(_BLOCKER + _WORKER_LOOP)
        self.stderr = (self.folder / "stderr.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-P", str(self.folder / "worker.py")],
            cwd=self.folder,
            env=_environment(self.folder / "hf_home"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the process ended

    def run(self, script: Path, cwd: Path, timeout: float) -> str:
        start = self.stderr.tell()
        self.process.stdin.write(json.dumps({"script": str(script), "cwd": str(cwd)}) + "\n")
        self.process.stdin.flush()
        stray = []  # anything written to the process's stdout outside Python (a C library), kept for the report
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise AssertionError(f"isolated code ran past {timeout} s:\n{self._stderr_since(start)}") from None
            if line is None:
                raise AssertionError(f"isolated process died:\n{''.join(stray)}\n{self._stderr_since(start)}")
            if line.startswith(_DONE):
                reply = json.loads(line[len(_DONE) :])
                break
            stray.append(line)
        if reply["error"] is not None:
            raise AssertionError(
                f"isolated code failed:\n{reply['stdout']}\n{reply['error']}\n{self._stderr_since(start)}"
            )
        return "".join(stray) + reply["stdout"]

    def _stderr_since(self, offset: int) -> str:
        self.stderr.flush()
        self.stderr.seek(offset)
        text = self.stderr.read()
        self.stderr.seek(0, os.SEEK_END)
        return text[-5000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait()


_worker: _Worker | None = None


def _shared_worker() -> _Worker:
    global _worker
    if _worker is None or not _worker.alive():
        _worker = _Worker()
        atexit.register(_worker.close)
    return _worker


def run_isolated(code: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """Run `code` with `modeling_skinlesion` unimportable, from `cwd`, offline; return stdout or raise with stderr.

    Without `env` the code runs in the session's shared isolated process; with `env` in a fresh one."""
    cwd = Path(cwd)
    cwd.mkdir(parents=True, exist_ok=True)
    script = cwd / "isolated_main.py"
    if env is None:
        script.write_text(textwrap.dedent(code))
        return _shared_worker().run(script, cwd, timeout)
    script.write_text(_BLOCKER + textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, "-P", str(script)],
        cwd=cwd,
        env=_environment(cwd / "hf_home", env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated process failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout
