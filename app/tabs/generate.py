"""Generate tab: the text streams token by token, each token coloured by its TopoFilter weight,
beside a live exact H0/H1 diagram of the growing sequence. Endpoint ``/generate``.

Decoding is the app's shared continuous-batching engine (:class:`qtg.serve.engine.Engine`, one per
loaded model, also behind the ``/v1`` API): a request joins the batch other sessions are decoding and
gets the tokens :func:`qtg.generate.stream` would give it alone; Stop cancels just its row. The colours
need s~, s and w of each new token; the TopoFilter looks only backwards, so the engine computes them
for the new token alone against the earlier QEmbed states and their ids (``model.topo(psi, past, ids=,
past_ids=)``, O(N) per token) rather than by re-running the sequence. A model sharded across ranks keeps
no cache and decodes through :func:`qtg.generate.stream`, scored here by :class:`Scorer` the same way. The
live diagram is exact (``qtg.topology.exact_diagrams``) on the last ``live_points`` tokens, recomputed at
most every ``live_every_s`` seconds, so it never slows the stream to a crawl.

Below it, a strip: per head, the prompt distance (``qtg.topology.prompt_distance``: the spanning forest
joining the continuation to the prompt in the attention graph of one block, the last by default) after each
generated token. The engine hands each token's attention row in that block (its ``attention_block`` extra);
one :class:`qtg.topology.PromptForest` per head takes it, O(N) per token and never a rebuild. The strip is
redrawn with the live diagram. A model sharded across ranks decodes without the engine and has no strip.
"""

from __future__ import annotations

import functools
import html
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import torch

from app.core import Explorer, Session, as_float, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Number, Slider, export_controls, fit
from qtg.attention_plots import prompt_distance_strip
from qtg.errors import GenerationError
from qtg.generate import MIN_TEMPERATURE, check_sampling, stream
from qtg.plots import persistence_diagram
from qtg.serve.engine import Engine
from qtg.tokenizer import EOS_TOKEN, decode, encode, token_strings
from qtg.topology import PromptForest, exact_diagrams

YIELD_EVERY_S = 0.05  # page updates at most this often (each carries every token so far)


@dataclass
class TokenScores:
    """Per token: text, s~, s, w, and whether it was generated (vs prompt)."""

    text: list[str] = field(default_factory=list)
    soft: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)


