"""The continuous-batching engine (qtg.serve.engine): every request gets what it would get alone.

Ragged batches (rows of different lengths in one forward pass) against each row alone, logits and
tokens; requests joining and leaving mid-run; a cancelled row leaving the others exact; per-request
interventions; the background thread with concurrent submitters. QTG micro and its baseline.
"""

from __future__ import annotations

import threading

import pytest
import torch

import qtg
from qtg.errors import GenerationError
from qtg.generate import generate, prefill
from qtg.model.cache import QTGCache
from qtg.model.intervention import Intervention
from qtg.serve.engine import Engine
from qtg.topology import PromptForest, prompt_distance
from tests.conftest import word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = (3, 17, 9, 30)
SPECS = (dict(temperature=0), dict(temperature=0.9, seed=5), dict(temperature=1.0, top_k=20, seed=7),
         dict(temperature=0.7, top_p=0.9, seed=1))
NEW = (20, 7, 15, 25)


@pytest.fixture(scope="module", params=["qtg", "baseline"])
def lively(request):
    """micro (or its baseline) with init_std 0.3: a random micro at 0.02 repeats one token, toothless here."""
    cfg = qtg.get_tier("micro").replace(init_std=0.3)
    return qtg.build(cfg if request.param == "qtg" else cfg.replace(arch="baseline"), seed=0).eval()


@pytest.fixture(scope="module")
def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=g) for n in LENGTHS]


def alone(model, prompt, n, **kw) -> list[int]:
    return generate(model, prompt, n, **kw)[0, len(prompt):].tolist()


def drain(engine: Engine) -> None:
    while not engine.idle:
        engine.step()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 rounding: within 3e-6 of the logits' scale. Batching itself moves logits this much:
    on these deliberately large-weight models a plain batch of equal rows (the library's own batched
    generate) differs from its rows alone by 5-8e-7 of the scale, ragged rows by up to 2.3e-6; on the
    trained nano both stay below 3e-7 (4.8e-6 absolute on logits of ~15)."""
    return bool((a - b).abs().max() <= 3e-6 * max(1.0, float(b.abs().max())))


def test_a_ragged_step_gives_each_row_its_own_logits(lively, prompts):
    """Rows of lengths 3, 17, 9, 30 in one cached step: each row's logits are those of the row alone."""
    caches, batch = [], None
    for p in prompts:
        cache, row = QTGCache(), QTGCache()
        with torch.inference_mode():
            prefill(lively, p.view(1, -1), cache)
            prefill(lively, p.view(1, -1), row)
        caches.append(cache)
        row.make_ragged()  # the same, as a ragged row
        if batch is None:
            batch = row
        else:
            batch.add_rows(row)  # copied into the batch's row slots
    nxt = torch.tensor([[7], [100], [42], [511]])
    with torch.inference_mode():
        together = lively(nxt, cache=batch).logits[:, -1]  # [4, V]
        for b, cache in enumerate(caches):
            own = lively(nxt[b:b + 1], cache=cache).logits[:, -1]
            assert close(together[b], own[0])
            if lively.has_topofilter:
                assert batch.points[b, :batch.lengths[b]].equal(cache.points[0])
    assert batch.lengths.tolist() == [n + 1 for n in LENGTHS]
    # leaving: the rows kept are trimmed to the widest of them and still step exactly
    kept = batch
    assert kept.keep_rows([0, 2]) == [0, 2]  # row 2 refills row 1's slot
    assert kept.length == LENGTHS[2] + 1 and kept.lengths.tolist() == [LENGTHS[0] + 1, LENGTHS[2] + 1]
    with torch.inference_mode():
        step2 = lively(torch.tensor([[1], [2]]), cache=kept).logits[:, -1]
        for row, b in enumerate((0, 2)):
            own = lively(torch.tensor([[row + 1]]), cache=caches[b]).logits[:, -1]
            assert close(step2[row], own[0])


def test_requests_joining_mid_run_get_their_tokens_alone(lively, prompts):
    """Four requests (greedy and seeded, different lengths) each join two steps after the previous."""
    engine = Engine(lively, start=False)
    reqs = []
    for p, spec, n in zip(prompts, SPECS, NEW):
        reqs.append(engine.submit(p, n, **spec))
        engine.step()
        engine.step()
    drain(engine)
    assert engine.stats.max_rows == 4  # they really ran together
    for p, spec, n, req in zip(prompts, SPECS, NEW, reqs):
        got = req.tokens()
        assert got == alone(lively, p, n, **spec)
        assert len(got) == n and req.finish == "length"
    assert len(set(reqs[0].generated)) > 1  # not one repeated token: the test has teeth


