"""Every handler's errors become one line on the page (``gr.Error``), never a traceback.

A user's mistake (a ``QTGError``: bad text, a limit, a tier that does not fit,
a corrupt checkpoint) is shown as the library words it, and the server's log gets
one line for it (never a traceback). Anything else is a bug: it is logged with its
traceback and reported as an internal error; either way the server keeps serving.
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def as_page_error(e: BaseException, where: str = "request") -> gr.Error:
    """The one-line error the page shows for ``e`` (and the one line the log gets for a refusal)."""
    if isinstance(e, gr.Error):
        log.warning("refused %s: %s", where, _one_line(e.message))
        e.print_exception = False
        return e
    if isinstance(e, QTGError):
        log.warning("refused %s: %s", where, _one_line(e))
        return gr.Error(_one_line(e), print_exception=False)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        log.warning("refused %s: out of memory: %s", where, _one_line(e))
        return gr.Error(f"out of memory ({_one_line(e)}); try a smaller tier, text or limit", print_exception=False)
    log.exception("internal error in a handler")
    return gr.Error(f"internal error: {type(e).__name__}: {e} (logged on the server; it keeps running)",
                    print_exception=False)


def user_facing(fn: Callable, name: str | None = None) -> Callable:
    """Wrap a handler (plain or generator) so that any exception reaches the page as one line.

    ``name``: what the log calls a refused request (default the function's name)."""
    where = name or fn.__name__
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as e:  # GeneratorExit (a cancelled stream) is not an Exception: it passes
                raise as_page_error(e, where) from e
        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise as_page_error(e, where) from e
    return plain