class Scorer:
    """s~, s, w of each token as it arrives, by the model's own TopoFilter against the tokens before it.

    It keeps what a decoding cache keeps for the TopoFilter (the QEmbed states and their token ids) and
    passes the ids, so the scores are the forward pass's own: float32 distances, exactly 0 between equal
    ids (``model.topo`` without ids would take the slower float64 path).
    """

    def __init__(self, model: Any):
        self.model = model
        self.points: torch.Tensor | None = None  # [1, N, 2d] QEmbed states so far
        self.ids: torch.Tensor | None = None  # [1, N] their token ids

    @torch.inference_mode()
    def add(self, ids: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
        """Args: ids ``[1, n]``. Returns s~, s, w of those n tokens (NaN for a model without a TopoFilter)."""
        if not self.model.has_topofilter:
            nan = [float("nan")] * ids.shape[1]
            return nan, nan, nan
        psi = self.model.embed(ids)  # [1, n, 2d]
        scores = self.model.topo(psi, self.points, want_exact=True, ids=ids, past_ids=self.ids)  # [1, n] each
        self.points = psi if self.points is None else torch.cat([self.points, psi], dim=1)
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        return scores.soft[0].tolist(), scores.exact[0].tolist(), scores.weights[0].tolist()


def token_html(scores: TokenScores) -> str:
    """The text as spans: background by 1 - w (darker = filtered more), hover s~, s, w."""
    spans = []
    for text, s_soft, s_exact, w, gen in zip(scores.text, scores.soft, scores.exact, scores.weight,
                                             scores.generated):
        alpha = 0.0 if w != w else 0.08 + 0.8 * (1.0 - w)  # NaN (baseline): no colour
        tip = "no TopoFilter" if w != w else f"s~ = {s_soft:.4f}, s = {s_exact:.4f}, w = {w:.4f}"
        style = f"background: rgba(230, 85, 13, {alpha:.3f});" + ("font-weight: 600;" if gen else "opacity: 0.8;")
        shown = html.escape(text).replace("\n", "⏎<br>")
        spans.append(f'<span class="qtg-tok" title="{tip}" style="{style}">{shown}</span>')
    legend = ('<div style="font-size: 0.85em; margin-bottom: 0.4em">Colour: 1 − w, the TopoFilter\'s '
              'down-weighting (darker = filtered more); bold = generated; hover a token for s̃, s, w.</div>')
    return legend + '<div class="qtg-text" style="white-space: pre-wrap; line-height: 1.7">' + "".join(spans) \
        + "</div>"


def live_diagram(model_points: torch.Tensor | None, limit: int) -> tuple[Any, str]:
    """Exact H0/H1 of the last ``limit`` QEmbed states, in this thread (small, so quick)."""
    if model_points is None or model_points.shape[1] < 3:
        return None, ""
    pts = model_points[0, -limit:].double().cpu().numpy()
    ex = exact_diagrams(pts, maxdim=1, max_points=limit, time_budget=None, metric_input="points")
    bars = ", ".join(f"H{k}: {len(d)}" for k, d in enumerate(ex.dgms))
    fig = fit(persistence_diagram(ex, title=f"Exact H0/H1 of the last {len(pts)} tokens' QEmbed states ({bars})"),
              height=460)
    return fig, f"live diagram: {len(pts)} points, {ex.seconds * 1000:.0f} ms ({ex.bounds.describe()})"


@torch.inference_mode()
def qembed_states(model: Any, ids: list[int], limit: int, device: Any) -> torch.Tensor | None:
    """The QEmbed states ``[1, n, 2d]`` of the last ``limit`` tokens (None for a model without a TopoFilter)."""
    if not model.has_topofilter:
        return None
    return model.embed(torch.tensor([ids[-limit:]], device=device))


# token ids (none in a last update that brings only an attention row), their s~, s, w, and the attention
# rows [H, i + 1] that arrived with them (each the row of the token before, in the strip's block)
Scored = tuple[list[int], list[float], list[float], list[float], list[torch.Tensor]]


def engine_scored(engine: Engine, ids: torch.Tensor, args: dict[str, Any], eos: int | None,
                  block: int | None = None) -> Iterator[Scored]:
    """The prompt's scores, then each new token with its own, from the shared engine; with ``block``,
    the attention rows of that block as the engine sends them (the last token's with the finish).

    The request is submitted (and checked) at the first ``next``; closing the iterator (Stop, a
    closed page) cancels it, so its row leaves the batch and no further token is computed for it.
    """
    req = engine.submit(ids, eos_id=eos, topo=True, attention_block=block, **args)
    nan = float("nan")
    try:
        prompt_sent = False
        for event in req:
            if event.error:
                raise GenerationError(event.error)
            if not prompt_sent:  # set by the engine before the first event
                n = ids.shape[1]
                topo = req.prompt_topo or [None] * n
                yield (ids[0].tolist(), [t.soft if t else nan for t in topo], [t.exact if t else nan for t in topo],
                       [t.weight if t else nan for t in topo], [])
                prompt_sent = True
            rows = [] if event.attention is None else [event.attention]
            if event.token is not None:
                t = event.topo
                yield [event.token], [t.soft if t else nan], [t.exact if t else nan], [t.weight if t else nan], rows
            elif rows:
                yield [], [], [], [], rows
    finally:
        req.cancel()


def stream_scored(model: Any, ids: torch.Tensor, args: dict[str, Any], eos: int | None) -> Iterator[Scored]:
    """The same from :func:`qtg.generate.stream` (no cache: a model sharded across ranks), scored here;
    no attention rows."""
    steps = stream(model, ids, eos_id=eos, use_cache=False, **args)  # checks the request now
    scorer = Scorer(model)
    yield (ids[0].tolist(), *scorer.add(ids), [])
    for step in steps:
        yield [int(step[0])], *scorer.add(step.view(1, 1).to(ids.device)), []


class Strip:
    """The prompt distance of each head after each generated token: one :class:`~qtg.topology.PromptForest`
    per head, fed the attention rows as they arrive (O(N) per token and head)."""

    def __init__(self, prompt_len: int, block: int):
        self.block = block
        self.prompt_len = prompt_len
        self.forests: list[PromptForest] = []
        self.values: list[list[float]] = []  # [H][T]

    def add(self, row: torch.Tensor) -> None:
        """Args: row ``[H, i + 1]``, the attention row of the next generated token i in each head."""
        if not self.forests:
            self.forests = [PromptForest(self.prompt_len) for _ in range(row.shape[0])]
            self.values = [[] for _ in self.forests]
        for forest, values, head_row in zip(self.forests, self.values, row):
            values.append(forest.add(head_row))

    def figure(self) -> Any:
        """The strip sized to its panel (None before the first row)."""
        return fit(prompt_distance_strip(self.values, self.block), height=240) if self.values else None


MAX_SEED = 2**63 - 1


def max_new_tokens_for(ex: Explorer, loaded: Loaded, prompt_tokens: int = 1) -> int:
    """The most new tokens a request may ask of this model after a prompt of ``prompt_tokens``: the app's limit,
    and the room the prompt leaves in the model's context (at least 1: a prompt that fills it is refused)."""
    return max(1, min(ex.limits.max_new_tokens, loaded.model.cfg.max_seq_len - prompt_tokens))


def prompt_tokens(ex: Explorer, loaded: Loaded, prompt: Any) -> int:
    """The tokens of a prompt as typed, for the slider's range (at least 1; never refuses: the request does)."""
    if not isinstance(prompt, str) or not prompt.strip():
        return 1
    return max(1, len(encode(loaded.tokenizer, prompt[:ex.limits.max_prompt_chars])))


def _sampling_args(ex: Explorer, loaded: Loaded, n_prompt: int, max_new_tokens, temperature, top_k, top_p,
                   seed) -> dict[str, Any]:
    n = as_int(max_new_tokens, "max new tokens", 1, max_new_tokens_for(ex, loaded, n_prompt))
    t = as_float(temperature, "temperature", 0.0, 100.0)  # below MIN_TEMPERATURE the library samples greedily
    k = as_int(top_k if top_k not in (None, "") else 0, "top-k", 0, 10_000_000)
    p = as_float(top_p if top_p not in (None, "") else 1.0, "top-p", 1e-6, 1.0)
    s = as_int(seed if seed not in (None, "") else -1, "seed", -1, MAX_SEED)
    args = dict(max_new_tokens=n, temperature=t, top_k=k or None, top_p=None if p >= 1.0 else p,
                seed=None if s < 0 else s)
    check_sampling(args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"])
    return args


def generate(ex: Explorer, session: Session | None, prompt: Any, max_new_tokens: Any = 64, temperature: Any = 0.8,
             top_k: Any = 0, top_p: Any = 1.0, seed: Any = -1, strip_block: Any = -1) -> Iterator[tuple]:
    """Stream (html, text, live figure, stats, session, export payload, prompt-distance strip) as tokens arrive.

    ``text`` is the prompt followed by the continuation so far. ``max_new_tokens`` is at most the room the
    prompt leaves in the context; top_k 0 and top_p 1 mean off; seed -1 means unseeded; temperature 0 (or
    below ``qtg.generate.MIN_TEMPERATURE``) is greedy. ``strip_block``: the block whose attention the strip
    reads (-1 = the last).
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    ids, tokens = ex.encode(loaded, prompt, ex.limits.max_prompt_chars, "prompt")
    context = loaded.model.cfg.max_seq_len
    if len(tokens) >= context:
        raise AppInputError(f"prompt: {len(tokens):,} tokens fill the {context:,}-token context of "
                            f"{loaded.source.name}: no room for a new token; shorten it")
    args = _sampling_args(ex, loaded, len(tokens), max_new_tokens, temperature, top_k, top_p, seed)
    n_layers = loaded.model.cfg.n_layers
    block = as_int(strip_block if strip_block not in (None, "") else -1, "strip block", -1, n_layers - 1) % n_layers
    ex.check_memory(loaded, ids.shape[1] + args["max_new_tokens"], "generate", kind="generate")
    tok = loaded.tokenizer
    eos = tok.token_to_id(EOS_TOKEN)
    # the shared engine, batched with every other request; a model sharded across ranks keeps no
    # decoding cache (see qtg.distributed.lockstep) and runs the library's uncached loop instead
    engine = ex.engine(loaded)
    t0 = time.perf_counter()
    scored = (engine_scored(engine, ids, args, eos, block) if engine is not None
              else stream_scored(loaded.model, ids, args, eos))
    all_ids, soft, hard, w, _ = next(scored)  # the request is checked here: a bad one goes no further
    scores = TokenScores(list(tokens), soft, hard, w, [False] * len(tokens))
    new_ids: list[int] = []
    strip = Strip(len(tokens), block)
    fig, live_note, strip_fig = None, "", None
    fig_sent = strip_sent = None
    first = last_yield = last_live = None
    ex.counters.add("streams_started")

    def stats(done: bool) -> str:
        n = len(new_ids)
        if not n:
            return "prefilling…"
        rate = (n - 1) / (time.perf_counter() - first) if n > 1 else float("nan")
        greedy = " (greedy)" if args["temperature"] < MIN_TEMPERATURE else ""
        parts = [f"{'done' if done else 'generating'}: {n} new tokens{greedy}",
                 f"first token {1000 * (first - t0):.0f} ms", f"{rate:.1f} tokens/s after it" if n > 1 else ""]
        return " · ".join(p for p in parts if p) + (f"  \n{live_note}" if live_note else "")

    def update(done: bool) -> tuple:
        nonlocal fig_sent, strip_sent
        text = decode(tok, new_ids)
        new_session = Session(session.model, session.device, prompt + text)
        # copies: this update's numbers stay as they were when it was sent, whatever comes after
        numbers = {"prompt": prompt, "continuation": text, "done": done, "token_ids": list(new_ids), "sampling": args,
                   "tokens": list(scores.text), "soft": list(scores.soft), "exact": list(scores.exact),
                   "weights": list(scores.weight), "generated": list(scores.generated), "model": loaded.source.key,
                   "prompt_distance": {"block": block, "prompt_len": len(tokens),
                                       "heads": [list(v) for v in strip.values]}}
        figs = {name: f for name, f in (("live_diagram", fig), ("prompt_distance", strip_fig)) if f is not None}
        payload = Exportable("generate", figs, numbers)
        # the live figures change at most every live_every_s: between redraws they are not sent again
        shown = gr.skip() if fig_sent is fig and not done else fig
        strip_shown = gr.skip() if strip_sent is strip_fig and not done else strip_fig
        fig_sent, strip_sent = fig, strip_fig
        return token_html(scores), prompt + text, shown, stats(done), new_session, payload, strip_shown

    def live() -> tuple[Any, str]:
        return live_diagram(qembed_states(loaded.model, all_ids, ex.limits.live_points, ids.device),
                            ex.limits.live_points)

    try:
        for token_ids, soft, hard, w, rows in scored:
            for row in rows:
                strip.add(row)
            if not token_ids:  # the last token's attention row, after its token
                continue
            all_ids += token_ids
            scores.soft += soft
            scores.exact += hard
            scores.weight += w
            now = time.perf_counter()
            first = first or now
            new_ids.append(token_ids[0])
            ex.counters.add("tokens_generated")
            scores.text += token_strings(tok, token_ids)
            scores.generated.append(True)
            if last_live is None or now - last_live >= ex.limits.live_every_s:
                fig, live_note = live()
                strip_fig = strip.figure()
                last_live = time.perf_counter()
            if last_yield is None or time.perf_counter() - last_yield >= YIELD_EVERY_S:
                last_yield = time.perf_counter()
                yield update(done=False)
    finally:
        scored.close()  # Stop: the request leaves the engine's batch now
    fig, live_note = live()
    strip_fig = strip.figure()
    ex.counters.add("streams_finished")
    yield update(done=True)


def stopped(payload: Exportable | None, status: Any) -> Any:
    """The status line after Stop: the new tokens of the last update the server sent (the page may not have
    received that one when Stop took effect). A status that says no run is under way (a finished run's
    "done: ...", an earlier Stop's line, nothing yet) is left as it is, and so is a run that finished before
    Stop reached it (its last update, "done: ...", on its way to the page)."""
    under_way = isinstance(status, str) and status.startswith("generating: ")
    if not under_way or (payload is not None and payload.numbers.get("done")):
        return gr.skip()
    n = len(payload.numbers.get("token_ids", ())) if payload is not None else 0
    return f"stopped after {n} new tokens (Stop pressed; the server computes no more)"


def control_ranges(ex: Explorer, loaded: Loaded, prompt: Any = "") -> tuple:
    """Updates of this tab's controls for ``loaded`` (max new tokens follows its context, less the prompt)."""
    n = max_new_tokens_for(ex, loaded, prompt_tokens(ex, loaded, prompt))
    return (gr.update(maximum=n, value=min(80, n)), gr.update(maximum=max(1, loaded.model.cfg.n_layers - 1), value=-1))


def room_for(ex: Explorer, session: Session | None, prompt: Any, max_new_tokens: Any) -> Any:
    """The max-new-tokens slider after the prompt changed: its maximum is the room the prompt leaves, its value
    kept unless beyond that."""
    loaded = ex.current(session)
    n = max_new_tokens_for(ex, loaded, prompt_tokens(ex, loaded, prompt))
    keep = isinstance(max_new_tokens, (int, float)) and not isinstance(max_new_tokens, bool) and max_new_tokens <= n
    return gr.update(maximum=n) if keep else gr.update(maximum=n, value=n)


def build(ex: Explorer, session: gr.State, loaded: Loaded) -> dict[str, Any]:
    """The tab's components and events; ``loaded`` is the model the page starts on (its ranges)."""
    lim = ex.limits
    n_max = max_new_tokens_for(ex, loaded)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="prompt", value="ROMEO:", lines=3, max_length=lim.max_prompt_chars,
                                elem_id="prompt")
            with gr.Row():
                max_new = Slider(1, n_max, value=min(80, n_max), step=1, label="max new tokens", elem_id="max-new")
                temperature = Slider(0, 2, value=0.8, step=0.05, label="temperature (0 = greedy)")
            with gr.Row():
                top_k = Number(value=0, precision=0, label="top-k (0 = off)", minimum=0)
                top_p = Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p (1 = off)")
                # text, not a number: a browser's numbers are doubles, and the largest seed (2^63 - 1) is not one
                seed = gr.Textbox(value="-1", label=f"seed (-1 = random, up to {MAX_SEED})", max_lines=1)
            block = Slider(-1, max(1, loaded.model.cfg.n_layers - 1), value=-1, step=1,
                           label="strip block (-1 = the last): the block the prompt-distance strip reads",
                           elem_id="strip-block")
            with gr.Row():
                go_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            text_html = gr.HTML(label="text, coloured by TopoFilter weight", elem_id="generated-html")
            stats = gr.Markdown(elem_id="generate-stats")
        with gr.Column(scale=2):
            live = gr.Plot(label="live exact diagram", elem_id="live-diagram")
            strip_plot = gr.Plot(label="prompt distance per head (live)", elem_id="prompt-distance-strip")
            continuation = gr.Textbox(label="text (prompt + continuation, plain)", lines=4, interactive=False,
                                      elem_id="continuation")
    payload = gr.State(None)
    export_controls(ex, payload, "generate")

    evt = go_btn.click(user_facing(functools.partial(generate, ex), "generate"),
                       [session, prompt, max_new, temperature, top_k, top_p, seed, block],
                       [text_html, continuation, live, stats, session, payload, strip_plot], api_name="generate",
                       concurrency_id="heavy")
    # Cancelling closes the generator on the server: no further token is computed. Then the status says so.
    stop_btn.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, [payload, stats], [stats], api_visibility="private", queue=False)
    # the slider offers only what fits: the context less the prompt's tokens
    prompt.change(functools.partial(room_for, ex), [session, prompt, max_new], [max_new], api_visibility="private",
                  queue=False, show_progress="hidden", trigger_mode="always_last")
    return {"event": evt, "ranges": [max_new, block], "prompt": prompt}
