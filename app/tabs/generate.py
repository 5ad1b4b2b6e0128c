"""Generate tab: the text streams token by token, each token coloured by its TopoFilter weight,
beside a live exact H0/H1 diagram of the growing sequence. Endpoint ``/generate``.

Decoding is the app's shared continuous-batching engine (:class:`qtg.serve.engine.Engine`, one per
loaded model, also behind the ``/v1`` API): a request joins the batch other sessions are decoding and
gets the tokens :func:`qtg.generate.stream` would give it alone; Stop cancels just its row. The colours
need s~, s and w of each new token; the TopoFilter looks only backwards, so the engine computes them
for the new token alone against the earlier QEmbed states and their ids (``model.topo_scores(psi, past, ids=,
past_ids=)``, O(N) per token) rather than by re-running the sequence. A model sharded across ranks keeps
no cache and decodes through :func:`qtg.generate.stream`, scored here by :class:`Scorer` the same way. The
live diagram is exact (``qtg.topology.exact_diagrams``) on the last ``live_points`` tokens, recomputed at
most every ``live_every_s`` seconds, so it never slows the stream to a crawl.

Below it, a strip: per head, the prompt distance (``qtg.topology.prompt_distance``: the spanning forest
joining the continuation to the prompt in the attention graph of one block, the last by default) after each
generated token. The engine hands each token's attention row in that block (its ``attention_block`` extra);
one :class:`qtg.topology.PromptForest` per head takes it, O(N) per token and never a rebuild. The strip is
redrawn with the live diagram. A model sharded across ranks decodes without the engine and has no strip.

The "w from" toggle colours the tokens by a control's w instead (position only, or a one-bit gate:
``app.controls``), the filter's beside it on hover, with the figures in words; changing it recolours the last
generation (``/generate_w_from``) from its numbers, with nothing decoded again.
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

from app.controls import FILTER, compare_weights, control_of
from app.core import Explorer, Session, as_float, as_int
from app.errors import user_facing
from app.exports import Exportable
from app.models import AppInputError, Loaded
from app.tabs.common import Number, Slider, export_controls, fit, w_from_toggle
from qtg.data.tokenizer import EOS_TOKEN, decode, encode, token_strings
from qtg.errors import GenerationError
from qtg.experiments.topo_controls import CONTROLS, ControlComparison
from qtg.generate import MIN_TEMPERATURE, check_sampling, stream
from qtg.model.protocol import LanguageModel
from qtg.plots.attention import prompt_distance_strip
from qtg.plots.topology import persistence_diagram
from qtg.serve.engine import Engine
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
    ids (``model.topo_scores`` without ids would take the slower float64 path).
    """

    def __init__(self, model: LanguageModel):
        self.model = model
        self.points: torch.Tensor | None = None  # [1, N, 2d] QEmbed states so far
        self.ids: torch.Tensor | None = None  # [1, N] their token ids

    @torch.inference_mode()
    def add(self, ids: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
        """Args: ids ``[1, n]``. Returns s~, s, w of those n tokens (NaN for a model without a TopoFilter)."""
        if not self.model.has_topofilter:
            nan = [float("nan")] * ids.shape[1]
            return nan, nan, nan
        psi = self.model.embed_points(ids)  # [1, n, 2d]
        scores = self.model.topo_scores(psi, self.points, ids=ids, past_ids=self.ids)  # [1, n] each
        self.points = psi if self.points is None else torch.cat([self.points, psi], dim=1)
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)
        return scores.soft[0].tolist(), scores.exact[0].tolist(), scores.weights[0].tolist()


