"""Assemble the tabs into one Gradio app and serve it.

    demo, explorer = build_app(AppConfig())      # the default model is loaded here
    launch(AppConfig(), host="127.0.0.1", port=7860)

Heavy events (generate, topology, attention, compare) share one queue slot pool of
``cfg.concurrency``; loading and exporting run one at a time. The page makes no request
outside this server: analytics are off, fonts are the system's, plotly.js is served locally.

What the server refuses or rewrites (:class:`Guard`, around every route, Gradio's and ``/v1``):

* a request whose ``Host`` is not one this server was bound for (:class:`Hosts`): a page on a name that
  its owner points at this machine (DNS rebinding) is refused, so it cannot read or drive the app;
* a state-changing request (POST, ...) whose ``Origin`` is not this server: a page on another
  site cannot drive the app through a visitor's browser;
* uploads: the app has no upload widget (Gradio's file-size limit is also 0);
* every file it serves (``/file=``) goes out as a download (``Content-Disposition: attachment``)
  under ``Content-Security-Policy: sandbox``, so nothing served renders as a page of this origin;
  an exported file's URL names it under ``exports/`` (``app.exports.public_path``), never by the folder's path.

Files are served only from this launch's private export folder (Gradio's cache lives there too). The folder,
and the Training tab's runs, are removed when the server ends: on a normal exit, Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.routing import Mount  # noqa: E402

from app.config import AppConfig  # noqa: E402
from app.core import Explorer  # noqa: E402
from app.exports import SERVED_AS, real_path  # noqa: E402
from app.tabs import attention, compare, experiment, generate, patching, tiers, topology, training  # noqa: E402
from qtg.serve.api import create_api  # noqa: E402

log = logging.getLogger(__name__)

INTRO = """# QTG Explorer
A QTG language model (TopoFilter + Fisher–Rao GeoAttention) beside exact topology. **Generate** streams text
coloured by the TopoFilter's weights with a live exact diagram; **Topology** sets gudhi and ripser beside the
TopoFilter's approximation; **Attention** shows Fisher–Rao maps and the baseline's; **Compare** runs one text
through two models; **Tiers** loads and unloads models.
**Experiment** edits the forward pass (TopoFilter, γ, heads, positions) on a text and over the held-out works,
with confidence intervals, and shows the logit lens. **Patching** patches a clean prompt's activations into a
corrupted one (residual stream, heads, the TopoFilter's w), with logit attribution, beside the baseline.
**Training** scrubs a run's snapshots, or a micro run trained here: loss, γ, entropy, w, exact-vs-approximate H0."""

# Table headers break between words only; the Compare and Tiers tables scroll rather than clip.
TABLES = ("#tiers-table", "#compare-table", "#attention-topology-features")
CSS = ", ".join(f"{t} th, {t} th *" for t in TABLES) + """ {
  word-break: normal !important; overflow-wrap: normal !important; hyphens: none !important; }
"""

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
FILE_ROUTES = ("/file=", "/file/")
QUIET_LOGGERS = ("kaleido", "choreographer", "logistro", "httpx", "urllib3")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # bound on every interface


class Hosts:
    """The ``Host`` headers this server answers: 127.0.0.1, localhost, [::1] (and any loopback address), the
    name or address it was bound to, and ``extra`` names (``--allow-host``: a reverse proxy's, say).

    Bound on every interface (``--host 0.0.0.0``), it also answers any IP address and this machine's own
    names. A name is what DNS rebinding needs (an IP address cannot be re-pointed), as in Jupyter Server.
    """

    def __init__(self, bind: str, extra: Iterable[str] = ()):
        names = {*LOOPBACK, _bare(bind), *(_bare(e) for e in extra)}
        self.any_address = bind in WILDCARDS
        if self.any_address:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = frozenset(names - {""})

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header (``name[:port]``; None when missing) is answered."""
        name = urlsplit(f"//{header}").hostname if header else None  # lower case, IPv6 brackets dropped
        if not name:
            return False
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        return address.is_loopback or self.any_address


def _bare(host: str) -> str:
    return host.strip().strip("[]").lower()


class Guard:
    """ASGI middleware: foreign hosts, cross-origin writes and uploads refused; served files sent as sandboxed
    downloads, an export's public name (``exports/...``) mapped to its file in ``export_dir``."""

    def __init__(self, app: Any, hosts: Hosts, export_dir: Path):
        self.app = app
        self.hosts = hosts
        self.export_dir = export_dir

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.hosts.allows(headers.get("host")):
            log.warning("refused %s %s: Host %s is not this server", method, path[:100], headers.get("host", "")[:100])
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})  # before accepting: an HTTP 403
                return
            await _drain(receive)
            await _plain(send, 403, "host not allowed: use 127.0.0.1, localhost, [::1], --host or an --allow-host name")
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
                log.warning("refused %s %s: foreign origin %s", method, path, origin[:100])
                await _drain(receive)
                await _plain(send, 403, "cross-origin request refused")
                return
            if path.rstrip("/").endswith("/upload"):
                log.warning("refused %s %s: this app accepts no uploads", method, path)
                await _drain(receive)
                await _plain(send, 413, "this app accepts no uploads")
                return
        if any(r in path for r in FILE_ROUTES):
            head, sep, public = path.partition(f"/file={SERVED_AS}/")
            if sep:  # an export's public name: Gradio serves the file by its path
                real = real_path(f"{SERVED_AS}/{public}", self.export_dir)
                if real is None:
                    await _plain(send, 404, "no such export")
                    return
                path = f"{head}/file={real}"
                scope = {**scope, "path": path, "raw_path": quote(path, safe="/=:").encode()}
            send = _as_download(send)
        await self.app(scope, receive, send)


