"""tools/ascend_schemas.py reads a torch-npu wheel as a zip and writes the facts the wiring tests bind against;
backends/ascend/fake_schemas.load_facts reads them back. A synthetic wheel checks the round trip."""
from __future__ import annotations

import contextlib
import io
import zipfile

from dsv4rt.backends.ascend.fake_schemas import load_facts

import ascend_schemas  # tools/ascend_schemas.py (tests/tools/conftest.py puts tools/ on sys.path)


META = '''
TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP = {
    24: torch.float8_e4m3fn,
    291: torch.float8_e5m2,
    292: torch.float8_e4m3fn,
}
TORCH_NPU_DTYPE_TO_STRING_MAP = {
    285: "torch_npu.int4",
    293: "torch_npu.float8_e8m0fnu",
    296: "torch_npu.float4_e2m1fn_x2",
}
@impl(m, "npu_grouped_matmul.List")
def npu_grouped_matmul_meta(x, weight, *, x_dtype=None, scale_dtype=None):
    if x_dtype is not None:
        torch._check(x_dtype == torch_npu.hifloat8 or x_dtype == torch_npu.float4_e2m1fn_x2, lambda: "")
    if scale_dtype is not None:
        torch._check(scale_dtype == torch_npu.float8_e8m0fnu, lambda: "")
    y = []
'''
DOCS = '_add_torch_npu_docstr(\r\n    "npu_moe_token_unpermute",\r\n    """\r\n支持的型号:\r\nAtlas A2训练系列产品\r\nAtlas A3训练系列产品\r\n\r\n"""\r\n)\r\n_add_torch_npu_docstr(\r\n'


def test_round_trip(tmp_path):
    schema = "npu_moe_token_unpermute(Tensor permuted_tokens, Tensor sorted_indices, Tensor? probs=None) -> Tensor"
    cpp = "npu_moe_token_unpermute(Tensor permuted_tokens, SymIntArrayRef x, int64_t y) -> Tensor"
    lib = b"\x00junk\x00" + schema.encode() + b"\x00" + cpp.encode() + b"\x00npu_other_op(Tensor a) -> Tensor\x00"
    wheel = tmp_path / "torch_npu-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch_npu/lib/libtorch_npu.so", lib)
        z.writestr("torch_npu/op_plugin/meta/_meta_registrations.py", META)
        z.writestr("torch_npu/_op_plugin_docs.py", DOCS)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ascend_schemas.main(str(wheel))
    facts_file = tmp_path / "torch_npu-9.9.9.txt"
    facts_file.write_text(out.getvalue())
    facts = load_facts(facts_file)
    assert facts.version == "9.9.9" and facts.wheel == wheel.name
    assert facts.schemas == (schema,)                         # the C++-typed string and other ops are skipped
    assert facts.dtypes == {"int4": 285, "float8_e8m0fnu": 293, "float4_e2m1fn_x2": 296, "float8_e5m2": 291,
                            "float8_e4m3fn": 292}
    assert facts.gmm_meta == {"x_dtype": ("float4_e2m1fn_x2", "hifloat8"), "scale_dtype": ("float8_e8m0fnu",)}
    assert facts.doc_chips == {"npu_moe_token_unpermute": ("A2", "A3")}
