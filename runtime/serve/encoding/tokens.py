"""The control-token strings of the DeepSeek-V4 chat format. Each is ONE token of the released
``tokenizer.json`` (V4: ``<｜User｜>`` 128803, ``<｜Assistant｜>`` 128804, ``<think>`` 128821, ``</think>``
128822, ``｜DSML｜`` 128825; BOS 0, EOS 1), which the encoders rely on: a tokenizer that would spell them
out as text (the byte tokenizer of the synthetic presets) cannot carry this format."""
from __future__ import annotations

__all__ = ["BOS", "EOS", "USER", "ASSISTANT", "SYSTEM", "THINK_START", "THINK_END", "DSML", "V4_CONTROL",
           "V41_CONTROL"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SYSTEM = "<｜System｜>"          # V4.1 only
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"

V4_CONTROL = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)
"""The tokens a V4 prompt or completion uses: a tokenizer must hold each as a single token."""
V41_CONTROL = V4_CONTROL + (SYSTEM,)