def token_html(scores: TokenScores, comparison: ControlComparison | None = None, note: str = "") -> str:
    """The text as spans: background by 1 - w (darker = filtered more), the filter's w or, with ``comparison``,
    the control's for the same tokens (``data-w`` holds the w coloured); hover s~, s, w (and the control's w).
    ``note``: the toggle's figures, in words, above the text."""
    shown = comparison.shown if comparison is not None else scores.weight
    what = "the TopoFilter's" if comparison is None or comparison.control is None else \
        f"the {CONTROLS[comparison.control]} control's"
    spans = []
    for i, (text, s_soft, s_exact, w, gen) in enumerate(zip(scores.text, scores.soft, scores.exact, scores.weight,
                                                             scores.generated)):
        v = float(shown[i])
        alpha = 0.0 if v != v else 0.08 + 0.8 * (1.0 - v)  # NaN (baseline): no colour
        tip = "no TopoFilter" if w != w else f"s~ = {s_soft:.4f}, s = {s_exact:.4f}, w = {w:.4f}"
        if comparison is not None and comparison.control is not None:
            tip += f", {CONTROLS[comparison.control]} w = {v:.4f}"
        style = f"background: rgba(230, 85, 13, {alpha:.3f});" + ("font-weight: 600;" if gen else "opacity: 0.8;")
        shown_text = html.escape(text).replace("\n", "⏎<br>")
        spans.append(f'<span class="qtg-tok" data-w="{v:.6f}" title="{tip}" style="{style}">{shown_text}</span>')
    legend = (f'<div style="font-size: 0.85em; margin-bottom: 0.4em">Colour: 1 − w, {what} down-weighting (darker = '
              'filtered more); bold = generated; hover a token for s̃, s, w.</div>')
    if note:
        words = html.escape(note).replace("\n", "<br>")
        legend += f'<div class="qtg-control-note" style="font-size: 0.85em; margin-bottom: 0.4em">{words}</div>'
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
def qembed_states(model: LanguageModel, ids: list[int], limit: int, device: Any) -> torch.Tensor | None:
    """The QEmbed states ``[1, n, 2d]`` of the last ``limit`` tokens (None for a model without a TopoFilter)."""
    if not model.has_topofilter:
        return None
    return model.embed_points(torch.tensor([ids[-limit:]], device=device))


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


def stream_scored(model: LanguageModel, ids: torch.Tensor, args: dict[str, Any], eos: int | None) -> Iterator[Scored]:
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


@dataclass
class Request:
    """A checked Generate request: the model, the prompt's ids and token strings, the sampling, the strip's block."""

    loaded: Loaded
    prompt: str
    ids: torch.Tensor  # [1, n] the prompt's token ids
    tokens: list[str]
    args: dict[str, Any]  # qtg.generate's sampling arguments
    block: int  # the block whose attention the strip reads (0-based)
    control: str  # what the colouring shows: a choice of app.controls.CHOICES
    eos: int | None


def checked_request(ex: Explorer, loaded: Loaded, prompt: Any, max_new_tokens: Any, temperature: Any, top_k: Any,
                    top_p: Any, seed: Any, strip_block: Any, control: Any) -> Request:
    """Every field checked, and the memory the request needs, before anything runs.

    Raises:
        AppInputError: a field out of range (named), or a prompt that leaves no room in the context.
    """
    ids, tokens = ex.encode(loaded, prompt, ex.limits.max_prompt_chars, "prompt")
    context = loaded.model.cfg.max_seq_len
    if len(tokens) >= context:
        raise AppInputError(f"prompt: {len(tokens):,} tokens fill the {context:,}-token context of "
                            f"{loaded.source.name}: no room for a new token; shorten it")
    args = _sampling_args(ex, loaded, len(tokens), max_new_tokens, temperature, top_k, top_p, seed)
    n_layers = loaded.model.cfg.n_layers
    block = as_int(strip_block if strip_block not in (None, "") else -1, "strip block", -1, n_layers - 1) % n_layers
    control_of(control)  # refused now, by name, rather than after the tokens are computed
    ex.check_memory(loaded, ids.shape[1] + args["max_new_tokens"], "generate", kind="generate")
    return Request(loaded, prompt, ids, tokens, args, block, control or FILTER,
                   loaded.tokenizer.token_to_id(EOS_TOKEN))


