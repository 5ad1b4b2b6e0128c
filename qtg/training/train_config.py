"""Training configuration: one dataclass per YAML section, loaded with clear errors.

    cfg = load_config("configs/nano.yaml")   # model / data / training / checkpoint / logging
    cfg.training.steps = 200

An unknown key is a ConfigError naming it and the valid keys; a value of the
wrong type names its field; numbers written as text ("1e-3", which YAML reads
as a string) are converted. The command line only overrides fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qtg.errors import ConfigError

SNAPSHOT_DTYPES = ("bfloat16", "float16", "float32")  # checkpoint.snapshot_dtype (qtg.training.snapshots)


@dataclass
class ModelSection:
    tier: str | None = None  # None: the checkpoint's (resume, init), else "nano"
    overrides: dict = field(default_factory=dict)  # QTGConfig fields, e.g. {attn_impl: reference}


@dataclass
class DataSection:
    path: str | None = None  # file or folder; None: the bundled corpus
    tokenizer: str | None = None  # tokenizer JSON; None: trained on the training split
    val_fraction: float = 0.1  # of the UTF-8 bytes, whole works: checkpoint selection
    test_fraction: float = 0.0  # of the UTF-8 bytes, whole works: never trained on nor selected on
    split_seed: int = 0
    seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int = 16  # windows per batch; a step's global batch is batch_size x grad_accum, at any world size
    micro_batch_size: int | None = None  # windows per forward on one rank; None: as large as divides evenly
    cache_dir: str | None = None


@dataclass
class TrainingSection:
    steps: int = 1000  # the step this run stops at (a total)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule_steps: int = 2000  # cosine reaches min_lr here; independent of `steps`
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    max_bad_steps: int = 5
    resume: bool = False
    init: str | None = None  # initial weights: checkpoint dir, run dir or tier with shipped weights
    # under torchrun (FSDP2): bf16 parameters with float32 reduction ("auto": on CUDA only), and
    # recomputing each block in backward instead of keeping its activations
    mixed_precision: str = "auto"  # auto | bf16 | fp32
    activation_checkpointing: bool = False


@dataclass
class CheckpointSection:
    dir: str = "runs/train"
    every: int = 250
    keep_last: int = 3
    # light weights-only snapshots (qtg.training.snapshots) every K steps, for watching a run over time; None: none
    snapshot_every: int | None = None
    snapshot_dtype: str = "bfloat16"  # bfloat16 | float16 | float32


@dataclass
class LoggingSection:
    eval_every: int = 250
    eval_batches: int | None = 20  # None: the whole validation split
    sample_tokens: int = 48  # 0: no sample
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "config") -> TrainConfig:
        """Build from nested dicts; a ConfigError names any unknown section or key."""
        data = {} if data is None else data
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls)}
        _check_keys(data, sections, source, "section", "")
        return cls(**{name: _section(sections[name](), value, source, name) for name, value in data.items()})

    def validate(self) -> None:
        t, d, c, lg = self.training, self.data, self.checkpoint, self.logging
        checks = [(t.steps >= 1, "training.steps must be >= 1"), (t.lr > 0, "training.lr must be > 0"),
                  (0 <= t.min_lr <= t.lr, "training.min_lr must be in [0, lr]"),
                  (0 <= t.warmup_steps <= t.schedule_steps, "need 0 <= warmup_steps <= schedule_steps"),
                  (t.schedule_steps >= 1, "training.schedule_steps must be >= 1"),
                  (t.grad_accum >= 1, "training.grad_accum must be >= 1"),
                  (t.grad_clip > 0, "training.grad_clip must be > 0"),
                  (t.max_bad_steps >= 1, "training.max_bad_steps must be >= 1"),
                  (t.mixed_precision in ("auto", "bf16", "fp32"), "training.mixed_precision must be auto, bf16 "
                                                                   "or fp32"),
                  (d.micro_batch_size is None or d.micro_batch_size >= 1, "data.micro_batch_size must be >= 1"),
                  (d.batch_size >= 1, "data.batch_size must be >= 1"),
                  (c.every >= 1 and c.keep_last >= 1, "checkpoint.every and keep_last must be >= 1"),
                  (c.snapshot_every is None or c.snapshot_every >= 1, "checkpoint.snapshot_every must be >= 1 "
                                                                      "or null"),
                  (c.snapshot_dtype in SNAPSHOT_DTYPES, f"checkpoint.snapshot_dtype must be one of "
                                                        f"{', '.join(SNAPSHOT_DTYPES)}, got {c.snapshot_dtype!r}"),
                  (lg.eval_every >= 1, "logging.eval_every must be >= 1"), (lg.sample_tokens >= 0,
                                                                         "logging.sample_tokens must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _check_keys(data: Any, valid: Any, source: str, what: str, prefix: str) -> None:
    """A ConfigError naming the first key of ``data`` that is not in ``valid``, as ``prefix + key``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in valid:
            raise ConfigError(f"{source}: unknown {what} '{prefix}{key}'; valid: {', '.join(valid)}")


def _section(section: Any, data: Any, source: str, name: str) -> Any:
    fields = {f.name: f.type for f in dataclasses.fields(section)}
    _check_keys(data if data is not None else {}, fields, source, "key", f"{name}.")
    for key, value in (data or {}).items():
        setattr(section, key, _coerce(value, fields[key], f"{source}: {name}.{key}"))
    return section


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """``value`` as the field's type. YAML reads ``1e-3`` as a string, so numbers may come as text."""
    if value is None and "None" in annotation:
        return None
    kind = annotation.split("|")[0].strip()
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError):
        pass
    if (kind == "bool" and isinstance(value, bool)) or (kind == "dict" and isinstance(value, dict)):
        return value
    if kind == "str" and isinstance(value, (str, os.PathLike)):
        return str(value)
    raise ConfigError(f"{where}: expected {annotation}, got {value!r}")


def load_config(path: str | os.PathLike) -> TrainConfig:
    """A TrainConfig from a YAML file (sections model, data, training, checkpoint, logging)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return TrainConfig.from_dict(data, source=str(path))
