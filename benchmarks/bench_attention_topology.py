"""Attention topology cost: the attention graph by engine, QTG's head geometry, and the live prompt distance.

    python benchmarks/bench_attention_topology.py                       # nano, 256 tokens, as in the closing note
    python benchmarks/bench_attention_topology.py --rounds 5 --forest-sizes 256 1024 2048

Three tables, all in this process, rounds interleaved (every case once per
round, the median reported) so machine noise hits every case alike; read the
ratio columns, not the absolute times:

1. ``attention_graph`` (H0+H1 of d = 1 - max(a_ij, a_ji), with the Betti and
   bar features) of one head's map at ``--n`` tokens, and of every head of the
   model, per backend: gudhi, ripser, giotto-ph and auto (H0 by the spanning
   tree, H1 by giotto-ph). Every backend must give the same diagrams; the
   script checks it and says so. Ratios are to auto.
2. ``head_geometry``: every head's keys under the Fisher-Rao metric, auto.
3. ``prompt_distance`` while tokens arrive: the incremental ``PromptForest.add``
   (O(N) per token) against a rebuild per token (``prompt_distance`` of the
   map so far, Prim's algorithm, O(N^2)), summed over every head of the model
   at ``--n`` tokens, and for one random causal map per ``--forest-sizes``.
   "per token" is the mean over the whole continuation; "last token" the cost
   of the final step, at the full length. Both values must agree (checked).

Maps: the shipped model (``--model``, default nano) on the first ``--n`` tokens
of the test works (the split of configs/nano.yaml: val_fraction 0.1,
test_fraction 0.1, seed 0), the prompt being the first ``--prompt`` tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import qtg
from qtg.data.pipeline import default_corpus_path, load_documents, split_documents
from qtg.data.tokenizer import encode
from qtg.topology.attention_graph import attention_graph
from qtg.topology.head_geometry import head_geometry
from qtg.topology.prompt_forest import PromptForest, prompt_distance

BACKENDS = ("gudhi", "ripser", "giotto-ph", "auto")


def held_out_ids(model, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the held-out test works, ``[1, n]``."""
    test = split_documents(load_documents(default_corpus_path()), val_fraction=0.1, test_fraction=0.1, seed=0).test
    ids = encode(model.tokenizer, "\n".join(d.text for d in test))[:n]
    return torch.tensor(ids).view(1, -1)


def model_maps(model, ids: torch.Tensor) -> np.ndarray:
    """Every block's and head's attention map, ``[L * H, N, N]`` float64."""
    with torch.no_grad():
        out = model(ids, return_internals=True)
    return torch.cat([a[0] for a in out.attention]).double().numpy()


def causal_map(n: int, seed: int = 0, sharpness: float = 3.0) -> np.ndarray:
    """A random causal attention map (softmax of Gaussian scores under the causal mask)."""
    scores = sharpness * np.random.default_rng(seed).standard_normal((n, n))
    scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


# --- 1 and 2: diagrams ---------------------------------------------------------------------------


def graph_rows(maps: np.ndarray, head: int, rounds: int, model_name: str) -> list[dict]:
    """attention_graph per backend: one head, then every head; medians over interleaved rounds."""
    cases = {"one head": [head], f"all {len(maps)} heads": list(range(len(maps)))}
    for b in BACKENDS:  # imports and first-call costs out of the timings
        attention_graph(maps[head], backend=b)
    rows = []
    for label, heads in cases.items():
        times: dict[str, list[float]] = {b: [] for b in BACKENDS}
        dgms: dict[str, list] = {}
        for _ in range(rounds):
            for b in BACKENDS:
                seconds, graphs = timed(lambda b=b, hs=heads: [attention_graph(maps[h], backend=b) for h in hs])
                times[b].append(seconds)
                dgms[b] = [g.diagrams.dgms for g in graphs]
        agree = all(np.array_equal(x, y) for b in BACKENDS for per_head, ref in zip(dgms[b], dgms["auto"])
                    for x, y in zip(per_head, ref))
        h1 = sum(len(per_head[1]) for per_head in dgms["auto"])
        rows.append({"case": f"{model_name} attention graph, {label}", "n": maps.shape[-1], "heads": len(heads),
                     "h1_bars": h1, "agree": agree, "seconds": {b: statistics.median(t) for b, t in times.items()}})
    return rows


def geometry_row(model, ids: torch.Tensor, rounds: int) -> dict:
    """head_geometry (keys, Fisher-Rao) of every head of every block, auto."""
    times, h1 = [], 0
    for _ in range(rounds):
        seconds, geos = timed(lambda: [head_geometry(model, ids, b, "keys") for b in range(model.cfg.n_layers)])
        times.append(seconds)
        h1 = sum(len(d.dgms[1]) for g in geos for d in g.diagrams)
    return {"case": f"{model.cfg.name} head geometry (keys), all heads", "n": ids.shape[1],
            "heads": model.cfg.n_layers * model.cfg.n_heads, "h1_bars": h1, "seconds": statistics.median(times)}


def print_graph_table(rows: list[dict], geo: dict) -> None:
    others = [b for b in BACKENDS if b != "auto"]
    print(f"\n| case | N | heads | H1 bars | {' | '.join(f'{b} s' for b in BACKENDS)} | "
          + " | ".join(f"{b}/auto" for b in others) + " | engines agree |")
    print("|" + "---|" * (5 + len(BACKENDS) + len(others)))
    for r in rows:
        s = r["seconds"]
        print(f"| {r['case']} | {r['n']} | {r['heads']} | {r['h1_bars']} | "
              + " | ".join(f"{s[b]:.3f}" for b in BACKENDS) + " | "
              + " | ".join(f"{s[b] / s['auto']:.2f}x" for b in others) + f" | {'yes' if r['agree'] else 'NO'} |")
    print(f"| {geo['case']} | {geo['n']} | {geo['heads']} | {geo['h1_bars']} | — | — | — | {geo['seconds']:.3f} "
          "| — | — | — | — |")


