"""Training tokens/s of the shipped models' configs, side by side in one process.

    python benchmarks/bench_train_throughput.py                 # the five nano configs, 1 thread, 5 rounds
    python benchmarks/bench_train_throughput.py --threads 2 --rounds 9

The run logs' tokens/s cannot compare the configs: the runs shared the machine
with other work. Here every config's model takes the same training step -
forward, loss, backward, gradient clipping and AdamW on one batch of
``--batch`` x ``--seq-len`` random token ids - in interleaved rounds (config A,
B, C, ... then again), so load on the machine falls on all alike. Each round
times ``--steps`` steps after one warm-up step; the table gives the median
tokens/s over rounds and its ratio to the first config.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import qtg
from qtg.training.optim import build_optimizer
from qtg.training.train_config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["nano", "nano-seed", "nano-notopo", "nano-baseline", "nano-baseline-alibi"]


def model_of(config: Path) -> qtg.QTGConfig:
    """The model a training config builds: its tier with its overrides."""
    cfg = load_config(config)
    return qtg.get_tier(cfg.model.tier or "nano").replace(**cfg.model.overrides)


class Trainer:
    """One config's model and optimizer, stepping on a fixed batch."""

    def __init__(self, name: str, batch: int, seq_len: int):
        train = load_config(ROOT / "configs" / f"{name}.yaml").training
        self.name, self.cfg = name, model_of(ROOT / "configs" / f"{name}.yaml")
        self.model = qtg.build(self.cfg, seed=0).train()
        self.opt = build_optimizer(self.model, train.lr, train.weight_decay, (train.beta1, train.beta2), train.eps,
                                   torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.cfg.vocab_size, (batch, seq_len + 1), generator=g)
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.tokens = batch * seq_len
        self.clip = train.grad_clip

    def step(self) -> None:
        loss = self.model(self.x, targets=self.y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Tokens per second over ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=CONFIGS, help="names of configs/*.yaml (first = reference)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped runs used 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per config per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trainers = [Trainer(name, args.batch, args.seq_len) for name in args.configs]
    for t in trainers:
        t.step()  # warm-up: allocations, first-call overheads
    rates: dict[str, list[float]] = {t.name: [] for t in trainers}
    for _ in range(args.rounds):
        for t in trainers:
            rates[t.name].append(t.timed(args.steps))
    ref = statistics.median(rates[trainers[0].name])
    print(f"training step, B={args.batch} N={args.seq_len}, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'config':<22}{'params':>11}{'tokens/s':>11}{'ratio':>8}")
    for t in trainers:
        rate = statistics.median(rates[t.name])
        params = sum(p.numel() for p in t.model.parameters())
        print(f"{t.name:<22}{params:>11,}{rate:>11,.0f}{rate / ref:>8.2f}")


if __name__ == "__main__":
    main()
