"""The Patching tab's form fields -> checked token ids: the clean and corrupted prompts (given, or made by
replacing a word), the answer and wrong tokens, and how many patched rows one forward pass may hold.

Each refusal is one line naming its field, in the order of the fields on the page, before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from app.core import Explorer
from app.models import AppInputError, Loaded
from qtg.data.tokenizer import encode, token_strings
from qtg.model.views import view_memory

CORRUPT_BY = ["corrupted prompt", "replacing a word"]
# Patched rows per forward pass. On nano (CPU) 8 to 64 rows patch equally fast, and Stop waits for the pass under
# way (the page drops a click on Patch made before that pass ends), so the app keeps passes short.
PASS_ROWS = 16


@dataclass
class Pair:
    """One model's checked request: both prompts' ids ``[1, N]`` and token strings, the metric's token ids."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    answer: int
    wrong: int | None


def corrupted_text(clean: str, corrupt_by: Any, corrupted: Any, word: Any, replacement: Any) -> str:
    """The corrupted prompt: as given, or the clean one with every whole-word ``word`` replaced."""
    if corrupt_by not in CORRUPT_BY:
        raise AppInputError(f"corrupt by: {str(corrupt_by)[:50]!r} is not one of {CORRUPT_BY}")
    if corrupt_by == CORRUPT_BY[0]:
        return corrupted
    for name, value in (("word to replace", word), ("replacement", replacement)):
        if not isinstance(value, str) or not value.strip():
            raise AppInputError(f"{name}: empty; type a word of the clean prompt and the word to put in its place")
    pattern = rf"(?<!\w){re.escape(word.strip())}(?!\w)"
    if not re.search(pattern, clean):
        raise AppInputError(f"word to replace: {word.strip()[:50]!r} is not a word of the clean prompt")
    return re.sub(pattern, lambda _: replacement.strip(), clean)


def clean_ids(ex: Explorer, loaded: Loaded, clean: Any) -> tuple[torch.Tensor, list[str]]:
    """The clean prompt's ids and tokens, refused past ``Limits.max_patching_tokens``."""
    ids, tokens = ex.encode(loaded, clean, ex.limits.max_text_chars, "clean prompt")
    limit = ex.limits.max_patching_tokens
    if ids.shape[1] > limit:
        raise AppInputError(f"clean prompt: {ids.shape[1]} tokens is above the maximum {limit} (max patching "
                            "tokens: every block and position is one patched pass); shorten it")
    return ids, tokens


def one_token(loaded: Loaded, word: Any, field: str, optional: bool = False) -> int | None:
    """The id of the one token ``word`` is cut into (as typed: a leading space is part of the token)."""
    if optional and (word is None or (isinstance(word, str) and not word.strip())):
        return None
    if not isinstance(word, str) or not word.strip():
        raise AppInputError(f"{field}: empty; type the token the clean prompt should be followed by, e.g. ' son'")
    ids = encode(loaded.tokenizer, word)
    if len(ids) != 1:
        cut = " | ".join(repr(t) for t in token_strings(loaded.tokenizer, ids))
        raise AppInputError(f"{field}: {word[:50]!r} is {len(ids)} tokens for {loaded.source.name} ({cut}); give one "
                            "token")
    return ids[0]


def pair(ex: Explorer, loaded: Loaded, clean: str, corrupted: Any, answer: Any, wrong: Any) -> Pair:
    """Both prompts cut into the same number of tokens (not the same tokens), and the metric's one-token words."""
    clean_id, clean_tokens = clean_ids(ex, loaded, clean)
    corrupt_id, corrupt_tokens = ex.encode(loaded, corrupted, ex.limits.max_text_chars, "corrupted prompt")
    n, m = clean_id.shape[1], corrupt_id.shape[1]
    differ = next((i for i, (a, b) in enumerate(zip(clean_tokens, corrupt_tokens)) if a != b), min(n, m))
    if n != m:
        raise AppInputError(f"corrupted prompt: {m} tokens, the clean prompt {n}: patching pairs positions, so both "
                            f"must cut into as many tokens (they first differ at token {differ})")
    if bool((clean_id == corrupt_id).all()):
        raise AppInputError(f"corrupted prompt: the same {n} tokens as the clean prompt; nothing to patch")
    a, w = one_token(loaded, answer, "answer"), one_token(loaded, wrong, "wrong token", optional=True)
    if a == w:
        raise AppInputError(f"wrong token: {wrong!r} is the answer's token; leave it empty for logit[answer] alone")
    return Pair(clean_id, corrupt_id, clean_tokens, corrupt_tokens, a, w)


def patching_rows(ex: Explorer, loaded: Loaded, n_tokens: int) -> int:
    """Patched rows per forward pass: ``PASS_ROWS``, or as many as the memory budget holds (at least one:
    :meth:`~app.core.Explorer.check_memory` refuses a request whose one row does not fit)."""
    one = view_memory(loaded.model.cfg, n_tokens, next(loaded.model.parameters()).dtype, 0, "internals",
                      loaded.device).request
    return int(max(1, min(PASS_ROWS, ex.memory_budget(loaded.device) // one)))
