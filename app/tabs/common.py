"""UI pieces more than one tab uses: form fields checked by the app, figure sizing, the export controls."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.controls import CHOICES, FILTER
from app.core import Explorer
from app.errors import user_facing
from app.exports import export, public_path


# Gradio checks a slider's, number's, dropdown's or radio's value itself before the handler runs, and words a
# refusal as "Value 1000000000 is greater than maximum value 512." or a multi-line dump naming components and
# object addresses. These pass the value through unchanged (``is_template``: the page draws them as the
# components they extend); every handler checks its fields with ``app.core.as_int`` / ``as_float`` or the
# registry, whose one-line messages name the field.
# Each subclasses its component directly, not through a shared mixin: Gradio finds a template's front-end
# component from the class's first base, and with a mixin first the page never finishes loading.
class Slider(gr.Slider):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Number(gr.Number):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Dropdown(gr.Dropdown):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Radio(gr.Radio):
    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return payload


class Downloads(gr.File):
    """Exported files, named to the page and to API clients by :func:`app.exports.public_path`
    (``exports/<export>/<file>``): the URLs never show the private folder's path. The server's Guard
    maps the name back to the file."""

    is_template = True

    def move_resource_to_block_cache(self, url_or_file_path: Any) -> str | None:
        path = super().move_resource_to_block_cache(url_or_file_path)
        return None if path is None else public_path(path, self.GRADIO_CACHE)

    async def async_move_resource_to_block_cache(self, url_or_file_path: Any) -> str | None:
        path = await super().async_move_resource_to_block_cache(url_or_file_path)
        return None if path is None else public_path(path, self.GRADIO_CACHE)


def w_from_toggle(elem_id: str) -> Radio:
    """The toggle every TopoFilter view offers: the filter's own w, or a control's for the same tokens beside it
    (``app.controls``), so a reader sees how much of w is position."""
    return Radio(list(CHOICES), value=FILTER, elem_id=elem_id,
                 label="w from: the filter (s̃), or a control calibrated on the validation works: w by position "
                       "only, or a one-bit gate (1 for a repeat, a constant otherwise)")


def fit(fig: Any, height: int | None = None) -> Any:
    """The figure sized to its panel: no fixed width (the page's plot then fills its container);
    ``height`` replaces the figure's own when given. Returns the same figure (None passes)."""
    if fig is not None:
        fig.update_layout(width=None, autosize=True, **({"height": height} if height else {}))
    return fig


def export_controls(ex: Explorer, payload: gr.State, tab: str) -> None:
    """A button that writes the tab's last figures (HTML, PNG) and numbers (JSON); endpoint ``/export_<tab>``."""
    with gr.Accordion("Export: standalone HTML, PNG, JSON", open=False):
        btn = gr.Button("Export", elem_id=f"export-{tab}")
        files = Downloads(label="files", file_count="multiple", interactive=False)
        msg = gr.Markdown()

    def run(item):
        lim = ex.limits
        return export(item, ex.export_dir, max_bytes=lim.export_max_bytes, max_age_s=lim.export_max_age_s)

    btn.click(user_facing(run, f"export_{tab}"), [payload], [files, msg], api_name=f"export_{tab}",
              concurrency_id="export", concurrency_limit=1)