async def _drain(receive: Any, limit: int = 64 * 2**20) -> None:
    """Read and drop a refused request's body (up to ``limit`` bytes), so the client reads the refusal rather
    than a reset connection; nothing is kept."""
    seen = 0
    while seen <= limit:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _as_download(send: Any) -> Any:
    """``send`` with a served file's headers made a download in a sandbox, whatever its type."""

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", [])
                    if k.lower() not in (b"content-disposition", b"content-security-policy", b"x-content-type-options")]
            disposition = next((v for k, v in message.get("headers", []) if k.lower() == b"content-disposition"), b"")
            filename = disposition.partition(b";")[2].strip()
            kept += [(b"content-disposition", b"attachment" + (b"; " + filename if filename else b"")),
                     (b"content-security-policy", b"default-src 'none'; sandbox"),
                     (b"x-content-type-options", b"nosniff")]
            message = {**message, "headers": kept}
        await send(message)

    return wrapped


def control_ranges(ex: Explorer, session, prompt: str = "") -> tuple:
    """Every range-bound control, set for the session's model: generate's max new tokens (the room ``prompt``
    leaves), topology's layers, attention's blocks, heads and pages of heads; and the status line."""
    loaded = ex.current(session)
    return (loaded.describe(), *generate.control_ranges(ex, loaded, prompt), *topology.control_ranges(ex, loaded),
            *attention.control_ranges(ex, loaded))


def build_app(cfg: AppConfig, model=None) -> tuple[gr.Blocks, Explorer]:
    """The Blocks app and its Explorer; the default model is loaded before this returns.

    ``model``: serve this one only (under torchrun, rank 0's ``qtg.distributed.Lockstep`` handle)."""
    ex = Explorer(cfg, model)
    first = ex.current(None)
    # Gradio's cache (where it would copy served files, and where uploads would land) is the export folder:
    # exports are served from where they are written, and one folder is pruned and removed.
    os.environ["GRADIO_TEMP_DIR"] = str(ex.export_dir)
    with gr.Blocks(title="QTG Explorer", analytics_enabled=False) as demo:
        session = gr.State(ex.new_session())  # copied per browser session / client
        gr.Markdown(INTRO)
        status = gr.Markdown(first.describe(), elem_id="status")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                gen = generate.build(ex, session, first)
            with gr.Tab("Topology", id="topology"):
                topo = topology.build(ex, session, first)
            with gr.Tab("Attention", id="attention"):
                attn = attention.build(ex, session, first)
            with gr.Tab("Compare", id="compare"):
                compare.build(ex, session)
            with gr.Tab("Experiment", id="experiment"):
                experiment.build(ex, session)
            with gr.Tab("Patching", id="patching"):
                patching.build(ex, session)
            with gr.Tab("Training", id="training"):
                training.build(ex)
            with gr.Tab("Tiers", id="tiers"):
                tier = tiers.build(ex, session)
        ranged = [status, *gen["ranges"], *topo["ranges"], *attn["ranges"]]
        follow = dict(fn=lambda s, p: control_ranges(ex, s, p), inputs=[session, gen["prompt"]], outputs=ranged,
                      api_visibility="private")
        tier["load_event"].then(**follow)
        tier["unload_event"].then(**follow)
        # On every page load: the ranges of this session's model, and the tier table (no button press needed)
        demo.load(**follow)
        demo.load(**tier["table_event"], api_visibility="private", concurrency_id="light")
    demo.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
    return demo, ex


