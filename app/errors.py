"""Every handler's errors become one line on the page (``gr.Error``), never a traceback.

A user's mistake (a ``QTGError``: bad text, a limit, a tier that does not fit,
a corrupt checkpoint) is shown as the library words it. Anything else is a bug:
it is logged with its traceback on the server and reported as an internal error;
either way the server keeps serving.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr
import torch

from qtg.errors import QTGError

log = logging.getLogger(__name__)


def as_page_error(e: BaseException) -> gr.Error:
    if isinstance(e, gr.Error):
        return e
    if isinstance(e, QTGError):
        return gr.Error(str(e), print_exception=False)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return gr.Error(f"out of memory ({e}); try a smaller tier, text or limit", print_exception=False)
    log.exception("internal error in a handler")
    return gr.Error(f"internal error: {type(e).__name__}: {e} (logged on the server; it keeps running)",
                    print_exception=False)


def user_facing(fn: Callable) -> Callable:
    """Wrap a handler (plain or generator) so that any exception reaches the page as one line."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # GeneratorExit (a cancelled stream) is not an Exception: it passes
                raise as_page_error(e) from e
        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise as_page_error(e) from e
    return plain
