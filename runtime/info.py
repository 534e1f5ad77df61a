"""What `dsv4rt info` shows: backends and their probes, plug-ins, environment, and per op what would run.

Nothing here initialises a device: backends are probed (cheap by contract) and only *available* ones are
loaded to list their implementations; an unavailable backend is never loaded (no torch_npu import).
"""
from __future__ import annotations

import os
from typing import Any

from . import __version__, env
from .errors import BackendSelectionError, PluginLoadError
from .registry import REGISTRY, Registry
from .select import explicit_choice, parse_choice

__all__ = ["list_backends", "diagnose", "format_info", "matrix"]


def list_backends(registry: Registry | None = None) -> list[dict]:
    """Every backend source: discovered backends with their probe, then plug-ins that failed or were skipped."""
    reg = registry or REGISTRY
    backends = reg.backends()
    records = reg.plugin_records()
    source = {r.name: r.source for r in records if r.status == "loaded"}
    out = []
    for name, b in backends.items():
        probe = reg.probe(name)
        out.append({"name": name, "device_type": b.device_type, "available": bool(probe.available),
                    "reason": probe.reason, "capabilities": dict(probe.capabilities),
                    "source": source.get(name, "?"), "status": "loaded", "description": b.description})
    for r in records:
        if r.status != "loaded" and r.name not in backends:
            out.append({"name": r.name, "device_type": "", "available": False,
                        "reason": f"plug-in {r.status}: {r.reason}", "capabilities": {},
                        "source": r.source, "status": r.status, "description": ""})
    return out


def _load_available(reg: Registry, backends: list[dict]) -> dict[str, list]:
    """Implementations of every available backend; records load failures on the backend entries."""
    impls: dict[str, list] = {}
    for b in backends:
        b["loaded"], b["load_error"] = False, None
        if b["status"] != "loaded" or not b["available"]:
            continue
        try:
            impls[b["name"]] = reg.load(b["name"])
            b["loaded"] = True
        except PluginLoadError as exc:
            b["load_error"] = str(exc)
    return impls


def _variant_row(impl: Any, caps: dict) -> dict:
    missing = sorted(r for r in impl.requires if not caps.get(r))
    return {"name": impl.name, "backend": impl.backend, "variant": impl.variant,
            "device_type": impl.device_type, "priority": impl.priority, "requires": sorted(impl.requires),
            "has_supports": impl.supports is not None, "runnable": not missing,
            "reason": f"needs capabilities {', '.join(missing)}" if missing else ""}


def _would_choose(op: str, device_type: str, rows: list[dict], prefs: list[str] | None) -> dict:
    """The implementation automatic selection (or DSV4RT_OP_BACKEND) would pick before supports(args)."""
    cands = [r for r in rows if r["runnable"] and r["device_type"] == device_type]
    try:
        forced = explicit_choice(op, None, ())
    except BackendSelectionError as exc:
        return {"impl": None, "why": str(exc)}
    if forced is not None:
        name, variant = parse_choice(forced[0], forced[1])
        cands = [r for r in cands if r["backend"] == name and variant in (None, r["variant"])]
        why = forced[1]
    elif prefs:
        why = "first backend in DSV4RT_BACKEND with a runnable implementation"
        cands = next(([r for r in cands if r["backend"] == p] for p in prefs
                      if any(r["backend"] == p for r in cands)), [])
    else:
        why = "highest priority"
    if not cands:
        return {"impl": None, "why": f"nothing runnable on {device_type}" + (f" ({why})" if forced else "")}
    return {"impl": max(cands, key=lambda r: r["priority"])["name"], "why": why}


