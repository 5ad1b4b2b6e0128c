"""UI pieces more than one tab uses."""

from __future__ import annotations

import gradio as gr

from app.core import Explorer
from app.errors import user_facing
from app.exports import export


def export_controls(ex: Explorer, payload: gr.State, tab: str) -> None:
    """A button that writes the tab's last figures (HTML, PNG) and numbers (JSON); endpoint ``/export_<tab>``."""
    with gr.Accordion("Export: standalone HTML, PNG, JSON", open=False):
        btn = gr.Button("Export", elem_id=f"export-{tab}")
        files = gr.File(label="files", file_count="multiple", interactive=False)
        msg = gr.Markdown()

    def run(item):
        return export(item, ex.cfg.export_dir)

    btn.click(user_facing(run), [payload], [files, msg], api_name=f"export_{tab}", concurrency_id="export",
              concurrency_limit=1)

