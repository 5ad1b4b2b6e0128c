"""Generation (qtg.generate): cache and no-cache agree, seeds reproduce, filters
filter, EOS and stop strings stop, stream matches generate, bad requests are
refused before any work."""

from __future__ import annotations

import pytest
import torch

import qtg
from qtg.errors import GenerationError
from qtg.generate import MIN_TEMPERATURE, generate, logits_to_probs, stream
from tests.conftest import word_tokenizer

PROMPTS = [
    torch.tensor([[5], [300]]),  # one token
    torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(1)),
    torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2)),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # decoding steps are tiny: a second thread only waits


@pytest.fixture(scope="module")
def lively() -> qtg.QTG:
    """micro with init_std 0.3: at the default 0.02 a random model's greedy output
    repeats one token, which would make these tests toothless."""
    return qtg.build(qtg.get_tier("micro").replace(init_std=0.3), seed=0).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return PROMPTS[1]


@pytest.fixture(scope="module")
def greedy(lively, prompt) -> torch.Tensor:
    return generate(lively, prompt, 20, temperature=0)


# --- cache vs no cache ------------------------------------------------------------------


@pytest.mark.parametrize("ids", PROMPTS, ids=["len1", "len7", "len30"])
def test_cached_and_uncached_greedy_agree_token_for_token(lively, ids):
    cached = generate(lively, ids, 40, temperature=0, use_cache=True)
    uncached = generate(lively, ids, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, ids.shape[1] + 40)
    assert torch.equal(cached[:, : ids.shape[1]], ids)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, ids.shape[1]:].tolist())) > 1  # not one repeated token: the test has teeth


def test_batch_rows_match_single_row_runs(lively, prompt, greedy):
    for row in range(2):
        assert torch.equal(generate(lively, prompt[row], 20, temperature=0)[0], greedy[row])


def test_tiny_temperatures_are_greedy_not_a_crash(lively, prompt, greedy):
    # 1e-39 and 5e-324 overflow logits / T: below MIN_TEMPERATURE the choice is the argmax
    for t in (MIN_TEMPERATURE / 2, 1e-39, 5e-324):
        assert torch.equal(generate(lively, prompt, 20, temperature=t, seed=0), greedy)
    warm = generate(lively, prompt, 20, temperature=MIN_TEMPERATURE, seed=0)  # sampled, and still finite
    assert warm.shape == greedy.shape


def test_arguments_after_max_new_tokens_are_keywords(lively, prompt):
    with pytest.raises(TypeError):
        generate(lively, prompt, 5, 0.0)  # a positional temperature is refused


# --- sampling -----------------------------------------------------------------------------


