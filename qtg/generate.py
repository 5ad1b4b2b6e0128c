"""Autoregressive generation from a QTG model: greedy, top-k, nucleus, seeded, streamed.

A chain of small functions in the gpt-fast manner, each asserting the shapes
it is given::

    logits_to_probs -> sample -> prefill -> decode_one_token -> decode_n_tokens -> generate / stream

(:func:`sample_rows` samples rows that each have their own settings: ``qtg.serve``'s batches;
:func:`inference`, :func:`stop_strings` and :class:`Stopper` are shared with its engine too.)

Design choices:

* **Checked up front.** :func:`check_request` refuses a bad request (empty
  prompt, negative temperature, top_p outside (0, 1], top_k < 1, no room in
  the context, out-of-vocabulary ids, stop strings without a tokenizer) with a
  one-line :class:`~qtg.errors.GenerationError` before any forward pass.
  :func:`stream` is a plain function that validates, then returns the
  iterator, so its errors too come at the call and not at the first ``next``.
* **Cache or not, same tokens.** With ``use_cache`` the prompt is run once
  into a :class:`~qtg.model.model.QTGCache` and each step feeds one token
  (``model(next_ids, cache=cache)``, O(N) per step); without it each step
  re-runs the whole sequence (O(N^2)). Greedy output is the same token for
  token (a test holds it).
* **Temperature 0 is greedy** (argmax); top-k and top-p then do nothing.
  So is any temperature below :data:`MIN_TEMPERATURE`: logits / T would
  overflow float32 there, and the distribution is one-hot to float32 anyway.
* **Interventions** (:class:`~qtg.model.intervention.Intervention`) are passed to
  every forward pass of the request, prefill and each step alike, so cached
  and uncached decoding see the same edited model.
* **Seeded** sampling draws from a ``torch.Generator`` on the model's device:
  the same seed gives the same tokens. Without a seed the global RNG is used.
* **Batched stopping.** A row finishes when it emits ``eos_id`` or when its
  generated text (decoded with the tokenizer) contains a stop string; the
  EOS token or the token completing the stop string is kept. Finished rows
  emit ``pad_id`` (default: ``eos_id``, else 0) so the batch stays
  rectangular; the loop ends when every row has finished.
* **Inference mode per step.** Each step runs under ``torch.inference_mode``
  with the model in eval mode, and the previous mode is restored before a
  token is handed back, so code consuming :func:`stream` between steps runs
  in the caller's own autograd and train/eval state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qtg.errors import GenerationError
from qtg.model.intervention import NO_INTERVENTION, Intervention
from qtg.model.model import QTGCache
from qtg.model.protocol import LanguageModel

# Below this temperature sampling is greedy: the largest logit gap of a trained
# model (~100) over 1e-4 stays far inside float32, while 1e-39 would overflow.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature (< MIN_TEMPERATURE is greedy), top_k/top_p (None: off),
    and the seed of the request's random source (None: the global RNG)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh random source for one request (None when unseeded)."""
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


@dataclass
class _Decode:
    """What every step of one request reads: the model, its cache and intervention, how to choose, when to stop."""

    model: LanguageModel
    cache: QTGCache | None
    intervene: Intervention
    sampling: Sampling
    generator: torch.Generator | None
    stopper: Stopper
    pad_id: int


# --- next-token choice -------------------------------------------------------------


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, then softmax.

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: > 0 (temperature 0 is greedy and handled by :func:`sample`).
        top_k: keep the k most likely tokens (ties with the k-th are kept too).
        top_p: keep the smallest set of most likely tokens whose mass reaches
            top_p; the most likely token is always kept.

    Returns:
        ``[B, V]`` float32 probabilities, each row summing to 1.
    """
    assert logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}"
    assert temperature >= MIN_TEMPERATURE, "temperatures below MIN_TEMPERATURE are greedy: use sample()"
    logits = logits.float() / temperature  # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V] each
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V]: mass of more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False  # the top token always stays: a top_p under float32's least value compares as 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """The next token of every row.

    Args:
        logits: ``[B, V]`` next-token logits.
        sampling: temperature / top-k / top-p.
        generator: the random source (None: the global RNG); unused when greedy.

    Returns:
        ``[B]`` int64 token ids.
    """
    assert logits.dim() == 2, f"logits must be [B, V], got {tuple(logits.shape)}"
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)  # [B, V]
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # [B]


def sample_rows(logits: Tensor, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of rows that each sample on their own (a batch of independent requests).

    Row b gets the token :func:`sample` gives ``logits[b:b + 1]`` with ``samplings[b]`` and
    ``generators[b]``: the filtering (a per-row computation) runs once for all rows sharing
    temperature, top-k and top-p, the draw once per row from that row's random source.

    Args:
        logits: ``[B, V]`` next-token logits.
        samplings: B sampling settings.
        generators: B random sources (None: the global RNG).

    Returns:
        B token ids.
    """
    assert logits.dim() == 2 and len(samplings) == len(generators) == logits.shape[0], "one sampling per row"
    groups: dict[tuple, list[int]] = {}
    for b, s in enumerate(samplings):
        groups.setdefault(("greedy",) if s.greedy else (s.temperature, s.top_k, s.top_p), []).append(b)
    out = [0] * len(samplings)
    for key, rows in groups.items():
        picked = logits[rows] if len(rows) < len(samplings) else logits  # [R, V]
        if key == ("greedy",):
            tokens = picked.argmax(dim=-1).tolist()
        else:
            probs = logits_to_probs(picked, *key)  # [R, V]
            tokens = [int(torch.multinomial(probs[i:i + 1], num_samples=1, generator=generators[b]))
                      for i, b in enumerate(rows)]
        for b, token in zip(rows, tokens):
            out[b] = token
    return out


