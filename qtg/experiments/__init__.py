"""Experiments: ask a model a causal question over a corpus and get an answer with an error bar.

    from qtg import experiments as ex
    lens = ex.logit_lens(model, ids)                               # tied head on every state, [B, N, V] each
    cmp = ex.compare_text(model, "To be, or not", qtg.Intervention(topo="off"))   # one text, with and without
    res = ex.sweep(model, "texts/", [qtg.Intervention(topo="exact")])  # per-window figures, paired 95 % CIs
    ranking = ex.head_importance(model, "texts/", max_windows=200)  # each head ablated alone, ranked
    scores = ex.compare_models({"nano": nano, "nano-notopo": notopo}, "texts/")  # models on the same windows
    ex.paired_bootstrap(after, before, n_bytes)                     # the interval on its own (these texts)
    ex.across_works(after, before, n_bytes, corpus.document, corpus.documents)  # per work, across works
    ex.verdict(scores[1].works.interval)                            # "better", "worse", "no difference detected (± h)"

Every figure is computed from forward passes under :class:`qtg.Intervention`
(the weights are never touched), bits per byte through :func:`qtg.metrics.bits_per_byte`,
and every interval by a seeded bootstrap, so the same call gives the same numbers. Each change has
two intervals: over windows ("these texts") and across works (and seeds), the one every verdict reads.
"""

from qtg.experiments.bootstrap import Interval, bootstrap_ratio, paired_bootstrap, verdict
from qtg.experiments.compare import TextComparison, compare_ids, compare_text
from qtg.experiments.corpus import Corpus, cut_corpus, token_byte_lengths
from qtg.experiments.errors import ExperimentCancelled, ExperimentError
from qtg.experiments.heads import HeadEffect, HeadRanking, head_importance, side_by_side
from qtg.experiments.heldout import NextToken, heldout_documents, next_token, recorded_split
from qtg.experiments.lens import Lens, head_table, logit_lens, read_out
from qtg.experiments.models import ModelScore, compare_models
from qtg.experiments.patching import (
    Agreement,
    LogitAttribution,
    PatchingResult,
    activation_patching,
    agreement_of,
    attribution_patching,
    direct_logit_attribution,
    logit_difference,
)
from qtg.experiments.sweep import Condition, SweepResult, WindowScores, prepare, sweep, unchanged_figures
from qtg.experiments.works import AcrossWorks, across_works, cluster_bootstrap, t_interval

__all__ = [
    "Agreement", "LogitAttribution", "PatchingResult", "activation_patching", "agreement_of", "attribution_patching",
    "direct_logit_attribution", "logit_difference",
    "AcrossWorks", "across_works", "cluster_bootstrap", "t_interval", "unchanged_figures", "verdict",
    "Condition", "Corpus", "ExperimentCancelled", "ExperimentError", "HeadEffect", "HeadRanking", "Interval", "Lens",
    "ModelScore", "NextToken", "compare_models", "heldout_documents", "next_token", "recorded_split",
    "SweepResult", "TextComparison", "WindowScores", "bootstrap_ratio", "compare_ids", "compare_text", "cut_corpus",
    "head_importance", "head_table", "logit_lens", "paired_bootstrap", "prepare", "read_out", "side_by_side", "sweep",
    "token_byte_lengths",
]
