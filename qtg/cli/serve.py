"""``qtg serve``: an OpenAI-compatible HTTP API over the continuous-batching engine."""

from __future__ import annotations

import argparse
import logging
import os

import torch

from qtg.cli.common import add_model_args, load_model, model_source
from qtg.errors import ConfigError, QTGError

HELP = """Serve a model over an OpenAI-compatible HTTP API (docs/serve.md): GET /v1/models,
POST /v1/completions and POST /v1/chat/completions, streamed as server-sent events or
answered whole. Concurrent requests share one decoding loop (continuous batching): a request
joins the running batch at the next step and leaves it when done, and each gets the tokens
it would get alone. A bad parameter is answered 400 naming it, a body over --max-body 413;
GET /openapi.json documents every field of the request bodies and its limits.

It binds to 127.0.0.1 unless --host says otherwise. Needs the app extra (fastapi, uvicorn)."""

EXAMPLES = """examples:
  qtg serve                                   the shipped nano on http://127.0.0.1:8000/v1
  qtg serve --model nano-baseline --port 8001
  qtg serve --max-batch 1                     one request at a time (the benchmark's baseline)
  curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0}'"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible API (continuous batching)", description=HELP,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the --model/--tier/"
                                                "--checkpoint name)")
    p.add_argument("--max-batch", type=int, default=64, help="most requests decoding at once (default 64)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores but one, left to the HTTP server)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qtg.serve.api import Served, create_api
    except ImportError as e:
        raise QTGError(f"qtg serve needs the app extra ({e.name} is missing): pip install -e '.[app]'") from None
    from qtg.serve.engine import Engine

    for flag, value in (("--max-batch", args.max_batch), ("--max-body", args.max_body), ("--port", args.port)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    model = load_model(args)
    name = args.name or os.path.basename(str(model_source(args)).rstrip("/"))
    engine = Engine(model, max_batch=args.max_batch)
    app = create_api({name: Served(name, engine, model.tokenizer)}, max_body=args.max_body)
    logging.getLogger("qtg").info("serving %s on http://%s:%d/v1 (max batch %d)", name, args.host, args.port,
                                  args.max_batch)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
