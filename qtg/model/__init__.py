"""The model: its configuration and tiers, the QTG network and its layers, the baseline, and loading.

- ``config``, ``tiers``, ``registry``: what a model is (a dataclass, named presets, arch -> class)
- ``memory``, ``builder``, ``checkpoint``, ``loading``: how big it is, building it, the checkpoint format, ``qtg.load``
- ``protocol``: :class:`~qtg.model.protocol.LanguageModel`, what callers outside this package may use of a model
- ``model``: the QTG decoder; ``topo_filter``, ``topo_kernels``: the TopoFilter and its scores;
  ``fisher_rao``: GeoAttention; ``baseline``: the dot-product transformer it is compared with
- ``intervention``, ``activations``, ``views``: per-call edits, named activations, what an inspection costs
- ``cache``: the decoding cache (preallocated, written in place); ``decode``: a decoding step compiled over it
"""
