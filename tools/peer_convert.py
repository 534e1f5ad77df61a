"""Run llama.cpp's own converter (convert_hf_to_gguf.py) on a dsv4rt synthetic checkpoint (tools/peer_bench.sh).

``python tools/peer_convert.py LLAMA_CPP_DIR CKPT_DIR OUT.gguf [converter args...]``

The converter is run unmodified, with one exception, printed when it applies: it identifies a BPE
tokenizer's pre-tokenizer by hashing the ids it gives for a fixed text, and refuses a tokenizer whose hash
it does not list. The synthetic checkpoint's tokenizer (tools/peer_prepare.py: no merges, one token per
byte) is in no list, so the refusal is answered with ``deepseek-v3``, the pre-tokenizer the converter
records for the released DeepSeek tokenizers. It decides only how llama.cpp splits text into words before
BPE; llama-bench feeds token ids, so the measured speed does not depend on it.
"""
from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit("usage: python tools/peer_convert.py LLAMA_CPP_DIR CKPT_DIR OUT.gguf [converter args...]")
    src, ckpt, out, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    sys.path[:0] = [src, os.path.join(src, "gguf-py")]
    import convert_hf_to_gguf as conv  # noqa: E402  (llama.cpp's converter, from its own source tree)
    from conversion.base import TextModel  # noqa: E402

    known = TextModel.get_vocab_base_pre

    def pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            print("peer_convert: the converter does not know this tokenizer's pre-tokenizer hash (a synthetic "
                  "tokenizer); recording it as 'deepseek-v3'", file=sys.stderr)
            return "deepseek-v3"

    TextModel.get_vocab_base_pre = pre
    sys.argv = ["convert_hf_to_gguf.py", ckpt, "--outfile", out, *rest]
    conv.main()


if __name__ == "__main__":
    main()
