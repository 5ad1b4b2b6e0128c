"""``qtg topo``: exact persistence of a text's token states beside the TopoFilter's approximation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from qtg.cli.common import add_model_args, load_model
from qtg.errors import ConfigError, DataError
from qtg.model.intervention import Intervention
from qtg.model.protocol import LanguageModel
from qtg.topology import exact_mode_loss, layer_sweep
from qtg.topology.exact import BACKENDS

log = logging.getLogger("qtg")

HELP = """Exact Vietoris-Rips persistence (H0, H1) of the token states of a text at one
layer, computed by gudhi or ripser.py, beside the TopoFilter's approximate view:
per token the soft-min score s~, the exact causal score s and the weight w, the
bottleneck and 1-Wasserstein distances between exact H0 and the implied diagram
{(0, s~_i)}, rank agreement, and what exact mode (s in place of s~) does to the
loss. Layer 0 is QEmbed, 1 the TopoFilter (its own scores, on the cloud it
measured), then one per block; --layer all sweeps them. The work is bounded:
duplicates are removed (exact), the cloud is cut at its enclosing radius (exact),
and --max-points, --max-edge and --time-budget bound the rest; the report says
what was bounded."""

EXAMPLES = """examples:
  qtg topo --text "To be, or not to be, that is the question"
  qtg topo --file speech.txt --layer 3 --backend gudhi --json
  qtg topo --checkpoint runs/nano --file speech.txt --layer all --html topo.html
  qtg topo --text "To be, or not to be" --layer all --intervene gamma_scale=2"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topo", help="exact persistence of token states vs the TopoFilter", description=HELP,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to analyse")
    src.add_argument("--file", metavar="F", help="a UTF-8 text file to analyse")
    p.add_argument("--layer", default="1", help="0 QEmbed, 1 TopoFilter (default), 2.. blocks, or 'all'")
    p.add_argument("--maxdim", type=int, default=1, help="highest homology dimension (default 1)")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="auto (default): H0 by the spanning tree, H1 by the engine measured fastest")
    p.add_argument("--max-points", type=int, default=None, metavar="N",
                   help="distinct points kept (default 1024; 4096 with --maxdim 0)")
    p.add_argument("--max-edge", type=float, default=None, metavar="E",
                   help="cut the filtration at this edge length (default: enclosing radius, exact)")
    p.add_argument("--time-budget", type=float, default=60.0, metavar="S", help="seconds per diagram (default 60)")
    p.add_argument("--intervene", metavar="SPEC", default=None,
                   help="run the model under an intervention, e.g. positions=none or ablate=0:1 (see qtg eval --help)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--html", metavar="OUT", help="write the figures to this standalone HTML file")
    p.set_defaults(func=run)


def _read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        text = args.text
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {args.file}: {e}") from None
    if not text.strip():
        raise DataError("the text is empty")
    return text


def _token_ids(model: LanguageModel, text: str) -> tuple[torch.Tensor, list[str], int]:
    """ids [1, N] (at most the model's context), their strings, and the full token count."""
    from qtg.data.tokenizer import decode, encode

    ids = encode(model.tokenizer, text)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); persistence needs at least 2")
    full = len(ids)
    ids = ids[:model.cfg.max_seq_len]
    device = next(model.parameters()).device
    return torch.tensor([ids], device=device), [decode(model.tokenizer, [i]) for i in ids], full


def _layers(arg: str, names: list[str]) -> list[int]:
    n_states = len(names)
    if arg == "all":
        return list(range(n_states))
    try:
        k = int(arg)
    except ValueError:
        raise ConfigError(f"--layer must be an integer or 'all', got {arg!r}") from None
    if not 0 <= k < n_states:
        raise ConfigError(f"--layer {k} does not exist: this model has layers 0..{n_states - 1} "
                          f"({', '.join(f'{i} {name}' for i, name in enumerate(names))})")
    return [k]