def test_cancelling_one_row_leaves_the_others_exact(lively, prompts):
    engine = Engine(lively, start=False)
    reqs = [engine.submit(p, 25, **spec) for p, spec in zip(prompts, SPECS)]
    for _ in range(5):
        engine.step()
    reqs[1].cancel()
    drain(engine)
    events = list(reqs[1])
    assert events[-1].finish == "cancelled"
    assert 0 < len(reqs[1].generated) < 25  # it stopped where it was cancelled
    for i in (0, 2, 3):
        assert reqs[i].tokens() == alone(lively, prompts[i], 25, **SPECS[i])


def test_each_request_keeps_its_own_intervention(prompts):
    """QTG rows under different interventions run as groups, each equal to its request alone."""
    model = qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()
    interventions = [None, Intervention(topo="exact"), Intervention(ablate_heads={0: [1, 2]}),
                     Intervention(gamma_scale=0.5, positions="none")]
    engine = Engine(model, start=False)
    reqs = [engine.submit(p, 12, temperature=0, intervene=iv) for p, iv in zip(prompts, interventions)]
    drain(engine)
    outs = [r.tokens() for r in reqs]
    for p, iv, got in zip(prompts, interventions, outs):
        assert got == alone(model, p, 12, temperature=0, intervene=iv)
    plain = [alone(model, p, 12, temperature=0) for p in prompts]
    assert any(o != q for o, q in zip(outs[1:], plain[1:]))  # the interventions changed something


def test_eos_and_stop_strings_end_a_row_as_alone():
    tok = word_tokenizer(512)
    model = qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()
    prompt = torch.tensor([5, 6, 7])
    free = alone(model, prompt, 20, temperature=0)
    engine = Engine(model, tokenizer=tok, start=False)
    by_eos = engine.submit(prompt, 20, temperature=0, eos_id=free[4])
    by_stop = engine.submit(prompt, 20, temperature=0, stop=tok.decode([free[6]]).strip())
    drain(engine)
    assert by_eos.tokens() == free[:free.index(free[4]) + 1] and by_eos.finish == "stop"
    want = alone(model, prompt, 20, temperature=0, stop=tok.decode([free[6]]).strip(), tokenizer=tok)
    assert by_stop.tokens() == want and by_stop.finish == "stop" and len(want) < 20


def test_topo_scores_and_logprobs_are_the_models(prompts):
    """Each token's s~, s, w equal the full forward's; logprobs are log-softmax of its logits."""
    model = qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()
    engine = Engine(model, start=False)
    other = engine.submit(prompts[3], 6, temperature=0)  # a longer row in the same batch
    req = engine.submit(prompts[1], 6, temperature=0, topo=True, logprobs=3)
    drain(engine)
    events = [e for e in req if e.token is not None]
    assert other.tokens() and len(events) == 6
    seq = torch.cat([prompts[1], torch.tensor([e.token for e in events])]).view(1, -1)
    with torch.inference_mode():
        out = model(seq, return_internals=True)
    n = len(prompts[1])
    soft, exact, w = out.topo_scores[0], out.topo_exact_scores[0], out.topo_weights[0]
    got = [(t.soft, t.exact, t.weight) for t in req.prompt_topo] + [(e.topo.soft, e.topo.exact, e.topo.weight)
                                                                    for e in events]
    assert torch.allclose(torch.tensor(got, dtype=torch.float32), torch.stack([soft, exact, w], -1), atol=1e-6)
    logp = torch.log_softmax(out.logits[0, n - 1:-1].float(), -1)  # the distribution each token came from
    for i, e in enumerate(events):
        assert abs(e.logprob - float(logp[i, e.token])) < 1e-5
        assert [t for t, _ in e.top_logprobs] == logp[i].topk(3).indices.tolist()


def run_all(model, prompts, asks) -> list:
    """Each prompt as a request (seeded sampling, SPECS) asking ``asks[i]`` for attention rows, all batched."""
    engine = Engine(model, start=False)
    reqs = [engine.submit(p, n, attention_block=a, **spec) for p, n, a, spec in zip(prompts, (12, 7, 1, 9), asks,
                                                                                    SPECS)]
    drain(engine)
    return reqs


