"""Text for clients, token by token: what may be shown now, and where a stop string cuts the text.

The engine stops a request once its generated text *contains* a stop string and keeps the token that
completed it (as :func:`qtg.generate.generate` does). A client, as in the OpenAI API, sees the text
*before* the stop string. While streaming, :class:`TextStream` therefore holds back any tail of the text
that could still become a stop string, and any incomplete UTF-8 character (the tokenizer decodes a
split byte sequence to U+FFFD until its last byte arrives), so the streamed pieces always join to the
final text. The tail held back is found in time linear in the stop strings (:class:`StopPrefix`), never
by trying each of a stop string's prefixes in turn (quadratic: one 250,000-character stop string kept a
server busy for seconds per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtg.data.tokenizer import decode

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


class StopPrefix:
    """How much of a text's end could still grow into one stop string: its longest proper prefix there.

    Knuth-Morris-Pratt: ``table[i]`` is the length of the longest proper prefix of ``stop[:i + 1]`` that
    is also its suffix (built once, O(len(stop))). Scanning the text's last ``len(stop) - 1`` characters
    through that automaton leaves it in the state k = the longest prefix of ``stop`` that ends the text;
    each character moves k up by at most one, so the fall-backs are paid for and a scan is
    O(len(stop)) whatever the text.
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.table = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            k = self._advance(k, stop[i])
            self.table[i] = k

    def _advance(self, k: int, char: str) -> int:
        """The automaton's next state: ``stop[:k]`` matched, then ``char``."""
        while k and self.stop[k] != char:
            k = self.table[k - 1]
        return k + 1 if self.stop[k] == char else 0

    def held(self, text: str) -> int:
        """The length of the longest proper prefix of the stop string that ends ``text`` (0: none)."""
        k = 0
        for char in text[max(0, len(text) - len(self.stop) + 1):]:
            if k == len(self.stop) - 1 and self.stop[k] == char:  # the whole stop string: the caller cuts there
                k = self.table[k]
            else:
                k = self._advance(k, char)
        return k


class TextStream:
    """The text of a growing list of token ids, released only where it is final.

    Args:
        tokenizer: decodes ids (special tokens kept, as :func:`qtg.data.tokenizer.decode`).
        stop: stop strings (the text shown ends before the first one).
        skip: ids never shown (EOS).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), skip: Sequence[int] = ()):
        self.tokenizer, self.stop, self.skip = tokenizer, tuple(stop), set(skip)
        self.prefixes = [StopPrefix(s) for s in self.stop]
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
        hold = max((p.held(full) for p in self.prefixes), default=0)
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