def run(args: argparse.Namespace) -> int:
    intervene = Intervention.parse(args.intervene) if args.intervene else None
    model = load_model(args)
    ids, tokens, full = _token_ids(model, _read_text(args))
    if full > ids.shape[1]:
        log.warning("the text has %d tokens; the first %d (the model's context) are analysed", full, ids.shape[1])
    layers = _layers(args.layer, model.state_names)
    sweep = layer_sweep(model, ids, layers=layers, tokens=tokens, intervene=intervene, maxdim=args.maxdim,
                        backend=args.backend, max_points=args.max_points, max_edge=args.max_edge,
                        time_budget=args.time_budget)
    mode = exact_mode_loss(model, ids, intervene=intervene)
    if args.html:
        _write_html(args.html, sweep)
    if args.json:
        print(json.dumps({"model": model.cfg.name, "tokens": ids.shape[1], "text_tokens": full,
                          "layers": [r.to_dict() for r in sweep], "exact_mode": mode.to_dict(),
                          "html": args.html}))
    else:
        _print_report(model.cfg.name, ids.shape[1], full, sweep, mode)
        if args.html:
            print(f"figures: {args.html}")
    return 0


def _write_html(path: str, sweep: list) -> None:
    from qtg import plots

    figures = []
    for r in sweep:
        figures += [plots.exact_vs_approx(r.exact, r.view, r.comparison,
                                          title=f"layer {r.layer} ({r.name}): exact H0 against the TopoFilter"),
                    plots.barcode(r.exact, title=f"layer {r.layer} ({r.name}): barcode")]
    figures.append(plots.weights_over_text(sweep[0].view))
    if len(sweep) > 1:
        figures.append(plots.layer_summary(sweep))
    plots.save_html(figures, path)


def _print_report(name: str, n: int, full: int, sweep: list, mode: Any) -> None:
    out = sys.stdout
    out.write(f"{name}: {n} tokens" + (f" (of {full}; the model's context)" if full > n else "") + "\n")
    for r in sweep:
        e, c, v = r.exact, r.comparison, r.view
        bars = ", ".join(f"H{k} {len(d)} bars" for k, d in enumerate(e.dgms))
        cloud = "" if v.cloud_layer == r.layer else f" (cloud: its input, layer {v.cloud_layer})"
        out.write(f"\nlayer {r.layer} {r.name}{cloud}\n")
        out.write(f"  exact ({e.backend}, {e.seconds:.2f} s): {bars}, diameter {e.diameter:.4g}\n")
        out.write(f"  bounds: {e.bounds.describe()}\n")
        rho = "n/a" if c.spearman_filter_vs_elder_distinct is None else f"{c.spearman_filter_vs_elder_distinct:.3f}"
        tied = "n/a" if c.spearman_filter_vs_elder is None else f"{c.spearman_filter_vs_elder:.3f}"
        out.write(f"  TopoFilter vs exact H0: bottleneck {c.bottleneck_h0:.4g}, W1 {c.wasserstein1_h0:.4g}, "
                  f"|s~ - s| mean {c.mean_abs_error:.4g} max {c.max_abs_error:.4g}, Spearman(s~, elder) {rho} on the "
                  f"{c.distinct_tokens} distinct tokens ({tied} with the tied repeats)\n")
        both, down_only = len(c.down_weighted_and_persistent), len(c.down_weighted_not_persistent)
        out.write(f"  theta {c.theta:g}: down-weighted {both + down_only}, of which exact H0 calls persistent {both}; "
                  f"persistent but kept {len(c.persistent_not_down_weighted)}; "
                  f"agreement with exact mode {c.filter_agreement_exact_mode:.1%}\n")
        if c.h1_bars is not None:
            out.write(f"  H1 the filter cannot see: {c.h1_bars} bars, total persistence {c.h1_total_persistence:.4g}\n")
    out.write(f"\nexact mode (s in place of s~): cross-entropy {mode.ce_approx:.4f} -> {mode.ce_exact:.4f} nats/token "
              f"(perplexity {mode.perplexity_approx:.2f} -> {mode.perplexity_exact:.2f}), mean w "
              f"{mode.mean_weight_approx:.3f} -> {mode.mean_weight_exact:.3f}\n")
