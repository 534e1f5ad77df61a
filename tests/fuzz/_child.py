"""Running fuzz cases in a child process, so a native crash (SIGFPE, SIGSEGV) is a test failure naming the
case instead of a dead test run.

``run_cases(cases, env)`` runs the Python snippets of ``cases`` (name -> code using ``torch``, ``dsv4rt``
and the variant name ``V``) one after another in ONE child process and returns name -> outcome:
``"ok"``, ``"dsv4rt <ErrorClass>: message"`` (a Dsv4rtError: a clean refusal), ``"raw <Class>: message"``
(any other exception: a finding) or ``"crash <signal>"`` for the case that killed the child (the cases
after it then run in a fresh child).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

_RUNNER = r"""
import json, sys
import torch, dsv4rt
cases = json.loads(sys.stdin.read())
for name, (variant, code) in cases.items():
    print("START " + name, flush=True)
    try:
        V = variant
        exec(code, {"torch": torch, "dsv4rt": dsv4rt, "V": V})
        res = "ok"
    except dsv4rt.errors.Dsv4rtError as e:
        res = f"dsv4rt {type(e).__name__}: {str(e)[:300]}"
    except Exception as e:
        res = f"raw {type(e).__name__}: {str(e)[:300]}"
    print("RESULT " + json.dumps([name, res]), flush=True)
"""


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env.update(extra or {})
    return env


def run_cases(cases: dict[str, tuple[str, str]], env: dict[str, str] | None = None,
              timeout: float = 600) -> dict[str, str]:
    """name -> outcome for ``cases`` (name -> (variant, code)); a crash restarts the child after that case."""
    results: dict[str, str] = {}
    todo = dict(cases)
    while todo:
        proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(todo), capture_output=True,
                              text=True, env=_clean_env(env), timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                name, res = json.loads(line[7:])
                results[name] = res
                todo.pop(name, None)
                started = None
        if proc.returncode != 0:
            if started is None:   # died outside any case: report every remaining one
                for name in todo:
                    results[name] = f"crash rc={proc.returncode}: {proc.stderr[-500:]}"
                break
            results[started] = f"crash rc={proc.returncode} (signal {-proc.returncode if proc.returncode < 0 else '-'})"
            todo.pop(started, None)
        elif todo:   # exited cleanly without finishing: should not happen
            for name in todo:
                results[name] = "not run"
            break
    return results


CPU_VARIANTS = ("cpu/native", "cpu/numpy", "cpu/torch")
INTERPRETER_VARIANTS = ("cuda/triton", "cuda/torch")


def assert_ok_on_variants(snippets: dict[str, str], interp: bool, cpu: tuple[str, ...] = CPU_VARIANTS) -> None:
    """Run every snippet (name -> code) on every CPU variant, or with ``interp`` on the cuda variants under
    Triton's interpreter, and fail naming each case whose outcome is not "ok"."""
    variants = INTERPRETER_VARIANTS if interp else cpu
    cases = {f"{name} @ {v}": (v, code) for name, code in snippets.items() for v in variants}
    res = run_cases(cases, env={"DSV4RT_TRITON_INTERPRET": "1"} if interp else None)
    bad = [f"{k}: {r}" for k, r in res.items() if r != "ok"]
    assert not bad, "\n".join(bad)
