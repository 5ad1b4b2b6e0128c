"""What 16-bit storage of the shipped weights does to the test figure, measured.

    python benchmarks/storage_precision.py                        # every shipped model, the whole test works
    python benchmarks/storage_precision.py --models nano --bytes-per-work 40000

Each model's float32 weights are rounded to bfloat16 and to float16 and back,
then scored in float32 on the test works of ``configs/nano.yaml``'s split (never
trained on, never used to choose a checkpoint), exactly as ``qtg eval`` scores
them. The table gives bits per byte for each storage and the change from
float32; the project stores 16-bit weights when the change is below
``--tolerance`` (0.002 bits/byte) for every shipped model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qtg
from qtg.data.pipeline import Document, default_corpus_path, load_documents, split_documents
from qtg.model.loading import shipped_models
from qtg.training.evaluate import evaluate
from qtg.training.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_works(bytes_per_work: int) -> list[Document]:
    """The test works of configs/nano.yaml's split, each cut to its first ``bytes_per_work`` bytes (0: whole)."""
    d = load_config(ROOT / "configs" / "nano.yaml").data
    split = split_documents(load_documents(default_corpus_path()), val_fraction=d.val_fraction,
                            test_fraction=d.test_fraction, seed=d.split_seed)
    if not bytes_per_work:
        return list(split.test)
    return [Document(w.name, w.text.encode()[:bytes_per_work].decode(errors="ignore")) for w in split.test]


def rounded(model, dtype: torch.dtype):
    """``model`` with every float32 weight rounded through ``dtype`` (computed in float32 still)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="shipped model names (default: all)")
    ap.add_argument("--bytes-per-work", type=int, default=0, help="cut each test work (0: whole works)")
    ap.add_argument("--tolerance", type=float, default=0.002, help="largest acceptable change in bits/byte")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    docs = test_works(args.bytes_per_work)
    names = args.models or shipped_models()
    print(f"test works: {', '.join(d.name for d in docs)} ({sum(d.n_bytes for d in docs):,} bytes)")
    print(f"{'model':<22}{'storage':<10}{'bits/byte':>11}{'change':>11}")
    rows, worst = [], 0.0
    for name in names:
        base = None
        for label, dtype in STORAGES.items():
            model = qtg.load(name, dtype="float32")
            bpb = evaluate(rounded(model, dtype), docs).bits_per_byte
            base = bpb if base is None else base
            change = bpb - base
            if label != "float32":
                worst = max(worst, abs(change)) if label == "bfloat16" else worst
            rows.append({"model": name, "storage": label, "bits_per_byte": bpb, "change": change})
            print(f"{name:<22}{label:<10}{bpb:>11.5f}{change:>+11.5f}")
    verdict = "store bfloat16" if worst < args.tolerance else "keep float32"
    print(f"largest |change| with bfloat16 storage: {worst:.5f} bits/byte (tolerance {args.tolerance}): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
