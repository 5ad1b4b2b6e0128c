"""``qtg info``: every tier, counted parameters beside the seed's claims, memory, fit."""

from __future__ import annotations

import argparse
import json

from qtg.cli.table import format_table
from qtg.distributed.plan import plan
from qtg.errors import ConfigError
from qtg.model.builder import resolve_device
from qtg.model.memory import human_bytes, human_count, tier_summary
from qtg.model.tiers import TIERS, get_tier

HELP = """Print every tier (or one) with its shape, its parameter count - counted by
building the model on PyTorch's meta device, so nothing is allocated - beside
the parameter count the seed documents claim, memory estimates for inference
and training in bf16 and fp32 (batch 1, full context), and whether inference
and training fit this machine's device.

Memory columns: weights + gradients + optimiser (AdamW, fp32 moments) +
activations + decoding cache; see qtg.model.memory.memory_estimate for the formulas.

--plan prints, instead, the memory one GPU holds when the tier is sharded
with FSDP2 over --gpus GPUs (bf16 parameters, float32 master weights,
gradients and AdamW moments, one FSDP unit per block): weights, gathered
units, gradients, optimiser state and activations, without and with
activation checkpointing, for training and for inference, and the smallest
number of GPUs of --gpu-mem GiB that fits. When no number fits (5.5q), it
prints the arithmetic. See qtg.distributed.plan for the assumptions."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="tier table: counted vs claimed parameters, memory, fits here?",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  qtg info\n  qtg info --tier 5.5q\n  qtg info --json | jq '.[].params'\n"
                              "  qtg info --tier 30b --plan --gpus 8\n  qtg info --plan --gpus 8 --gpu-mem 141")
    p.add_argument("--tier", metavar="T", help=f"one tier only ({', '.join(TIERS)})")
    p.add_argument("--device", default="auto", help="device to check the fit against: auto, cpu, cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    plan = p.add_argument_group("FSDP2 plan (--plan)")
    plan.add_argument("--plan", action="store_true", help="memory per GPU under FSDP2 and the fewest GPUs that fit")
    plan.add_argument("--gpus", type=int, default=8, metavar="N", help="GPUs to shard over (default 8)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory per GPU in GiB (default 80)")
    plan.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per sequence (default: context)")
    plan.add_argument("--batch", type=int, default=1, metavar="B", help="sequences per GPU and micro-batch (default 1)")
    p.set_defaults(func=run)


MEMORY_COLUMNS = ("inference_bf16", "inference_fp32", "train_bf16", "train_fp32")


def _claimed(s: dict) -> str:
    return human_count(s["claimed_params"]) if s["claimed_params"] else "-"


def _ratio(s: dict) -> str:
    return f"{s['params'] / s['claimed_params']:.3g}x" if s["claimed_params"] else "-"


def run(args: argparse.Namespace) -> int:
    names = [get_tier(args.tier).name] if args.tier else list(TIERS)
    if args.plan:
        return run_plan(args, names)
    device = resolve_device(args.device)
    summaries = [tier_summary(name, device) for name in names]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    headers = ["tier", "vocab", "d", "layers", "heads", "ctx", "ffn", "params", "claimed", "counted/claimed",
               "infer bf16", "infer fp32", "train bf16", "train fp32", f"fits {device.type} (infer/train)"]
    yes = {True: "yes", False: "no"}
    rows = [[s["tier"], s["vocab_size"], s["d_model"], s["n_layers"], s["n_heads"], s["max_seq_len"],
             s["ffn_hidden"] or "none", human_count(s["params"]), _claimed(s), _ratio(s),
             *(human_bytes(s["memory_bytes"][k]) for k in MEMORY_COLUMNS),
             f"{yes[s['fits_inference']]}/{yes[s['fits_train']]}"] for s in summaries]
    print(format_table(headers, rows, right=set(range(1, 14))))
    have = summaries[0]["available_bytes"]
    print(f"\n{device.type} memory available now: {human_bytes(have)} (fit checked in {summaries[0]['device_dtype']}, "
          "batch 1, full context). Params are counted on the meta device; 'claimed' is the seed's figure.")
    notes = [f"  {s['tier']}: {s['claims_note']}" for s in summaries if s["claims_note"]]
    if notes:
        print("Seed claims (unmeasured):\n" + "\n".join(notes))
    return 0


# --- --plan --------------------------------------------------------------------------------------------


def _gpus(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


def run_plan(args: argparse.Namespace, names: list[str]) -> int:
    if args.gpus < 1 or args.gpu_mem <= 0 or args.batch < 1:
        raise ConfigError("--gpus and --batch must be >= 1 and --gpu-mem > 0")
    plans = [plan(name, args.gpus, args.gpu_mem, args.batch, args.seq_len) for name in names]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return 0
    if len(plans) == 1:
        _print_plan(plans[0])
        return 0
    headers = ["tier", "params", f"per GPU on {args.gpus}", "train, no AC", "train, AC", "inference",
               "fewest GPUs: no AC / AC / inference"]
    rows = [[p.tier, human_count(p.params), human_count(p.shard_params), human_bytes(p.train["no_ac"].total),
             human_bytes(p.train["ac"].total), human_bytes(p.inference.total),
             " / ".join(_gpus(p.min_gpus[m]) for m in ("no_ac", "ac", "inference"))] for p in plans]
    print(f"FSDP2 on {args.gpus} GPUs of {args.gpu_mem:g} GiB, {args.batch} sequence(s) per GPU at full context "
          "(qtg info --tier T --plan for the breakdown):")
    print(format_table(headers, rows, right=set(range(1, 6))))
    return 0


def _print_plan(p) -> None:
    print(f"{p.tier} sharded with FSDP2 over {p.gpus} GPUs of {p.gpu_mem_gib:g} GiB: {p.params:,} parameters "
          f"(meta-device count), {p.shard_params:,} per GPU; units: root {p.root_params:,}, "
          f"{p.n_blocks:,} blocks of {p.block_params:,}; {p.batch} x {p.seq_len:,} tokens per GPU")
    rows = [[name, *(human_bytes(getattr(m, key)) for m in (p.train["no_ac"], p.train["ac"], p.inference))]
            for name, key in (("weights (fp32 shards; bf16 for inference)", "weights"),
                              ("gathered units (bf16: root + 2 blocks)", "gathered"),
                              ("gradients (fp32 shards + unsharded in flight)", "gradients"),
                              ("optimizer (AdamW, 2 fp32 moments)", "optimizer"),
                              ("activations (+ decoding cache)", "activations"),
                              ("total per GPU", "total"))]
    totals = [p.train["no_ac"].total, p.train["ac"].total, p.inference.total]
    rows.append([f"fits {p.gpu_mem_gib:g} GiB", *(f"yes, {human_bytes(p.capacity - t)} spare" if t <= p.capacity
                                                 else f"no, {human_bytes(t - p.capacity)} over" for t in totals)])
    rows.append(["fewest GPUs that fit", *(_gpus(p.min_gpus[m]) for m in ("no_ac", "ac", "inference"))])
    print(format_table(["per GPU", "train, no AC", "train, AC", "inference"], rows, right={1, 2, 3}))
    if p.impossible:
        print("\nWhere no number of GPUs fits, and why:")
        for line in p.impossible:
            print(f"  - {line}")