# --- forward passes ----------------------------------------------------------------


def prefill(model: LanguageModel, ids: Tensor, cache: QTGCache | None,
            intervene: Intervention = NO_INTERVENTION) -> Tensor:
    """Run the prompt once (filling ``cache`` when given).

    Args:
        model: the model.
        ids: ``[B, N]`` prompt ids.
        cache: an empty QTGCache, or None.
        intervene: the request's intervention.

    Returns:
        ``[B, V]`` logits for the token after the prompt.
    """
    assert ids.dim() == 2 and ids.shape[1] > 0, f"ids must be [B, N>0], got {tuple(ids.shape)}"
    assert cache is None or cache.length == 0, "prefill needs an empty cache"
    logits = model(ids, cache=cache, intervene=intervene).logits  # [B, N, V]
    assert logits.shape[:2] == ids.shape
    return logits[:, -1]


def decode_one_token(model: LanguageModel, seq: Tensor, cache: QTGCache | None,
                     intervene: Intervention = NO_INTERVENTION) -> Tensor:
    """Logits for the token after ``seq``.

    With a cache holding ``seq[:, :-1]``, only the last token is fed (O(N));
    without one, the whole sequence is run again (O(N^2)).

    Args:
        model: the model.
        seq: ``[B, T]`` every token so far, prompt included.
        cache: a QTGCache of length T - 1, or None.
        intervene: the request's intervention (the same at every step).

    Returns:
        ``[B, V]`` next-token logits.
    """
    assert seq.dim() == 2, f"seq must be [B, T], got {tuple(seq.shape)}"
    if cache is None:
        return model(seq, intervene=intervene).logits[:, -1]  # [B, V]
    assert cache.length == seq.shape[1] - 1, f"cache holds {cache.length} tokens, seq has {seq.shape[1]}"
    logits = model(seq[:, -1:], cache=cache, intervene=intervene).logits  # [B, 1, V]
    assert logits.shape[:2] == (seq.shape[0], 1)
    return logits[:, -1]


# --- inference mode and stopping (shared with qtg.serve's engine) --------------------


@contextlib.contextmanager
def inference(model: LanguageModel) -> Iterator[None]:
    """Run the ``with`` body in eval mode and under ``torch.inference_mode``.

    The model's train/eval mode is restored on exit (also on an exception), so
    code between two steps runs in the caller's own modes. Tensors made inside
    are inference tensors: clone one after the block to use it in autograd.

    Args:
        model: the model whose mode is switched (and restored).
    """
    was_training = model.training
    if was_training:  # model.train(mode) walks every submodule: skip it when nothing changes
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train(True)


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """A request's ``stop`` argument as a tuple of stop strings.

    Args:
        stop: None (no stop strings), one string, or a sequence of them.

    Returns:
        The stop strings, in order (``()`` for None).

    Raises:
        GenerationError: a stop string that is empty or not a string.
    """
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise GenerationError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


