"""``qtg tokenizer train``: a byte-level BPE tokenizer from a text file, folder or JSONL."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qtg.data.pipeline import default_corpus_path, load_documents
from qtg.data.tokenizer import DEFAULT_SPECIAL_TOKENS, encode_batch, min_vocab_size, save_tokenizer, train_tokenizer

HELP = """Tokenizers turn text into the integer ids a model reads.

`qtg tokenizer train` learns a byte-level BPE tokenizer (the GPT-2 scheme,
through the Hugging Face `tokenizers` library): it starts from the 256 byte
values, so any UTF-8 text can be encoded and decoded back exactly, and then
merges the most frequent adjacent pairs until the vocabulary reaches
--vocab-size. A bigger vocabulary means fewer tokens per text (more bytes per
token) but a bigger embedding table. `<|endoftext|>` is always token 0; the
training data puts it between documents."""

TRAIN_HELP = """Train a byte-level BPE tokenizer and write it as one JSON file.

--data is a .txt or .txt.gz file, a .jsonl file (one {"text": ...} per line)
or a folder of them; by default the bundled Shakespeare corpus. The vocabulary
is --vocab-size at most (fewer when the text has no more frequent pairs), and
at least 256 byte tokens + the special tokens. Small tiers use 4096 (nano)
and 512 (micro). Prints the vocabulary size, the training time and the
compression (text bytes per token) on the training text."""

EXAMPLES = """examples:
  qtg tokenizer train --vocab-size 4096 --out runs/tok-4096.json       the bundled corpus, nano's vocabulary
  qtg tokenizer train --data my_texts/ --vocab-size 512 --out tok.json
  qtg tokenizer train --data notes.jsonl --vocab-size 8000 --out tok.json --json"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train a tokenizer and save it as JSON", description=TRAIN_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    t.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="text file, .jsonl file or folder (default: the bundled corpus, assets/corpus)")
    t.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                   help=f"largest vocabulary, special tokens included (default 4096; at least "
                        f"{min_vocab_size(DEFAULT_SPECIAL_TOKENS)})")
    t.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="where to write the tokenizer")
    t.add_argument("--min-frequency", type=int, default=2, metavar="K",
                   help="merge only pairs seen at least K times (default 2)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    data = default_corpus_path() if args.data is None else args.data
    docs = load_documents(data)
    start = time.perf_counter()
    tok = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency)
    seconds = time.perf_counter() - start
    path = save_tokenizer(tok, args.out)
    n_bytes = sum(d.n_bytes for d in docs)
    n_tokens = sum(len(ids) for ids in encode_batch(tok, [d.text for d in docs]))
    summary = {"out": str(path), "data": str(data), "documents": len(docs), "bytes": n_bytes,
               "vocab_size": tok.get_vocab_size(), "requested_vocab_size": args.vocab_size,
               "train_seconds": round(seconds, 3), "tokens": n_tokens, "bytes_per_token": round(n_bytes / n_tokens, 4)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"trained a byte-level BPE tokenizer on {len(docs)} document(s), {n_bytes:,} bytes, from {data}")
    print(f"vocabulary {summary['vocab_size']} (asked for {args.vocab_size}) in {seconds:.2f} s; "
          f"{n_tokens:,} tokens, {summary['bytes_per_token']} bytes/token on the training text")
    print(f"wrote {path}")
    return 0