class Progress:
    """What one generation has shown so far (tokens, their s~, s, w, the strip, the live diagram), and the page
    update built from it. Owned by one :func:`generate` call."""

    def __init__(self, ex: Explorer, session: Session, req: Request, first: Scored, t0: float):
        """``first``: the prompt's scores; ``t0``: when the request was submitted (the first token's latency)."""
        self.ex, self.session, self.req = ex, session, req
        self.all_ids, soft, hard, w, _ = first
        self.scores = TokenScores(list(req.tokens), soft, hard, w, [False] * len(req.tokens))
        self.new_ids: list[int] = []
        self.strip = Strip(len(req.tokens), req.block)
        self.fig, self.live_note, self.strip_fig = None, "", None
        self.fig_sent = self.strip_sent = None  # the live figures as last sent (not sent again until redrawn)
        self.t0 = t0
        self.first: float | None = None  # when the first new token came
        self.last_live: float | None = None

    def add(self, token_ids: list[int], soft: list[float], hard: list[float], w: list[float],
            rows: list[torch.Tensor]) -> bool:
        """One item of the scored stream; True when it brought a token (not only the last attention row)."""
        for row in rows:
            self.strip.add(row)
        if not token_ids:
            return False
        self.all_ids += token_ids
        self.scores.soft += soft
        self.scores.exact += hard
        self.scores.weight += w
        self.first = self.first or time.perf_counter()
        self.new_ids.append(token_ids[0])
        self.ex.counters.add("tokens_generated")
        self.scores.text += token_strings(self.req.loaded.tokenizer, token_ids)
        self.scores.generated.append(True)
        if self.last_live is None or time.perf_counter() - self.last_live >= self.ex.limits.live_every_s:
            self.redraw()
        return True

    def redraw(self) -> None:
        """The live diagram and the strip, from every token so far."""
        limit = self.ex.limits.live_points
        self.fig, self.live_note = live_diagram(qembed_states(self.req.loaded.model, self.all_ids, limit,
                                                              self.req.ids.device), limit)
        self.strip_fig = self.strip.figure()
        self.last_live = time.perf_counter()

    def stats(self, done: bool) -> str:
        n = len(self.new_ids)
        if not n:
            return "prefilling…"
        rate = (n - 1) / (time.perf_counter() - self.first) if n > 1 else float("nan")
        greedy = " (greedy)" if self.req.args["temperature"] < MIN_TEMPERATURE else ""
        parts = [f"{'done' if done else 'generating'}: {n} new tokens{greedy}",
                 f"first token {1000 * (self.first - self.t0):.0f} ms",
                 f"{rate:.1f} tokens/s after it" if n > 1 else ""]
        return " · ".join(p for p in parts if p) + (f"  \n{self.live_note}" if self.live_note else "")

    def update(self, done: bool) -> tuple:
        """(html, text, live figure, stats, session, export payload, strip) for the page."""
        req = self.req
        text = decode(req.loaded.tokenizer, self.new_ids)
        new_session = Session(self.session.model, self.session.device, req.prompt + text)
        s = self.scores
        # copies: this update's numbers stay as they were when it was sent, whatever comes after
        numbers = {"prompt": req.prompt, "continuation": text, "done": done, "token_ids": list(self.new_ids),
                   "sampling": req.args, "tokens": list(s.text), "soft": list(s.soft), "exact": list(s.exact),
                   "weights": list(s.weight), "generated": list(s.generated), "model": req.loaded.source.key,
                   "device": req.loaded.device,
                   "prompt_distance": {"block": req.block, "prompt_len": len(req.tokens),
                                       "heads": [list(v) for v in self.strip.values]}}
        coloured, numbers["control"] = colouring(self.ex, req.loaded, s, req.control)
        figs = {name: f for name, f in (("live_diagram", self.fig), ("prompt_distance", self.strip_fig))
                if f is not None}
        # the live figures change at most every live_every_s: between redraws they are not sent again
        shown = gr.skip() if self.fig_sent is self.fig and not done else self.fig
        strip_shown = gr.skip() if self.strip_sent is self.strip_fig and not done else self.strip_fig
        self.fig_sent, self.strip_sent = self.fig, self.strip_fig
        return (coloured, req.prompt + text, shown, self.stats(done), new_session,
                Exportable("generate", figs, numbers), strip_shown)


def colouring(ex: Explorer, loaded: Loaded, scores: TokenScores, control: Any) -> tuple[str, dict[str, Any] | None]:
    """The tokens coloured by the w the toggle picks, with its figures; and those figures for the export.

    The filter's own w needs nothing more; a control reads the model's calibration (measured on first use)."""
    if control_of(control) is None:
        return token_html(scores), None
    comparison, note = compare_weights(ex.calibrations, loaded, control, scores.weight, scores.exact)
    if comparison is None:  # no TopoFilter: nothing to colour
        return token_html(scores, note=note), None
    return token_html(scores, comparison, note), {"choice": control, **comparison.to_dict()}