class Stopper:
    """Which rows of a batch have finished: EOS emitted, or a stop string in the generated text.

    A finished row stays finished. ``finished`` is ``[B]`` bool on ``device``.

    Args:
        batch: B, the number of rows.
        device: where ``finished`` lives (the device of the tokens given to :meth:`update`).
        eos_id: the token that finishes a row (None: none).
        stop: stop strings, as :func:`stop_strings` gives them (``()``: none).
        tokenizer: decodes a row's generated ids for ``stop`` (unused when ``stop`` is empty).
    """

    def __init__(self, batch: int, device: torch.device, eos_id: int | None, stop: tuple[str, ...], tokenizer: Any):
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
        self.eos_id, self.stop, self.tokenizer = eos_id, stop, tokenizer

    def update(self, new: Tensor, generated: Tensor) -> None:
        """Mark the rows this step finished.

        Args:
            new: ``[B]`` this step's tokens.
            generated: ``[B, t]`` every generated token so far, ``new`` last (the prompt excluded).
        """
        done = self.finished.clone()
        if self.eos_id is not None:
            done |= new == self.eos_id
        if self.stop:
            for row in (~done).nonzero().flatten().tolist():
                text = self.tokenizer.decode(generated[row].tolist())
                done[row] = any(s in text for s in self.stop)
        self.finished = done

    @property
    def all(self) -> bool:
        """True once every row has finished."""
        return bool(self.finished.all())


# --- the decoding loop -------------------------------------------------------------


def decode_n_tokens(run: _Decode, buf: Tensor, prompt_len: int, logits: Tensor, n: int) -> Iterator[Tensor]:
    """Sample up to ``n`` tokens, writing each into ``buf`` and yielding it.

    Args:
        run: the request's model, cache (prefilled, or None to re-run the
            sequence each step), intervention, sampling, random source,
            stopper (EOS, stop strings) and pad id for finished rows.
        buf: ``[B, prompt_len + n]`` the prompt followed by room for the new tokens.
        prompt_len: N, the prompt length.
        logits: ``[B, V]`` the logits after the prompt (from :func:`prefill`).
        n: the most tokens to generate.

    Yields:
        ``[B]`` int64, the tokens of one step.
    """
    B = buf.shape[0]
    assert buf.dim() == 2 and buf.shape[1] == prompt_len + n, f"buf {tuple(buf.shape)} != [B, {prompt_len + n}]"
    assert logits.shape == (B, run.model.cfg.vocab_size), f"logits {tuple(logits.shape)}"
    for step in range(n):
        t = prompt_len + step
        with inference(run.model):
            new = sample(logits, run.sampling, run.generator)  # [B]
            new = torch.where(run.stopper.finished, torch.full_like(new, run.pad_id), new)
            buf[:, t] = new
            run.stopper.update(new, buf[:, prompt_len:t + 1])
            last = run.stopper.all or step == n - 1
            if not last:  # no forward pass for a token nobody will read
                logits = decode_one_token(run.model, buf[:, :t + 1], run.cache, run.intervene)
        yield new.clone()  # a normal tensor: usable outside inference mode
        if last:
            return


