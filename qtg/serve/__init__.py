"""Serving many clients at once: a continuous-batching engine (:mod:`qtg.serve.engine`) and an
OpenAI-compatible HTTP API over it (:mod:`qtg.serve.api`, needs the ``app`` extra: fastapi, uvicorn),
whose request bodies are declared by :mod:`qtg.serve.schemas` and checked against the served model by
:mod:`qtg.serve.params`."""

from qtg.serve.engine import Engine, Event, Request, TopoScore

__all__ = ["Engine", "Event", "Request", "TopoScore"]
