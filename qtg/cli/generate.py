"""``qtg generate``: continue a prompt with a model."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

import torch

from qtg.cli.common import add_model_args, check_tokenizer, load_model, model_source
from qtg.data.tokenizer import decode, encode, eos_id
from qtg.distributed.world import close_world, init_world, under_torchrun
from qtg.errors import ConfigError, GenerationError
from qtg.generate import check_sampling, generate, stream
from qtg.model.intervention import Intervention

HELP = """Continue a prompt with a QTG (or baseline) model and print the text.

Sampling: --temperature 0 is greedy (deterministic); otherwise tokens are drawn
from softmax(logits / T), optionally restricted to the --top-k most likely
tokens and/or the smallest set whose probability reaches --top-p. --seed makes
sampling reproducible. Generation stops at --max-new-tokens, at the end-of-text
token, or once the text contains a --stop string (escapes such as \\n and \\t
are read as the characters). Every request is checked
before any work: an empty prompt, a negative temperature, top-p outside (0, 1],
top-k < 1 or a prompt that leaves no room in the context is refused with one
line saying what fits.

Under torchrun (`torchrun --nproc_per_node N $(which qtg) generate ...`) the
model is sharded over the ranks with FSDP2, as in training: every rank runs
each forward on its share of the weights and rank 0 prints. Sampling uses one
seed on every rank (rank 0 draws it when --seed is not given)."""

EXAMPLES = """examples:
  qtg generate --prompt "ROMEO:" --max-new-tokens 80
  qtg generate --prompt "To be" --temperature 0            greedy
  qtg generate --checkpoint runs/nano --prompt "KING:" --top-p 0.9 --seed 1 --stream
  qtg generate --prompt "First Citizen:" --stop "\\n\\n" --json
  qtg generate --prompt "KING:" --temperature 0 --intervene topo=exact      the exact TopoFilter, this call only
  torchrun --nproc_per_node 2 $(which qtg) generate --checkpoint runs/nano2 --prompt "KING:" --temperature 0"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt", description=HELP, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None,
                   help="stop once the text contains this (repeatable; \\n, \\t, \\r and \\\\ are escapes)")
    p.add_argument("--intervene", metavar="SPEC", default=None,
                   help="edit this call's forward passes, e.g. topo=exact, topo=off, gamma=1, gamma_scale=0.5, "
                        "positions=none, ablate=0:1,2 (block:heads, 0-based), theta=0.2")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence per token (slow; for checks)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, tokens/s")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise GenerationError("empty prompt: give some text to continue with --prompt")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    args.stop = [unescape(s) for s in args.stop] if args.stop else None
    args.intervene = Intervention.parse(args.intervene) if args.intervene else None
    if not under_torchrun():
        return _generate(args, load_model(args), sys.stdout)
    from qtg.distributed.inference import load_sharded_model, shared_seed

    world = init_world(args.device)
    try:
        model = load_sharded_model(model_source(args), world, _precision(args.dtype))
        check_tokenizer(model)
        args.seed = shared_seed(world, args.seed)
        with open(os.devnull, "w") if not world.is_main else contextlib.nullcontext(sys.stdout) as out:
            code = _generate(args, model, out)
    except BaseException:
        close_world(world, failed=True)
        raise
    close_world(world)
    return code


def _precision(dtype: str | None) -> str:
    """--dtype as a sharded model's mixed precision: bf16 parameters for compute, or float32."""
    precisions = {None: "auto", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
    if dtype not in precisions:
        raise ConfigError(f"under torchrun --dtype must be bf16 or fp32 (the sharded weights stay float32), "
                          f"got {dtype!r}")
    return precisions[dtype]


def _generate(args: argparse.Namespace, model, out) -> int:
    """Generate and print to ``out`` (stdout; /dev/null on ranks other than 0)."""
    tok = model.tokenizer
    ids = torch.tensor([encode(tok, args.prompt)], device=next(model.parameters()).device)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  use_cache=not args.no_cache, eos_id=eos_id(tok), stop=args.stop, tokenizer=tok,
                  intervene=args.intervene)
    t0 = time.perf_counter()
    if args.stream and not args.json:
        out.write(args.prompt)
        new: list[int] = []
        shown = ""
        for step in stream(model, ids, args.max_new_tokens, **kwargs):
            new.append(int(step[0]))
            text = decode(tok, new)
            if not text.endswith("\ufffd"):  # a byte-level token may end inside a character: wait for the rest
                out.write(text[len(shown):])
                out.flush()
                shown = text
        out.write(decode(tok, new)[len(shown):] + "\n")
        return 0
    result = generate(model, ids, args.max_new_tokens, **kwargs)
    seconds = time.perf_counter() - t0
    new = result[0, ids.shape[1]:].tolist()
    text = decode(tok, result[0].tolist())
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "new_tokens": len(new),
                          "tokens_per_s": len(new) / seconds, "model": model.cfg.label}), file=out)
    else:
        print(text, file=out)
    return 0


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """The shell gives ``\\n`` as two characters: read \\n, \\t, \\r and \\\\ as what they name."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)