# --- the public entry points -------------------------------------------------------


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None) -> None:
    """The checks that need no model: run them before loading one."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise GenerationError(f"temperature must be a finite number >= 0 (below {MIN_TEMPERATURE:g} is greedy), "
                              f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be an integer >= 1 (or None for off), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1] (or None for off), got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
        raise GenerationError(f"seed must be an integer in [0, 2**64) (or None for unseeded), got {seed!r}")


def check_request(model: LanguageModel, ids: Tensor, max_new_tokens: int, *, sampling: Sampling = Sampling(),
                  eos_id: int | None = None, stop: str | Sequence[str] | None = None, tokenizer: Any = None,
                  intervene: Intervention | None = None) -> Tensor:
    """Refuse a request that cannot be served, before any work.

    Returns:
        ``ids`` as ``[B, N]`` int64 on the model's device.

    Raises:
        GenerationError: one line saying what is wrong and what would do.
        InterventionError: an intervention that does not fit the model.
    """
    cfg = model.cfg
    if not isinstance(ids, Tensor):
        raise GenerationError(f"ids must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)  # [N] -> [1, N]
    if ids.dim() != 2:
        raise GenerationError(f"ids must be [B, N] (or [N]), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise GenerationError(f"ids must be integer token ids, got dtype {ids.dtype}")
    B, N = ids.shape
    if B == 0 or N == 0:
        raise GenerationError(f"empty prompt (ids shape {tuple(ids.shape)}): give at least one token per row")
    bad = (ids < 0) | (ids >= cfg.vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise GenerationError(f"token id {int(ids[row, col])} at row {row}, position {col} is out of vocabulary "
                              f"(valid ids: 0..{cfg.vocab_size - 1})")
    check_sampling(max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed)
    if N + max_new_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - N
        fix = f"at most {room} new tokens fit" if room > 0 else f"shorten the prompt below {cfg.max_seq_len} tokens"
        raise GenerationError(f"the prompt is {N} tokens and max_new_tokens is {max_new_tokens}: {N + max_new_tokens} "
                              f"exceeds the max_seq_len of {cfg.name} ({cfg.max_seq_len}); {fix}")
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < cfg.vocab_size):
        raise GenerationError(f"eos_id must be a token id in 0..{cfg.vocab_size - 1}, got {eos_id!r}")
    stops = stop_strings(stop)
    if stops and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer to decode the text: pass tokenizer= or load a "
                              "model that has one")
    model.check_forward_args(intervene, None)
    return ids.to(device=_device(model), dtype=torch.long)


def stream(model: LanguageModel, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
           eos_id: int | None = None, stop: str | Sequence[str] | None = None, tokenizer: Any = None,
           pad_id: int | None = None, intervene: Intervention | None = None) -> Iterator[Tensor]:
    """Generate one step at a time, for a streaming UI. Arguments as :func:`generate`.

    The request is checked when ``stream`` is called (not at the first ``next``).

    Yields:
        ``[B]`` int64: each row's token for this step (``pad_id`` once a row has finished).
    """
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    sampling = Sampling(float(temperature) if isinstance(temperature, (int, float)) else temperature,
                        top_k, top_p, seed)
    ids = check_request(model, ids, max_new_tokens, sampling=sampling, eos_id=eos_id, stop=stop,
                        tokenizer=tokenizer, intervene=intervene)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    stopper = Stopper(ids.shape[0], ids.device, eos_id, stop_strings(stop), tokenizer)
    # sized for this request; its ids are checked here once (check_request), then sampled: no check per step
    cache = QTGCache(ids.shape[1] + max_new_tokens, checked_ids=True) if use_cache else None
    run = _Decode(model, cache, intervene or NO_INTERVENTION, sampling,
                  sampling.generator(ids.device), stopper, pad)
    return _steps(run, ids, max_new_tokens)


def generate(model: LanguageModel, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
             eos_id: int | None = None, stop: str | Sequence[str] | None = None, tokenizer: Any = None,
             pad_id: int | None = None, intervene: Intervention | None = None) -> Tensor:
    """Continue ``ids`` by up to ``max_new_tokens`` tokens.

    Args:
        model: a QTG model or its baseline (its train/eval mode is restored afterwards).
        ids: ``[B, N]`` (or ``[N]``) prompt token ids.
        max_new_tokens: >= 1; N + max_new_tokens must fit ``model.cfg.max_seq_len``.
        temperature: 0 (or anything below MIN_TEMPERATURE) for greedy, else the softmax temperature.
        top_k: sample among the k most likely tokens (None: off).
        top_p: nucleus sampling, in (0, 1] (None: off).
        seed: seeds a torch.Generator: the same seed gives the same tokens.
        use_cache: prefill a QTGCache and feed one token per step (True), or
            re-run the whole sequence each step (False; same greedy tokens, slower).
        eos_id: a row that emits it has finished.
        stop: a string or strings; a row whose generated text contains one has finished.
        tokenizer: decodes text for ``stop`` (default ``model.tokenizer``).
        pad_id: what finished rows emit (default ``eos_id``, else 0).
        intervene: a :class:`~qtg.model.intervention.Intervention` for every forward pass of this request.

    Returns:
        ``[B, N + T]`` int64, the prompt then T <= max_new_tokens new tokens
        (T < max_new_tokens when every row finished early).

    Raises:
        GenerationError: a bad request, before any work.
    """
    steps = list(stream(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        use_cache=use_cache, eos_id=eos_id, stop=stop, tokenizer=tokenizer, pad_id=pad_id,
                        intervene=intervene))
    prompt = ids if ids.dim() == 2 else ids.unsqueeze(0)
    return torch.cat([prompt.to(device=steps[0].device, dtype=torch.long), torch.stack(steps, dim=1)], dim=1)


def _steps(run: _Decode, ids: Tensor, max_new_tokens: int) -> Iterator[Tensor]:
    """The generator behind :func:`stream`: prefill, then :func:`decode_n_tokens`."""
    B, N = ids.shape
    buf = torch.full((B, N + max_new_tokens), run.pad_id, dtype=torch.long, device=ids.device)  # prompt, then new
    buf[:, :N] = ids
    with inference(run.model):
        logits = prefill(run.model, ids, run.cache, run.intervene)  # [B, V]
    yield from decode_n_tokens(run, buf, N, logits, max_new_tokens)


def _device(model: LanguageModel) -> torch.device:
    return next(model.parameters()).device
