"""Assemble the tabs into one Gradio app and serve it.

    demo, explorer = build_app(AppConfig())      # the default model is loaded here
    launch(AppConfig(), host="127.0.0.1", port=7860)

Heavy events (generate, topology, attention, compare) share one queue slot pool of
``cfg.concurrency``; loading and exporting run one at a time. The page makes no request
outside this server: analytics are off, fonts are the system's, plotly.js is served locally.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr  # noqa: E402

from app.config import AppConfig  # noqa: E402
from app.core import Explorer  # noqa: E402
from app.tabs import attention, compare, generate, tiers, topology  # noqa: E402

log = logging.getLogger(__name__)

INTRO = """# QTG Explorer
A QTG language model (TopoFilter + Fisher–Rao GeoAttention) beside exact topology. **Generate** streams text
coloured by the TopoFilter's weights with a live exact diagram; **Topology** sets gudhi and ripser beside the
TopoFilter's approximation; **Attention** shows Fisher–Rao maps and the baseline's; **Compare** runs one text
through two models; **Tiers** loads another model."""


def _limits_update(ex: Explorer, session) -> tuple:
    """Slider ranges for the session's model (layers and heads differ between tiers)."""
    loaded = ex.current(session)
    cfg = loaded.model.cfg
    n_states = cfg.n_layers + (2 if loaded.is_qtg else 1)
    return (gr.update(maximum=n_states - 1), gr.update(maximum=max(0, cfg.n_layers - 1)),
            gr.update(maximum=max(0, cfg.n_heads - 1)))


def build_app(cfg: AppConfig, model=None) -> tuple[gr.Blocks, Explorer]:
    """The Blocks app and its Explorer; the default model is loaded before this returns.

    ``model``: serve this one only (under torchrun, rank 0's ``qtg.distributed.Lockstep`` handle)."""
    ex = Explorer(cfg, model)
    first = ex.current(None)
    # The tier table counts 5.5q on the meta device (seconds): warm it while the page loads. Not a daemon:
    # a daemon thread killed inside torch at interpreter exit aborts the process ("terminate called ...").
    threading.Thread(target=tiers.summaries, args=(ex.device,), name="warm-tier-table").start()
    mcfg = first.model.cfg
    with gr.Blocks(title="QTG Explorer", analytics_enabled=False) as demo:
        session = gr.State(ex.new_session())  # copied per browser session / client
        gr.Markdown(INTRO)
        status = gr.Markdown(first.describe(), elem_id="status")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                generate.build(ex, session)
            with gr.Tab("Topology", id="topology"):
                topo = topology.build(ex, session, mcfg.n_layers + (2 if first.is_qtg else 1))
            with gr.Tab("Attention", id="attention"):
                attn = attention.build(ex, session, mcfg.n_layers, mcfg.n_heads)
            with gr.Tab("Compare", id="compare"):
                compare.build(ex, session)
            with gr.Tab("Tiers", id="tiers"):
                tier = tiers.build(ex, session)
        sliders = [topo["layer"], attn["layer"], attn["head"]]
        tier["load_event"].then(lambda s: (ex.current(s).describe(), *_limits_update(ex, s)), [session],
                                [status, *sliders], api_visibility="private")
    demo.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
    return demo, ex


def theme() -> gr.themes.Base:
    """The default look with the system's fonts: nothing is fetched from a font service."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def launch(cfg: AppConfig, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           model=None) -> tuple[gr.Blocks, Explorer, str]:
    """Serve the app. Files are served from the export directory only (Gradio's cache lives there too).

    Returns:
        (demo, explorer, local URL); with ``block`` False the server runs in a thread and this returns at once.
    """
    export_dir = Path(cfg.export_dir).resolve()
    export_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(export_dir / "gradio-cache")
    demo, ex = build_app(cfg, model)
    repo = Path(__file__).resolve().parent.parent
    _, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                            allowed_paths=[str(export_dir)], blocked_paths=[str(repo / "assets")],
                            ssr_mode=False, mcp_server=False, footer_links=["api"], quiet=not block,
                            theme=theme(), show_error=True)
    return demo, ex, url
