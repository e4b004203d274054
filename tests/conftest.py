"""Shared fixtures and the markers.

Markers: every test under tests/gpu/ is marked `gpu` (so `-m gpu` selects the GPU tests and `-m "not gpu"` leaves
them out) and is skipped when torch sees no CUDA device. `slow` marks the tests that take over ~20 s on one CI
core (an example script in a child process, a pipeline under torch.compile); `-m "not slow"` leaves them out for
a quick loop, CI runs everything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parent / "gpu"


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if GPU_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(no_cuda)


@pytest.fixture
def make_problem():
    """Factory of AttentionProblem: a small GQA, causal, NHD bf16 call on an sm_90 device with LSE; keyword
    arguments override any field."""
    from sage3_diffusers.backends.base import AttentionProblem

    def make(**overrides):
        base = dict(batch=1, heads_q=4, heads_kv=2, seq_q=77, seq_kv=300, head_dim=128, head_dim_v=128,
                    dtype=torch.bfloat16, device_type="cuda", capability=(9, 0), layout="NHD", is_causal=True,
                    return_lse=True, has_mask=False)
        base.update(overrides)
        return AttentionProblem(**base)
    return make


@pytest.fixture
def emulate_fallback():
    """Families without a runnable kernel run their torch emulation (what the CPU tests check against)."""
    import sage3_diffusers as s3
    s3.set_fallback("emulate")
    yield
    s3.set_fallback(None)


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def fresh_seed():
    """A new random seed per test (printed in assertion messages so a failure can be replayed)."""
    return int.from_bytes(os.urandom(4), "little") % (2 ** 31)


@pytest.fixture
def fake_perf_table(monkeypatch):
    """Installs a speed table for a pretend current card: fake_perf_table({backend: {mode: {head_dim: points}}},
    card=..., capability=...). The dispatcher's cache is cleared before and after."""
    from sage3_diffusers import dispatch, perf_model

    def install(tflops: dict, *, card: str = "Fake GPU 80GB", capability=(9, 0), modes=None):
        seen = modes or sorted({m for per_mode in tflops.values() for m in per_mode})
        table = perf_model.PerfTable.from_dict({
            "card": card, "capability": list(capability) if capability else None,
            "source": {"json": "test table", "date": "test"}, "modes": {m: "test" for m in seen},
            "tflops": {b: {m: {str(hd): pts for hd, pts in per_d.items()} for m, per_d in per_mode.items()}
                       for b, per_mode in tflops.items()}})
        slug = perf_model.card_slug(card)
        monkeypatch.setattr(perf_model, "current_card", lambda: card)
        monkeypatch.setattr(perf_model, "load_table", lambda s: table if s == slug else None)
        dispatch._cache.clear()
        return table
    yield install
    dispatch._cache.clear()