# --- 3: the live prompt distance ----------------------------------------------------------------


def live(maps: np.ndarray, prompt: int) -> tuple[float, float, np.ndarray]:
    """Every head's forest, one token at a time: (seconds in all, seconds of the last token, values [H, T])."""
    forests = [PromptForest(prompt) for _ in maps]
    n = maps.shape[-1]
    values = np.empty((len(maps), n - prompt))
    total = 0.0
    for i in range(prompt, n):
        if i == n - 1:
            before = copy.deepcopy(forests)  # the last step, timed alone below
        seconds, _ = timed(lambda i=i: [f.add(a[i, :i + 1]) for f, a in zip(forests, maps)])
        total += seconds
        values[:, i - prompt] = [f.total for f in forests]
    last, _ = timed(lambda: [f.add(a[n - 1, :n]) for f, a in zip(before, maps)])
    return total, last, values


def rebuilt(maps: np.ndarray, prompt: int) -> tuple[float, float, np.ndarray]:
    """The same values by a rebuild per token: (seconds in all, seconds of the last token, values [H, T])."""
    n = maps.shape[-1]
    values = np.empty((len(maps), n - prompt))
    total = 0.0
    for i in range(prompt, n):
        seconds, vals = timed(lambda i=i: [prompt_distance(a[:i + 1, :i + 1], prompt) for a in maps])
        total += seconds
        values[:, i - prompt] = vals
    last, _ = timed(lambda: [prompt_distance(a, prompt) for a in maps])
    return total, last, values


def forest_row(label: str, maps: np.ndarray, prompt: int, rounds: int) -> dict:
    per: dict[str, list[tuple[float, float]]] = {"incremental": [], "rebuild": []}
    for _ in range(rounds):
        t_inc, last_inc, v_inc = live(maps, prompt)
        t_reb, last_reb, v_reb = rebuilt(maps, prompt)
        per["incremental"].append((t_inc, last_inc))
        per["rebuild"].append((t_reb, last_reb))
    tokens = maps.shape[-1] - prompt
    med = {k: (statistics.median(t for t, _ in v) / tokens, statistics.median(x for _, x in v)) for k, v in per.items()}
    return {"case": label, "n": maps.shape[-1], "prompt": prompt, "heads": len(maps),
            "max_abs_diff": float(np.abs(v_inc - v_reb).max()),
            "per_token_ms": {k: v[0] * 1e3 for k, v in med.items()},
            "last_token_ms": {k: v[1] * 1e3 for k, v in med.items()}}


def print_forest_table(rows: list[dict]) -> None:
    print("\n| prompt_distance | N | prompt | heads | incremental ms/token | rebuild ms/token | rebuild/incremental "
          "| last token: incremental ms | rebuild ms | rebuild/incremental | max abs diff |")
    print("|" + "---|" * 11)
    for r in rows:
        p, last = r["per_token_ms"], r["last_token_ms"]
        print(f"| {r['case']} | {r['n']} | {r['prompt']} | {r['heads']} | {p['incremental']:.3f} | "
              f"{p['rebuild']:.3f} | {p['rebuild'] / p['incremental']:.1f}x | {last['incremental']:.3f} | "
              f"{last['rebuild']:.3f} | {last['rebuild'] / last['incremental']:.1f}x | {r['max_abs_diff']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano", help="qtg.load name or checkpoint (default nano)")
    p.add_argument("--n", type=int, default=256, help="tokens (default 256)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens for prompt_distance (default 32)")
    p.add_argument("--head", type=int, default=5, help="the 'one head' case: index into blocks x heads (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median reported (default 3)")
    p.add_argument("--forest-sizes", type=int, nargs="*", default=[1024],
                   help="random causal maps for the live prompt distance (default 1024)")
    p.add_argument("--out", default="benchmarks/results/attention_topology_cpu.json")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # the engines pick their own threads; torch only makes the maps
    model = qtg.load(args.model).eval()
    ids = held_out_ids(model, args.n)
    maps = model_maps(model, ids)
    name = model.cfg.name + (" (random weights)" if model.random_weights else "")
    load = os.getloadavg()[0]
    print(f"{name}: {ids.shape[1]} tokens, {len(maps)} heads; {os.cpu_count()} cores, load average "
          f"{load:.1f} at start; {args.rounds} rounds, medians")

    graphs = graph_rows(maps, args.head, args.rounds, name)
    geo = geometry_row(model, ids, args.rounds)
    print_graph_table(graphs, geo)
    forests = [forest_row(f"{name}, every head", maps, args.prompt, args.rounds)]
    for n in args.forest_sizes:
        rounds = max(1, args.rounds - 2)  # a rebuild per token at 1024 takes seconds
        forests.append(forest_row("random causal map, one head", causal_map(n)[None], args.prompt, rounds))
    print_forest_table(forests)
    print("\nRatios above 1: the second is slower. All times on this machine, in this run.")

    result = {"model": name, "n": args.n, "cpu_count": os.cpu_count(), "load_average_start": load,
              "load_average_end": os.getloadavg()[0],
              "rounds": args.rounds, "attention_graph": graphs, "head_geometry": geo, "prompt_distance": forests}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