def test_attention_rows_give_the_prompt_distance_of_the_full_map(lively, prompts):
    """Rows asking for attention rows (the last block, block 0, none, the last from a one-token request) in
    one batch: the tokens are those of the same batch asking nothing, each token's row is its row of the
    full forward map of the final text, and a PromptForest fed the rows gives, for every head and after
    every token t, ``prompt_distance`` of the full map cut to t + 1 tokens."""
    asks = (-1, 0, -1, None)
    plain = run_all(lively, prompts, (None,) * 4)
    reqs = run_all(lively, prompts, asks)
    assert [r.generated for r in reqs] == [r.generated for r in plain]
    assert len(set(reqs[0].generated)) > 1
    L, scores = lively.cfg.n_layers, []
    for p, req, ask in zip(prompts, reqs, asks):
        events = list(req)
        rows = [e.attention for e in events if e.attention is not None]
        if ask is None:
            assert not rows
            continue
        assert events[0].attention is None and events[-1].finish == "length" and events[-1].attention is not None
        block, n = ask % L, len(p)
        seq = torch.cat([p, torch.tensor(req.generated)]).view(1, -1)
        with torch.inference_mode():
            full = lively(seq, return_internals=True, map_blocks=[block]).attention[block][0]  # [H, N, N]
        assert len(rows) == len(req.generated)
        for t, row in enumerate(rows):  # float32 rounding of a cached batched step: up to 7e-6 here (baseline)
            assert row.shape == (full.shape[0], n + t + 1)
            assert torch.allclose(row, full[:, n + t, :n + t + 1], rtol=0, atol=2e-5)
        for h in range(full.shape[0]):
            forest = PromptForest(n)
            got = [forest.add(row[h]) for row in rows]
            want = [prompt_distance(full[h, :n + t + 1, :n + t + 1], n) for t in range(len(rows))]
            assert got == pytest.approx(want, abs=5e-5)
            scores += want
    assert max(scores) > 0.1  # the continuations do stray from their prompts: the comparison has teeth


def test_a_step_computes_maps_only_for_the_blocks_asked(lively, prompts, monkeypatch):
    calls = []
    forward = lively.forward

    def spy(*args, **kw):
        calls.append((kw.get("return_internals", False), kw.get("map_blocks")))
        return forward(*args, **kw)

    monkeypatch.setattr(lively, "forward", spy)
    run_all(lively, prompts[:2], (None, None))
    assert calls and all(c == (False, None) for c in calls)  # nobody asks: the engine's plain step
    calls.clear()
    run_all(lively, prompts[:3], (1, 0, None))
    assert (True, [0, 1]) in calls and (False, None) in calls  # prefill computes none; steps only those asked


def test_a_bad_attention_block_is_refused_at_submit(prompts):
    engine = Engine(qtg.build("micro", seed=0).eval(), start=False)
    for bad in (2, -3, 1.0, "last", True):
        with pytest.raises(GenerationError, match=r"^attention_block must be an integer in 0\.\.1"):
            engine.submit(prompts[0], 4, attention_block=bad)
    assert engine.idle


def test_background_thread_serves_concurrent_submitters(prompts):
    model = qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()
    engine = Engine(model)
    results: dict[int, list[int]] = {}

    def client(i):
        results[i] = engine.submit(prompts[i], NEW[i], **SPECS[i]).tokens()

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.close()
    for i in range(4):
        assert results[i] == alone(model, prompts[i], NEW[i], **SPECS[i])


def test_bad_requests_are_refused_at_submit(prompts):
    model = qtg.build("micro", seed=0).eval()
    engine = Engine(model, start=False)
    with pytest.raises(GenerationError, match="top_p"):
        engine.submit(prompts[0], 4, top_p=1.5)
    with pytest.raises(GenerationError, match="max_seq_len"):
        engine.submit(prompts[0], 500)
    with pytest.raises(GenerationError, match="logprobs"):
        engine.submit(prompts[0], 4, logprobs=-1)
    assert engine.idle


def test_close_when_idle_lets_running_requests_finish_then_ends_the_thread(prompts):
    """What the app calls when a model is unloaded: the loop's thread holds the model until it ends."""
    model = qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()
    engine = Engine(model)
    req = engine.submit(prompts[1], NEW[1], temperature=0)
    engine.close_when_idle()
    assert req.tokens() == alone(model, prompts[1], NEW[1], temperature=0) and req.finish == "length"
    engine._thread.join(timeout=30)
    assert not engine._thread.is_alive()
    with pytest.raises(GenerationError, match="closed"):
        engine.submit(prompts[0], 4)
