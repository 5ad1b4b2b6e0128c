"""Tier presets, configs, parameter counts, memory estimates and the fit check."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qtg
import qtg.model.builder as build_module
from qtg.model.cache import QTGCache
from qtg.model.config import ARCHS
from qtg.model.memory import closed_form_params, count_params, human_bytes, memory_estimate
from qtg.model.registry import ARCHITECTURES


@pytest.mark.parametrize("name", list(qtg.TIERS))
def test_closed_form_count_equals_meta_device_count(name):
    assert closed_form_params(name) == count_params(name)


def test_the_seed_claims_are_kept_but_never_used_as_counts():
    t7 = qtg.get_tier("7b")
    assert t7.claimed_params == 6.2e9
    assert count_params("7b") != t7.claimed_params


@pytest.mark.parametrize("name", ["micro", "nano"])
def test_small_tiers_build_and_count_what_they_allocate(name):
    model = qtg.build(name)
    assert sum(p.numel() for p in model.parameters()) == count_params(name)


def test_micro_is_a_few_hundred_thousand_parameters():
    assert 1e5 <= count_params("micro") < 1e6


def test_unknown_tier_lists_the_valid_names():
    with pytest.raises(qtg.ConfigError, match="valid tiers: micro, nano, base, 7b, 30b, 100b, 5.5q"):
        qtg.get_tier("13b")
    assert qtg.get_tier(" 7B ").name == "7b"


def test_config_validation_names_the_field():
    with pytest.raises(qtg.ConfigError, match="divisible by n_heads"):
        qtg.get_tier("micro").replace(n_heads=3)
    with pytest.raises(qtg.ConfigError, match="attn_impl"):
        qtg.get_tier("micro").replace(attn_impl="fast")
    with pytest.raises(qtg.ConfigError, match="unknown config field"):
        qtg.get_tier("micro").replace(heads=3)


@pytest.mark.parametrize("name", list(qtg.TIERS))
def test_config_round_trips_through_json(name):
    cfg = qtg.get_tier(name)
    assert qtg.QTGConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_seed_faithful_variant():
    cfg = qtg.seed_faithful(qtg.get_tier("nano"))
    assert (cfg.ffn_hidden, cfg.pos, cfg.learn_gamma, cfg.gamma_init) == (0, "none", False, 1.0)
    assert qtg.get_tier("7b").ffn_hidden == 0  # the seed's tiers are in the seed's form


def test_memory_estimate_arithmetic():
    p = count_params("nano")
    inf32 = memory_estimate("nano", "fp32", "inference")
    inf16 = memory_estimate("nano", "bf16", "inference")
    tr16 = memory_estimate("nano", "bf16", "train")
    assert inf32.weights == 4 * p and inf16.weights == 2 * p
    assert tr16.gradients == 2 * p and tr16.optimizer == 12 * p  # two fp32 moments + fp32 master
    assert memory_estimate("nano", "fp32", "train").optimizer == 8 * p
    assert tr16.total > inf16.total and inf32.total > inf16.total
    with pytest.raises(qtg.ConfigError, match="mode must be one of"):
        memory_estimate("nano", "fp32", "serve")


def test_kv_cache_estimate_equals_the_real_cache(micro):
    n = 50
    with torch.no_grad():
        cache = QTGCache()
        micro(torch.zeros(1, n, dtype=torch.long), cache=cache)
    real = cache.points.numel() * 4 + sum(t.numel() * 4 for t in cache.keys + cache.values)
    assert memory_estimate(micro.cfg, "fp32", "inference", seq_len=n).kv_cache == real


def test_a_tier_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    with pytest.raises(qtg.TierTooLargeError, match=r"need .*PiB.* available; nothing was allocated"):
        qtg.build("5.5q")
    # 64 GiB free, whatever this machine has: 100b's bf16 weights (2 bytes x 43.4e9) are 80.9 GiB
    monkeypatch.setattr(build_module, "available_memory", lambda device: 64 * 2**30)
    with pytest.raises(qtg.TierTooLargeError, match=r"100b.*need 80\.9 GiB in bfloat16 .* 64\.0 GiB available"):
        qtg.build("100b", dtype="bf16")


def test_fit_check_uses_the_devices_free_memory(monkeypatch):
    monkeypatch.setattr(build_module, "available_memory", lambda device: 1_000_000)
    with pytest.raises(qtg.TierTooLargeError, match=r"need 1\.6 MiB .* 976\.6 KiB available"):
        qtg.build("micro")
    monkeypatch.setattr(build_module, "available_memory", lambda device: 10_000_000)
    assert isinstance(qtg.build("micro"), qtg.QTG)


def test_build_is_deterministic_in_its_seed():
    a, b, c = qtg.build("micro", seed=1), qtg.build("micro", seed=1), qtg.build("micro", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed.table.weight, c.embed.table.weight)


# Run in a child whose address space is capped (RLIMIT_AS) at its own baseline (interpreter + torch +
# qtg, measured after a warm-up build) + 3 bytes per parameter of `base`: room for the bf16 weights
# (2 bytes each) with a margin of 1 byte each, not for float32 weights (4 bytes each).
CAPPED_BUILD = textwrap.dedent("""
    import resource, sys, torch
    import qtg

    def address_space():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    n = qtg.count_params("base")
    qtg.build("micro", dtype="bf16"), qtg.build("micro", dtype="fp32")  # warm every allocation path
    cap = address_space() + 3 * n
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for dtype in ("bf16", "fp32"):
        try:
            model = qtg.build("base", dtype=dtype)
            print(dtype, "built", model.embed.table.weight.dtype)
            del model
        except RuntimeError as e:  # the CPU allocator's "can't allocate memory"
            print(dtype, "failed", str(e).splitlines()[0][:80])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bf16_build_allocates_only_bf16_weights():
    """The fit check counts 16-bit bytes, so a bf16 build must never hold float32 weights, even briefly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}  # no thread pools or arenas mid-test
    r = subprocess.run([sys.executable, "-c", CAPPED_BUILD], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "bf16 built torch.bfloat16", r.stdout  # 2 bytes per parameter fit under the cap
    assert lines[1].startswith("fp32 failed"), r.stdout  # 4 do not: the cap really binds


def test_every_architecture_is_registered():
    assert set(ARCHITECTURES) == set(ARCHS)
    for arch, cls in ARCHITECTURES.items():
        assert isinstance(qtg.build(qtg.get_tier("micro").replace(arch=arch)), cls)


def test_human_bytes_are_binary_and_say_so():
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(80 * 2**30) == "80.0 GiB"
    assert human_bytes(3 * 2**60) == "3.0 EiB"


def test_build_in_bf16_and_unknown_dtype():
    assert qtg.build("micro", dtype="bf16").embed.table.weight.dtype == torch.bfloat16
    with pytest.raises(qtg.ConfigError, match="unknown dtype"):
        qtg.build("micro", dtype="fp8")