def test_seeded_sampling_reproduces_and_seeds_differ(lively, prompt):
    a = generate(lively, prompt, 30, temperature=1.0, seed=11)
    b = generate(lively, prompt, 30, temperature=1.0, seed=11)
    c = generate(lively, prompt, 30, temperature=1.0, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_and_a_tiny_top_p_are_greedy(lively, prompt, greedy):
    assert torch.equal(generate(lively, prompt, 20, temperature=1.5, top_k=1, seed=3), greedy)
    assert torch.equal(generate(lively, prompt, 20, temperature=1.5, top_p=1e-6, seed=3), greedy)
    # 5e-324 is 0 in float32: the top token's mass before it (0) used to drop it too, and sampling met nan
    assert torch.equal(generate(lively, prompt, 20, temperature=1.5, top_p=5e-324, seed=3), greedy)


def test_logits_to_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ .64 .24 .09 .03
    assert (logits_to_probs(logits, top_k=2) > 0).tolist() == [[True, True, False, False]]
    assert (logits_to_probs(logits, top_p=0.64) > 0).tolist() == [[True, False, False, False]]
    assert (logits_to_probs(logits, top_p=0.7) > 0).tolist() == [[True, True, False, False]]
    assert (logits_to_probs(logits, top_p=1.0) > 0).all()
    torch.testing.assert_close(logits_to_probs(logits, top_k=2).sum(-1), torch.ones(1))
    flat = logits_to_probs(logits, temperature=100.0)
    assert flat.max() - flat.min() < 0.02  # a high temperature flattens


# --- stopping -------------------------------------------------------------------------------


def _first_new_token_at(greedy: torch.Tensor, prompt_len: int, row: int, step: int) -> tuple[int, int]:
    """A token greedy decoding emits in ``row``, and the first step it appears at (at or before ``step``)."""
    new = greedy[row, prompt_len:].tolist()
    return new[step], new.index(new[step])


def test_eos_stops_a_row_and_the_loop_when_all_rows_finished(lively, prompt, greedy):
    N = prompt.shape[1]
    eos, at = _first_new_token_at(greedy, N, row=0, step=6)
    one = generate(lively, prompt[:1], 20, temperature=0, eos_id=eos)
    assert one.shape == (1, N + at + 1) and one[0, -1] == eos  # EOS is kept, then the loop ends
    both = generate(lively, prompt, 20, temperature=0, eos_id=eos)
    assert torch.equal(both[0, N + at:], torch.full((both.shape[1] - N - at,), eos))  # finished row pads with EOS
    assert torch.equal(both[1, : N + at + 1], greedy[1, : N + at + 1])


def test_stop_strings_end_generation_once_the_text_contains_them(lively, prompt, greedy):
    N = prompt.shape[1]
    tok = word_tokenizer()
    stop_id, at = _first_new_token_at(greedy, N, row=0, step=5)
    out = generate(lively, prompt[:1], 20, temperature=0, stop=[f"<{stop_id}>", "never"], tokenizer=tok)
    assert out.shape == (1, N + at + 1) and out[0, -1] == stop_id
    assert torch.equal(out[0], greedy[0, : N + at + 1])
    # the prompt's own text does not count: only generated text is searched
    first_prompt_token = f"<{int(prompt[0, 0])}>"
    assert generate(lively, prompt[:1], 5, temperature=0, stop=first_prompt_token, tokenizer=tok).shape[1] >= N + 1


# --- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_stream_yields_the_tokens_generate_returns(lively, prompt, options):
    steps = list(stream(lively, prompt, 15, **options))
    assert len(steps) == 15 and all(s.shape == (2,) and s.dtype == torch.long for s in steps)
    full = generate(lively, prompt, 15, **options)
    assert torch.equal(torch.stack(steps, dim=1), full[:, prompt.shape[1]:])


def test_modes_are_restored_and_outputs_are_ordinary_tensors(prompt):
    model = qtg.build("micro", seed=0).train()
    out = generate(model, prompt, 3, temperature=0)
    assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not torch.is_inference(out)
    it = stream(model, prompt, 3)
    next(it)
    assert model.training and not torch.is_inference_mode_enabled()  # between steps: the caller's modes


# --- bad requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids, kwargs, message", [
    (torch.zeros(1, 0, dtype=torch.long), {}, r"empty prompt \(ids shape \(1, 0\)\)"),
    (torch.zeros(0, 4, dtype=torch.long), {}, r"empty prompt"),
    (None, dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(below 0.0001 is greedy\), got -0.5"),
    (None, dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (None, dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
    (None, dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    (None, dict(top_p=0.0), r"top_p must be in \(0, 1\] \(or None for off\), got 0.0"),
    (None, dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (None, dict(top_k=0), r"top_k must be an integer >= 1 \(or None for off\), got 0"),
    (None, dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (None, dict(max_new_tokens=200),
     r"the prompt is 7 tokens and max_new_tokens is 200: 207 exceeds the max_seq_len of micro \(128\); "
     r"at most 121 new tokens fit"),
    (torch.zeros(1, 128, dtype=torch.long), {},
     r"the prompt is 128 tokens .* shorten the prompt below 128 tokens"),
    (torch.tensor([[1, 2, 512]]), {}, r"token id 512 at row 0, position 2 is out of vocabulary \(valid ids: 0..511\)"),
    (torch.tensor([[1, -3]]), {}, r"token id -3 at row 0, position 1 is out of vocabulary"),
    (torch.tensor([[1.0, 2.0]]), {}, r"ids must be integer token ids, got dtype torch.float32"),
    (None, dict(eos_id=999), r"eos_id must be a token id in 0..511, got 999"),
    (None, dict(stop="\n"), r"stop strings need a tokenizer"),
    (None, dict(stop=[""], tokenizer=object()), r"stop must be a non-empty string"),
], ids=["empty-prompt", "empty-batch", "neg-temperature", "nan-temperature", "inf-temperature", "neg-seed",
        "top_p-0", "top_p-1.5", "top_k-0", "max_new-0", "too-long", "prompt-fills-context", "oov-high",
        "oov-negative", "float-ids", "eos-oov", "stop-no-tokenizer", "empty-stop"])
def test_bad_requests_are_refused_before_any_work(lively, prompt, ids, kwargs, message):
    calls = []
    hook = lively.register_forward_pre_hook(lambda *args: calls.append(1))
    kwargs = {"max_new_tokens": 5, **kwargs}
    try:
        with pytest.raises(GenerationError, match=message):
            generate(lively, prompt[:1] if ids is None else ids, **kwargs)
        with pytest.raises(GenerationError, match=message):
            stream(lively, prompt[:1] if ids is None else ids, **kwargs)  # at the call, not at next()
    finally:
        hook.remove()
    assert calls == [], "the model ran before the request was refused"
