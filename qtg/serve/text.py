"""Text for clients, token by token: what may be shown now, and where a stop string cuts the text.

The engine stops a request once its generated text *contains* a stop string and keeps the token that
completed it (as :func:`qtg.generate.generate` does). A client, as in the OpenAI API, sees the text
*before* the stop string. While streaming, :class:`TextStream` therefore holds back any tail of the text
that could still become a stop string, and any incomplete UTF-8 character (the tokenizer decodes a
split byte sequence to U+FFFD until its last byte arrives), so the streamed pieces always join to the
final text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtg.tokenizer import decode

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The chat template: one line ``Role: content`` per message, then ``Assistant:`` to be continued.

    Roles are ``system`` -> ``System``, ``user`` -> ``User``, ``assistant`` -> ``Assistant``::

        System: You are terse.
        User: Who is there?
        Assistant:
    """
    lines = [f"{CHAT_ROLES[role]}: {content}" for role, content in messages]
    return "\n".join([*lines, "Assistant:"])


CHAT_STOPS = ("\nUser:", "\nSystem:")  # the next turn's header ends the assistant's


class TextStream:
    """The text of a growing list of token ids, released only where it is final.

    Args:
        tokenizer: decodes ids (special tokens kept, as :func:`qtg.tokenizer.decode`).
        stop: stop strings (the text shown ends before the first one).
        skip: ids never shown (EOS).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip: Sequence[int] = ()):
        self.tokenizer, self.stop, self.skip = tokenizer, tuple(stop), set(skip)
        self.ids: list[int] = []
        self.sent = 0  # characters released so far
        self.stopped = False  # a stop string was found: nothing more is released

    def text(self) -> str:
        """All the text so far, cut before the first stop string."""
        text = decode(self.tokenizer, [i for i in self.ids if i not in self.skip])
        cuts = [text.find(s) for s in self.stop if s in text]
        return text[:min(cuts)] if cuts else text

    def add(self, token: int) -> str:
        """Take one token; return the new text that is final now (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = decode(self.tokenizer, [i for i in self.ids if i not in self.skip])
        cuts = [full.find(s) for s in self.stop if s in full]
        if cuts:
            self.stopped = True
            return self._release(full[:min(cuts)])
        hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        ready = full[:len(full) - hold]
        while ready.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its last byte
            ready = ready[:-1]
        return self._release(ready)

    def flush(self) -> str:
        """At the end: whatever was held back (the text ended without completing a stop string)."""
        return "" if self.stopped else self._release(self.text())

    def _release(self, ready: str) -> str:
        if len(ready) <= self.sent:
            return ""
        piece, self.sent = ready[self.sent:], len(ready)
        return piece
