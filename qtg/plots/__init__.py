"""Plotly figures, kept apart from the computing they draw (as persim is from ripser).

Every figure function is here by name (``from qtg import plots; plots.persistence_diagram(dgm)``);
each module draws one part: ``topology`` (diagrams, barcodes, weights over text), ``attention``,
``experiment`` (forest plots, the logit lens), ``training`` (topology over a run), ``patching``.
"""

from qtg.plots.attention import attention_heatmaps, gamma_bars, prompt_distance_strip
from qtg.plots.experiment import forest_panels, forest_plot, forest_rows, lens_heatmaps, next_token_bars, shared_range
from qtg.plots.patching import (
                                attribution_scatter,
                                cell_digits,
                                logit_attribution_heatmaps,
                                patching_heatmaps,
                                symmetric_limit,
)
from qtg.plots.topology import (
                                attention_graph_diagrams,
                                barcode,
                                diagrams_side_by_side,
                                exact_vs_approx,
                                layer_summary,
                                persistence_diagram,
                                save_html,
                                token_label,
                                training_curves,
                                weights_beside_control,
                                weights_over_text,
)
from qtg.plots.training import animated, over_training, snapshot_views

__all__ = [
    "animated", "attention_graph_diagrams", "attention_heatmaps", "attribution_scatter", "barcode", "cell_digits",
    "diagrams_side_by_side", "exact_vs_approx", "forest_panels", "forest_plot", "forest_rows", "gamma_bars",
    "layer_summary", "lens_heatmaps", "logit_attribution_heatmaps", "next_token_bars", "over_training",
    "patching_heatmaps", "persistence_diagram", "prompt_distance_strip", "save_html", "shared_range",
    "snapshot_views", "symmetric_limit", "token_label", "training_curves", "weights_beside_control",
    "weights_over_text",
]
