"""Text in, token ids out: documents (``documents``), the BPE tokenizer (``tokenizer``), and the
split, token cache and resumable batches that training reads (``pipeline``)."""
