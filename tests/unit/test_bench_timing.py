"""The CPU timer's data flush: inputs evicted with dsv4rt._C.evict where the extension is built."""
import pytest
import torch

from dsv4rt.bench.timing import _evictor, cold_data_flush, time_call


def test_evict_flushes_inputs_and_keeps_results():
    pytest.importorskip("dsv4rt._C", reason="the native extension is not built: the timer streams a buffer instead")
    x = torch.randn(1000, 300)
    view = x[:, ::3]                      # a strided view: its whole storage is evicted
    ev = _evictor([x, view, torch.empty(0), 3])
    assert ev is not None and cold_data_flush(torch.device("cpu"))
    before = x.clone()
    ev()
    assert torch.equal(x, before)        # clflush writes back, never drops data
    t = time_call(lambda: x.sum(), torch.device("cpu"), reps=3, cold=[x])
    assert t["reps"] == 3 and t["median_us"] > 0


def test_without_cold_tensors_the_buffer_flush_is_used():
    assert _evictor(None) is None
    t = time_call(lambda: None, torch.device("cpu"), reps=2)
    assert t["reps"] == 2