def generate(ex: Explorer, session: Session | None, prompt: Any, max_new_tokens: Any = 64, temperature: Any = 0.8,
             top_k: Any = 0, top_p: Any = 1.0, seed: Any = -1, strip_block: Any = -1,
             w_from: Any = FILTER) -> Iterator[tuple]:
    """Stream (html, text, live figure, stats, session, export payload, prompt-distance strip) as tokens arrive.

    ``text`` is the prompt followed by the continuation so far. ``max_new_tokens`` is at most the room the
    prompt leaves in the context; top_k 0 and top_p 1 mean off; seed -1 means unseeded; temperature 0 (or
    below ``qtg.generate.MIN_TEMPERATURE``) is greedy. ``strip_block``: the block whose attention the strip
    reads (-1 = the last). ``w_from``: the w the colouring shows (``app.controls.CHOICES``: the filter's, or a
    control's for the same tokens, beside it).
    """
    session = session or ex.new_session()
    loaded = ex.current(session)
    req = checked_request(ex, loaded, prompt, max_new_tokens, temperature, top_k, top_p, seed, strip_block, w_from)
    # the shared engine, batched with every other request; a model sharded across ranks keeps no
    # decoding cache (see qtg.distributed.lockstep) and runs the library's uncached loop instead
    engine = ex.engine(loaded)
    t0 = time.perf_counter()
    scored = (engine_scored(engine, req.ids, req.args, req.eos, req.block) if engine is not None
              else stream_scored(loaded.model, req.ids, req.args, req.eos))
    progress = Progress(ex, session, req, next(scored), t0)  # the request is checked here: a bad one goes no further
    ex.counters.add("streams_started")
    last_yield = None
    try:
        for item in scored:
            if progress.add(*item) and (last_yield is None or time.perf_counter() - last_yield >= YIELD_EVERY_S):
                last_yield = time.perf_counter()
                yield progress.update(done=False)
    finally:
        scored.close()  # Stop: the request leaves the engine's batch now
    progress.redraw()
    ex.counters.add("streams_finished")
    yield progress.update(done=True)


def recolour(ex: Explorer, session: Session | None, payload: Exportable | None, w_from: Any) -> tuple:
    """The "w from" toggle: (html, payload) of the last generation, its tokens coloured again by the w it picks
    (nothing recomputed but the control's w); nothing to do before a generation."""
    if payload is None or payload.tab != "generate":
        return gr.skip(), gr.skip()
    n = payload.numbers
    loaded = ex.registry.get(n["model"], n.get("device") or (session or ex.new_session()).device)
    scores = TokenScores(n["tokens"], n["soft"], n["exact"], n["weights"], n["generated"])
    coloured, numbers = colouring(ex, loaded, scores, w_from)
    return coloured, Exportable("generate", payload.figures, {**n, "control": numbers})


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
            w_from = w_from_toggle("generate-w-from")
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
                       [session, prompt, max_new, temperature, top_k, top_p, seed, block, w_from],
                       [text_html, continuation, live, stats, session, payload, strip_plot], api_name="generate",
                       concurrency_id="heavy")
    # Cancelling closes the generator on the server: no further token is computed. Then the status says so.
    stop_btn.click(None, None, None, cancels=[evt], api_visibility="private").then(
        stopped, [payload, stats], [stats], api_visibility="private", queue=False)
    # the toggle colours the last generation again (the control's calibration is measured on first use)
    w_from.change(user_facing(functools.partial(recolour, ex), "generate_w_from"), [session, payload, w_from],
                  [text_html, payload], api_name="generate_w_from", concurrency_id="heavy")
    # the slider offers only what fits: the context less the prompt's tokens
    prompt.change(functools.partial(room_for, ex), [session, prompt, max_new], [max_new], api_visibility="private",
                  queue=False, show_progress="hidden", trigger_mode="always_last")
    return {"event": evt, "ranges": [max_new, block], "prompt": prompt}
