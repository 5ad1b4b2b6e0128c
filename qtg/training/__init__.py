"""Training: the loop (``train``), its settings (``train_config``), the optimiser (``optim``),
evaluation on held-out text (``evaluate``), weight snapshots over a run (``snapshots``) and the
allocator settings a training step wants (``malloc``)."""
