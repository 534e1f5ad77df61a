"""The interleaved rounds of tools/peer_bench.sh: llama-bench and ``dsv4rt run`` on the same weights.

``python tools/peer_bench.py --llama-bench BIN --threads 2 --rounds 3 --prompt 128 --gen 32 NAME=CKPT_DIR:GGUF ...``

Each round runs, per model, llama-bench (one repetition of pp PROMPT and tg GEN, each after its warm-up run:
the prompt once, one generated token) and then ``dsv4rt run --checkpoint CKPT_DIR --prompt-len PROMPT
--max-new-tokens GEN --warmup`` (greedy; the same warm-up, then its prefill and decode tokens/s; its decode
steps attend to the PROMPT tokens before them, llama-bench's tg starts from an empty context), both at
THREADS threads (llama-bench ``-t``; dsv4rt's native kernels through OMP_NUM_THREADS), so a change
of machine load hits both sides alike. Prints one row per round and the load (``uptime``) before each,
then the range per model and the ratios dsv4rt / llama.cpp. Timings are reported, never judged.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys


def _uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout
    m = re.search(r"load average: (.*)$", out.strip())
    return m.group(1) if m else out.strip()


def llama(bin_: str, gguf: str, threads: int, prompt: int, gen: int) -> tuple[float, float]:
    """(pp tok/s, tg tok/s) of one llama-bench repetition."""
    p = subprocess.run([bin_, "-m", gguf, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1",
                        "-o", "json"], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"llama-bench failed ({p.returncode}):\n{p.stderr[-3000:]}")
    rows = json.loads(p.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return float(pp), float(tg)


def dsv4rt(ckpt: str, threads: int, prompt: int, gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one ``dsv4rt run``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-m", "dsv4rt", "run", "--checkpoint", ckpt, "--prompt-len", str(prompt),
                        "--max-new-tokens", str(gen), "--warmup"], capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"dsv4rt run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    got = {}
    for line in p.stdout.splitlines():   # "prefill  128 tokens in 0.131 s = 978.7 tok/s" (the total line)
        m = re.match(r"\s*(prefill|decode)\b.*?=\s*([0-9.]+) tok/s", line)
        if m and m.group(1) not in got:
            got[m.group(1)] = float(m.group(2))
    if set(got) != {"prefill", "decode"}:
        raise SystemExit(f"dsv4rt run: no prefill / decode tok/s in its report:\n{p.stdout[-2000:]}")
    return got["prefill"], got["decode"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("models", nargs="+", help="NAME=CKPT_DIR:GGUF")
    a = ap.parse_args()
    models = []
    for spec in a.models:
        name, rest = spec.split("=", 1)
        ckpt, gguf = rest.rsplit(":", 1)
        models.append((name, ckpt, gguf))
    res: dict[str, list[tuple[float, float, float, float]]] = {m[0]: [] for m in models}
    print(f"threads {a.threads}, prompt {a.prompt}, new tokens {a.gen}, {a.rounds} interleaved rounds")
    print(f"| round | model | load (1/5/15 min) | llama.cpp pp | dsv4rt prefill | llama.cpp tg | dsv4rt decode |")
    print("|---|---|---|---|---|---|---|")
    for r in range(a.rounds):
        for name, ckpt, gguf in models:
            load = _uptime()
            pp, tg = llama(a.llama_bench, gguf, a.threads, a.prompt, a.gen)
            pf, dc = dsv4rt(ckpt, a.threads, a.prompt, a.gen)
            res[name].append((pp, pf, tg, dc))
            print(f"| {r + 1} | {name} | {load} | {pp:.1f} | {pf:.1f} | {tg:.1f} | {dc:.1f} |", flush=True)
    print("\n| model | llama.cpp pp tok/s | dsv4rt prefill tok/s | dsv4rt / llama.cpp | llama.cpp tg tok/s | dsv4rt decode tok/s | dsv4rt / llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in res.items():
        col = list(zip(*rows))

        def rng(v: tuple[float, ...]) -> str:
            return f"{min(v):.1f}-{max(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

        pr = [d / p for p, d in zip(col[0], col[1])]
        tr = [d / t for t, d in zip(col[2], col[3])]
        print(f"| {name} | {rng(col[0])} | {rng(col[1])} | {min(pr):.2f}-{max(pr):.2f} | {rng(col[2])} | "
              f"{rng(col[3])} | {min(tr):.2f}-{max(tr):.2f} |")


if __name__ == "__main__":
    main()