def diagnose(registry: Registry | None = None) -> dict:
    """Everything `dsv4rt info` prints, as a JSON-serialisable dict."""
    reg = registry or REGISTRY
    backends = list_backends(reg)
    impls = _load_available(reg, backends)
    caps = {b["name"]: b["capabilities"] for b in backends}
    device_types = sorted({b["device_type"] for b in backends if b["available"] and b["status"] == "loaded"}
                          | {i.device_type for lst in impls.values() for i in lst})
    prefs = [p.strip() for p in env.get("DSV4RT_BACKEND").split(",") if p.strip()] or None
    ops = {}
    for op, spec in reg.specs.items():
        rows = [_variant_row(i, caps[name]) for name, lst in impls.items() for i in lst if i.op == op]
        ops[op] = {"family": spec.family, "variants": rows,
                   "chosen": {d: _would_choose(op, d, rows, prefs) for d in device_types}}
    not_loaded = {b["name"]: b["reason"] if not b["available"] else b["load_error"]
                  for b in backends if b["status"] == "loaded" and not b.get("loaded")}
    return {
        "version": __version__,
        "backends": backends,
        "plugins": [{"name": r.name, "source": r.source, "status": r.status, "reason": r.reason}
                    for r in reg.plugin_records()],
        "env": {"in_effect": env.in_effect(), "unknown": env.unknown()},
        "triton_interpret": {"enabled": env.flag("DSV4RT_TRITON_INTERPRET"),
                             "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "")},
        "device_types": device_types,
        "not_loaded": not_loaded,
        "ops": ops,
    }


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_info(d: dict) -> str:
    """Plain-text rendering of :func:`diagnose`'s dict."""
    out = [f"dsv4rt {d['version']}", "", "Backends:"]
    rows = [["name", "device", "available", "source", "reason"]]
    for b in d["backends"]:
        state = "yes" if b["available"] else ("no" if b["status"] == "loaded" else b["status"])
        if b.get("load_error"):
            state = "load failed"
        rows.append([b["name"], b["device_type"] or "-", state, b["source"], b.get("load_error") or b["reason"]])
    out += _table(rows)
    for b in d["backends"]:
        if b["capabilities"]:
            out.append(f"  {b['name']} capabilities: " + ", ".join(f"{k}={v}" for k, v in b["capabilities"].items()))
    out += ["", "Plug-ins:"]
    out += _table([["name", "status", "source", "reason"]]
                  + [[p["name"], p["status"], p["source"], p["reason"]] for p in d["plugins"]])
    out += ["", "Environment:"]
    unknown = set(d["env"]["unknown"])
    for k, v in sorted(d["env"]["in_effect"].items()):
        out.append(f"  {k}={v}" + ("   <- UNKNOWN: not a dsv4rt variable (typo?)" if k in unknown else ""))
    if not d["env"]["in_effect"]:
        out.append("  (no DSV4RT_* variable set)")
    t = d["triton_interpret"]
    out.append(f"  Triton interpreter mode: {'ON' if t['enabled'] else 'off'}"
               + (f" (TRITON_INTERPRET={t['TRITON_INTERPRET']})" if t["TRITON_INTERPRET"] else ""))
    out += ["", "Ops (chosen = automatic choice per device type; supports(args) may still refuse a call):"]
    for op, o in d["ops"].items():
        chosen = ", ".join(f"{dev}: {c['impl'] or '(none)'}" + ("" if c["why"] == "highest priority" else
                                                                  f" [{c['why']}]")
                           for dev, c in o["chosen"].items()) or "(no device available)"
        out.append(f"  {op:<18} {chosen}")
        for v in sorted(o["variants"], key=lambda v: (v["device_type"], -v["priority"])):
            extra = (" requires " + ",".join(v["requires"]) if v["requires"] else "") + \
                    (" +supports()" if v["has_supports"] else "") + (f" NOT RUNNABLE: {v['reason']}" if v["reason"] else "")
            out.append(f"      {v['name']:<18} on {v['device_type']:<6} priority {v['priority']}{extra}")
    if d["not_loaded"]:
        out += ["", "Not loaded (implementations not listed):"]
        out += [f"  {n}: {r}" for n, r in d["not_loaded"].items()]
    out += ["", "See `dsv4rt info --matrix` for the op x backend table, `--json` for all of this as JSON."]
    return "\n".join(out)


def matrix(registry: Registry | None = None) -> str:
    """Markdown table op x backend: the variants each backend implements ('?' = backend not loaded here)."""
    reg = registry or REGISTRY
    backends = [b for b in list_backends(reg) if b["status"] == "loaded"]
    impls = _load_available(reg, backends)
    names = [b["name"] for b in backends]
    lines = ["| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op in reg.specs:
        cells = []
        for n in names:
            if n not in impls:
                offers = reg.backends()[n].offers() if n in reg.backends() else {}
                cells.append("?" if not offers else (", ".join(offers[op]) + "*" if op in offers else "—"))
                continue
            variants = list(dict.fromkeys(i.variant for i in impls[n] if i.op == op))
            cells.append(", ".join(variants) or "—")
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    missing = [b for b in backends if b["name"] not in impls]
    if missing:
        lines.append("")
        lines.append("\\* declared by the backend (`Backend.offers()`), not loaded on this machine; "
                     "? = not declared and not loaded:")
        lines += [f"- {b['name']}: {b['load_error'] or 'unavailable: ' + b['reason']}" for b in missing]
    return "\n".join(lines)
