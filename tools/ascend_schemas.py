"""Extract, from a torch-npu wheel (not installed), the facts the Ascend wiring tests bind against.

    pip download torch-npu==2.14.0 --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --python-version 3.11 -d /tmp/npu
    python tools/ascend_schemas.py /tmp/npu/torch_npu-2.14.0-*.whl > tests/data/ascend/torch_npu-2.14.0.txt

Writes, for every torch_npu op that ``backends/ascend/_npu.OPS`` lists:

- ``schema <string>``: every TorchScript schema (all overloads) of the op found in
  ``torch_npu/lib/libtorch_npu.so`` (the strings its ``TORCH_LIBRARY(npu, m)`` block defines; C++-typed
  documentation strings are skipped);
- ``dtype <name> <int>``: torch_npu's low-precision dtype constants, read from the dtype tables of
  ``torch_npu/op_plugin/meta/_meta_registrations.py`` (the values of ``torch_npu._C._cd.DType``);
- ``gmm_meta <arg> <dtype names>``: which values the meta (graph-mode) registration of
  ``npu_grouped_matmul`` accepts for its ``*_dtype`` arguments;
- ``doc_chips <op> <chips>``: the chips the op's docstring lists as supported (where it lists any).

Nothing is imported from the wheel: it is read as a zip.
"""
from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from pathlib import Path

OPS = ("npu_grouped_matmul", "npu_dynamic_mx_quant", "npu_dynamic_quant", "npu_format_cast",
       "npu_moe_init_routing_v2", "npu_moe_token_unpermute", "npu_lightning_indexer",
       "npu_fused_infer_attention_score")
_LIB = "torch_npu/lib/libtorch_npu.so"
_META = "torch_npu/op_plugin/meta/_meta_registrations.py"
_DOCS = "torch_npu/_op_plugin_docs.py"
_CPP_TYPES = ("SymIntArrayRef", "int64_t", "std::string", "TensorList out")


def schemas(blob: bytes) -> list[str]:
    found: set[str] = set()
    for raw in re.findall(rb"[\x20-\x7e]{20,}", blob):
        s = raw.decode()
        m = re.match(r"(?:npu::)?(npu_[a-z0-9_]+)(\.[A-Za-z_]+)?\(", s)
        if m and m.group(1) in OPS and "->" in s and not any(t in s for t in _CPP_TYPES):
            found.add(s[s.index("npu_"):])
    return sorted(found)


def dtypes(meta: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for value, name in re.findall(r"(\d+): \"torch_npu\.([a-z0-9_]+)\"", meta):
        out[name] = int(value)
    for value, name in re.findall(r"(\d+): torch\.(float8_e[45]m[23]fn?|float8_e5m2),", meta):
        if int(value) > 255:                      # torch_npu's own enum values, not torch's ScalarType
            out.setdefault(name, int(value))
    return out


def gmm_meta(meta: str) -> dict[str, list[str]]:
    start = meta.index('@impl(m, "npu_grouped_matmul.List")')
    body = meta[start:meta.index("y = []", start)]
    out = {}
    for arg in ("x_dtype", "weight_dtype", "scale_dtype", "per_token_scale_dtype"):
        m = re.search(rf"{arg} == torch_npu\.[^\n]*", body)
        if m:
            out[arg] = sorted(set(re.findall(r"torch_npu\.([a-z0-9_]+)", m.group(0))))
    return out


def doc_chips(docs: str) -> dict[str, list[str]]:
    """The chips each op's docstring (``torch_npu/_op_plugin_docs.py``) lists under its supported models."""
    out = {}
    for op in OPS:
        start = docs.find(f'"{op}",')
        if start < 0:
            continue
        end = docs.find("_add_torch_npu_docstr", start)
        m = re.search(r"支持的(?:芯片)?型号[:：]?\n((?:.+\n)+)", docs[start:end])
        if m:
            text = m.group(1)
            chips = [c for c, key in (("A2", "A2"), ("A3", "A3"), ("950", "950"), ("310P", "推理系列")) if key in text]
            out[op] = chips
    return out


def main(wheel: str) -> None:
    path = Path(wheel)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with zipfile.ZipFile(path) as z:
        lib = z.read(_LIB)
        meta = z.read(_META).decode()
        docs = z.read(_DOCS).decode().replace("\r\n", "\n")
    print(f"# torch_npu facts extracted by tools/ascend_schemas.py (not installed; read as a zip)")
    print(f"# wheel {path.name} sha256 {digest}")
    print(f"# schema: strings of {_LIB}; dtype and gmm_meta: {_META}; doc_chips: {_DOCS}")
    for s in schemas(lib):
        print(f"schema {s}")
    for name, value in sorted(dtypes(meta).items()):
        print(f"dtype {name} {value}")
    for arg, names in gmm_meta(meta).items():
        print(f"gmm_meta {arg} {' '.join(names)}")
    for op, chips in doc_chips(docs).items():
        print(f"doc_chips {op} {' '.join(chips)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/ascend_schemas.py torch_npu-<version>-*.whl")
    main(sys.argv[1])
