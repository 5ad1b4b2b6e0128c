"""``qtg app``: serve the QTG Explorer web app (the ``app`` package, imported only here)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path

from qtg.errors import QTGError

HELP = """Serve the QTG Explorer web app: generate with streaming and TopoFilter colours,
exact topology (gudhi + ripser) beside the TopoFilter's approximation, Fisher-Rao
attention maps, side-by-side comparisons, and the tier table.

Under torchrun (`torchrun --nproc_per_node N -m app --model M`) the model is
sharded across the ranks with FSDP2, rank 0 serves the page and the other ranks
join each forward; that one model is then the only one served.

It binds to 127.0.0.1 unless --host says otherwise, loads the shipped nano at start,
fetches nothing from the network, accepts no uploads, serves files (as downloads) only
from its own private export folder, made fresh at each launch, and loads checkpoints
only from the shipped assets and the --checkpoint-dir folders you give. It answers only
requests addressed to this machine by a name it was bound for (see --allow-host). The log
gets one line per refused request. SIGTERM and Ctrl-C remove its private folders."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="serve the web app (Gradio) on the shipped nano", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  qtg app\n  qtg app --port 8080 --device cuda\n"
                              "  qtg app --checkpoint-dir runs/nano/step_003000 --model step_003000\n"
                              "  python -m app --host 0.0.0.0   # reachable from other machines\n"
                              "  torchrun --nproc_per_node 2 -m app --model nano   # sharded across 2 ranks")
    p.add_argument("--model", "--tier", dest="model", default="nano",
                   help="model loaded at start: a shipped model, a tier (random weights), or the name of a "
                        "--checkpoint-dir (default nano)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a further name clients may reach the app by (repeatable; a reverse proxy's, say). "
                        "Requests are answered only for 127.0.0.1, localhost, [::1], the --host, these names, "
                        "and, with --host 0.0.0.0, any IP address and this machine's name: any other Host "
                        "header (DNS rebinding) is refused")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--checkpoint-dir", action="append", default=[], type=Path, metavar="DIR",
                   help="a checkpoint directory the app may load (repeatable)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="a folder (not a link) in which each launch makes its private export folder "
                        "(mode 0700, a fresh name), the only folder files are served from (default: the "
                        "system's temporary folder)")
    p.add_argument("--concurrency", type=int, default=2, help="heavy requests run at once (default 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores but one, left to the web server; "
                        "benchmarks/bench_app.py measures the difference)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from app.config import AppConfig
        from app.server import launch
    except ImportError as e:
        raise QTGError(f"the app needs its extra ({e.name} is missing): pip install -e '.[app]' "
                       "(make app does it)") from None
    for d in args.checkpoint_dir:
        if not any((d / name).exists() for name in ("model.safetensors", "latest", "dcp")):
            raise QTGError(f"--checkpoint-dir {d}: not a checkpoint (no model.safetensors), a training run "
                           "(no latest) or a sharded checkpoint (no dcp/)")
    if args.concurrency < 1:
        raise QTGError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.threads is not None and args.threads < 1:
        raise QTGError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = AppConfig(model=args.model, device=args.device, checkpoint_dirs=tuple(args.checkpoint_dir),
                    concurrency=args.concurrency,
                    **({"export_dir": args.export_dir} if args.export_dir else {}))
    from qtg.distributed.world import under_torchrun

    if under_torchrun():
        return _run_sharded(cfg, args)
    print(f"QTG Explorer: loading {args.model} and starting on http://{args.host}:{args.port} ...", flush=True)
    launch(cfg, host=args.host, port=args.port, allow_hosts=args.allow_host)
    return 0


def _run_sharded(cfg, args: argparse.Namespace) -> int:
    """Under torchrun: the model sharded across the ranks; rank 0 serves the app, the others follow."""
    from app.server import launch
    from qtg.distributed.inference import load_sharded_model
    from qtg.distributed.lockstep import Lockstep, follow
    from qtg.distributed.world import close_world, init_world

    source = args.checkpoint_dir[0] if args.checkpoint_dir else args.model
    cfg = dataclasses.replace(cfg, model=Path(source).name)
    world = init_world(args.device)
    try:
        model = load_sharded_model(source, world)
        if not world.is_main:
            follow(model, world)
        else:
            handle = Lockstep(model, world)
            print(f"QTG Explorer: {cfg.model} sharded over {world.size} ranks, serving on "
                  f"http://{args.host}:{args.port} ...", flush=True)
            try:
                launch(cfg, host=args.host, port=args.port, model=handle, allow_hosts=args.allow_host)
            finally:
                handle.close()
    except BaseException:
        close_world(world, failed=True)
        raise
    close_world(world)
    return 0
