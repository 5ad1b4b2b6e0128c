"""The decoding cache (qtg.model.cache): preallocated, written in place, grown or refused past its capacity;
ids checked once per request; engine rows in row slots; a compiled decoding step equal to the eager one."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qtg
from qtg.errors import GenerationError
from qtg.generate import generate
from qtg.model.cache import QTGCache
from qtg.model.decode import CompiledDecoder, compile_unavailable
from qtg.serve.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside the block, by name (``cat``, ``min``, ...)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=["qtg", "baseline"])
def model(request, micro_cfg):
    cfg = micro_cfg if request.param == "qtg" else micro_cfg.replace(arch="baseline")
    return qtg.build(cfg, seed=0).eval()


def test_decoding_writes_into_the_same_storage_without_cat(model, ids):
    cache = QTGCache()
    with torch.inference_mode():
        model(ids[:, :8], cache=cache)
        ptrs = cache.storage_ptrs()
        ops = CountOps()
        with ops:
            for t in range(8, 20):
                model(ids[:, t:t + 1], cache=cache)
    assert len(ptrs) == 2 * model.cfg.n_layers + (2 if model.has_topofilter else 0)
    assert cache.storage_ptrs() == ptrs  # written by index into the buffers made at the prompt
    assert cache.slots == model.cfg.max_seq_len and cache.length == 20
    assert ops.counts.get("cat", 0) == 0, ops.counts  # nothing rebuilt per token
    assert ops.counts.get("copy_", 0) + ops.counts.get("index_put_", 0) > 0  # the writes are there, in place


def test_a_cache_grows_past_its_capacity_and_stays_exact(model, ids):
    cache = QTGCache(capacity=4)
    with torch.inference_mode():
        full = model(ids[:, :12]).logits
        model(ids[:, :3], cache=cache)
        ptrs = cache.storage_ptrs()
        steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(3, 12)]
    assert cache.slots == 16 and cache.length == 12 and cache.storage_ptrs() != ptrs  # doubled twice: 4 -> 8 -> 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 3:], rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape[2] == 12  # readers see the filled slots only


def test_a_static_cache_refuses_to_run_past_its_capacity(micro, ids):
    cache = QTGCache(capacity=6)
    with torch.inference_mode():
        micro(ids[:1, :5], cache=cache)
        cache.make_ragged(static=True)
        micro(ids[:1, 5:6], cache=cache)  # the sixth slot
        with pytest.raises(ValueError, match="static cache is full: all 6 slots"):
            micro(ids[:1, 6:7], cache=cache)
        with pytest.raises(ValueError, match=r"takes \[1, 1\] ids per step, got \[1, 2\]"):
            micro(ids[:1, 6:8], cache=cache)


def test_ids_are_checked_once_per_request(micro, ids):
    """A checked cache's steps read no id range (two host syncs on a GPU); every public entry still refuses."""
    counts = {}
    for checked in (False, True):
        cache = QTGCache(checked_ids=checked)
        with torch.inference_mode():
            micro(ids[:, :8], cache=cache)
            with CountOps() as ops:
                micro(ids[:, 8:9], cache=cache)
        counts[checked] = ops.counts.get("min", 0) + ops.counts.get("max", 0)
    assert counts == {False: 2, True: 0}
    bad = torch.tensor([[1, 2, 512]])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\); got ids from 1 to 512"):
        micro(bad)
    with pytest.raises(ValueError, match="token ids must lie"):
        micro(bad, cache=QTGCache())
    with pytest.raises(GenerationError, match="token id 512 at row 0, position 2 is out of vocabulary"):
        generate(micro, bad, 3)
    engine = Engine(micro, start=False)
    with pytest.raises(GenerationError, match="token id 512 at row 0, position 2 is out of vocabulary"):
        engine.submit(bad, 3)
    engine.close()


def test_rows_take_and_give_back_slots(micro, ids):
    """add_rows copies only the new rows into free slots; keep_rows refills a leaving row's slot from the end."""
    rows = []
    for b in range(4):
        c = QTGCache()
        with torch.inference_mode():
            micro(ids[b % 2:b % 2 + 1, :5 + 3 * b], cache=c)
        rows.append(c.make_ragged())
    batch = rows[0]
    batch.add_rows(rows[1])  # grows the row slots to 2
    batch.add_rows(rows[2])  # to 4
    ptrs = batch.storage_ptrs()
    batch.add_rows(rows[3])  # a free slot: no reallocation
    assert batch.storage_ptrs() == ptrs and batch.rows == 4 and batch.lengths.tolist() == [5, 8, 11, 14]
    assert batch.length == 14 and batch.points.shape[:2] == (4, 14)
    order = batch.keep_rows([1, 3])
    assert order == [3, 1] and batch.lengths.tolist() == [14, 8] and batch.length == 14
    assert batch.points[0, :14].equal(rows[3].points[0]) and batch.points[1, :8].equal(rows[1].points[0])
    assert batch.storage_ptrs() == ptrs


def test_an_engine_step_does_not_copy_the_cache(micro):
    engine = Engine(micro, start=False)
    reqs = [engine.submit(torch.tensor([3, 4, 5][:n]), 6, temperature=0) for n in (1, 2, 3)]
    engine.step()  # prefill and join
    group = engine._groups[0]
    ptrs = group.cache.storage_ptrs()
    with CountOps() as ops:
        engine.step()
    assert group.cache.storage_ptrs() == ptrs and ops.counts.get("cat", 0) == 0, ops.counts
    while not engine.idle:
        engine.step()
    for req, n in zip(reqs, (1, 2, 3)):
        assert req.tokens() == generate(micro, torch.tensor([3, 4, 5][:n]), 6, temperature=0)[0, n:].tolist()


@pytest.mark.slow
def test_compiled_decoding_equals_eager_decoding(micro_cfg, ids):
    """Greedy tokens from the compiled static-cache step are the eager model's, logits to float32 rounding.

    One block of micro (init_std 0.3, so the tokens vary): compiling is the cost here (~1-2 minutes of C++)."""
    reason = compile_unavailable()  # here, not at collection: it compiles a function
    if reason is not None:
        pytest.skip(f"torch.compile (inductor) cannot run here: {reason}")
    micro = qtg.build(micro_cfg.replace(n_layers=1, init_std=0.3), seed=0).eval()
    dec = CompiledDecoder(micro, capacity=48)
    prompt = ids[:, :8]
    with torch.inference_mode():
        cache, logits = dec.prefill(prompt)
        tokens, steps = [], []
        for _ in range(12):
            nxt = logits.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits = dec.step(nxt, cache)
            steps.append(logits)
        seq = torch.cat([prompt, *tokens], dim=1)
        eager = micro(seq).logits[:, 8:]  # the uncached forward of the same tokens
    tokens = torch.cat(tokens, dim=1)
    assert torch.equal(tokens, generate(micro, prompt, 12, temperature=0)[:, 8:])
    assert len(set(tokens.flatten().tolist())) > 3  # not one token repeated: the comparison has teeth
    torch.testing.assert_close(torch.stack(steps, dim=1), eager, rtol=1e-5, atol=1e-5)
    cache.widest = 48
    with pytest.raises(ValueError, match="static cache is full"):
        dec.step(nxt, cache)
