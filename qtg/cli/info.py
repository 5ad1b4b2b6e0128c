"""``qtg info``: every tier, counted parameters beside the seed's claims, memory, fit."""

from __future__ import annotations

import argparse
import json

from qtg.builder import resolve_device
from qtg.cli.table import format_table
from qtg.memory import human_bytes, human_count, tier_summary
from qtg.tiers import TIERS, get_tier

HELP = """Print every tier (or one) with its shape, its parameter count - counted by
building the model on PyTorch's meta device, so nothing is allocated - beside
the parameter count the seed documents claim, memory estimates for inference
and training in bf16 and fp32 (batch 1, full context), and whether inference
and training fit this machine's device.

Memory columns: weights + gradients + optimiser (AdamW, fp32 moments) +
activations + decoding cache; see qtg.memory.memory_estimate for the formulas."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="tier table: counted vs claimed parameters, memory, fits here?",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  qtg info\n  qtg info --tier 5.5q\n  qtg info --json | jq '.[].params'")
    p.add_argument("--tier", metavar="T", help=f"one tier only ({', '.join(TIERS)})")
    p.add_argument("--device", default="auto", help="device to check the fit against: auto, cpu, cuda (default auto)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=run)


MEMORY_COLUMNS = ("inference_bf16", "inference_fp32", "train_bf16", "train_fp32")


def _claimed(s: dict) -> str:
    return human_count(s["claimed_params"]) if s["claimed_params"] else "-"


def _ratio(s: dict) -> str:
    return f"{s['params'] / s['claimed_params']:.3g}x" if s["claimed_params"] else "-"


def run(args: argparse.Namespace) -> int:
    names = [get_tier(args.tier).name] if args.tier else list(TIERS)
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