def api_mount(ex: Explorer) -> Mount:
    """The OpenAI-compatible API (docs/serve.md) at ``/v1``, on the default model's batching engine."""
    return Mount("/v1", app=create_api(ex.api_models, prefix=""))


def theme() -> gr.themes.Base:
    """The default look with the system's fonts: nothing is fetched from a font service."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def quiet_logs() -> None:
    """Libraries that log every step of a PNG export or an HTTP call: warnings only."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def launch(cfg: AppConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           model=None, allow_hosts: Iterable[str] = ()) -> tuple[gr.Blocks, Explorer, str]:
    """Serve the app. Files are served from this launch's private export folder only; it is removed at exit.

    Requests are answered for the ``Host`` names of :class:`Hosts` (``host`` and ``allow_hosts`` among them).
    With ``block``, SIGTERM and SIGINT end the server as Ctrl-C does, and this launch's folders are removed
    before this returns. The tier table's parameter counts (5.5q's meta build takes seconds) are warmed in a thread
    started once the server answers, so the first page does not wait for them.

    Returns:
        (demo, explorer, local URL); with ``block`` False the server runs in a thread and this returns at once.
    """
    quiet_logs()
    if block:
        end_on_signals()
    demo, ex = build_app(cfg, model)
    atexit.register(shutil.rmtree, ex.export_dir, ignore_errors=True)  # this launch's exports go with it
    repo = Path(__file__).resolve().parent.parent
    guard = Middleware(Guard, hosts=Hosts(host, allow_hosts), export_dir=ex.export_dir)
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True,
                                blocked_paths=[str(repo / "assets")], max_file_size=0,
                                app_kwargs={"middleware": [guard], "routes": [api_mount(ex)]},
                                ssr_mode=False, mcp_server=False,
                                footer_links=["api"], quiet=not block, theme=theme(), css=CSS, show_error=True)
        # Not a daemon: a daemon thread killed inside torch at interpreter exit aborts the process.
        threading.Thread(target=tiers.summaries, args=(ex.device,), name="warm-tier-table").start()
        if block:
            serve_until_interrupted(demo)
    finally:
        if block:  # here, not only at exit: a torchrun rank leaves without running exit handlers
            shut_down(demo, ex)
    return demo, ex, url


def end_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt: the server then closes and cleans up as after Ctrl-C. Left
    to Python, SIGTERM ends the process at once, leaving the folders behind, and a SIGINT ignored from the
    start (a job a script started with ``&``) does nothing."""
    if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)


def serve_until_interrupted(demo: gr.Blocks) -> None:
    """Wait while the server runs, until Ctrl-C or SIGTERM (not ``demo.block_thread``: it closes the server
    before the open event streams, then waits seconds for them)."""
    try:
        while demo.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        log.info("interrupted: closing the server and removing this launch's folders")


def shut_down(demo: gr.Blocks, ex: Explorer) -> None:
    """Close the server, stop the runs the Training tab started and remove this launch's folders."""
    demo.close()
    training.runs_for(ex).close()
    shutil.rmtree(ex.export_dir, ignore_errors=True)
