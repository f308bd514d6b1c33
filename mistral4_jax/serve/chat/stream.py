"""Streaming detokenization: `IncrementalDecoder` turns ids into text as they are generated."""

from __future__ import annotations

from typing import Any, Iterable


class IncrementalDecoder:
    """Streaming detokenizer: feed ids as they are generated, get the newly completed text.

    Never emits half a character: byte-level tokens that end inside a multi-byte UTF-8 sequence are
    held back until the character completes (the decoded window then no longer ends in U+FFFD). Each
    step decodes only a short window (from the start of the last emitted piece), so the cost per
    token does not grow with the output, and the concatenation of all returned pieces plus `flush()`
    equals ``tokenizer.decode(all_ids, skip_special)``. The ids fed so far are in ``.ids``.

        dec = tokenizer.incremental_decoder()
        for tok in stream: print(dec.feed(tok), end="", flush=True)
        print(dec.flush())
    """

    MAX_SEARCH = 16  # how many trailing token boundaries to try when the window ends mid-character

    def __init__(self, tokenizer: Any, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # start of the decode window (a character boundary)
        self._read = 0     # ids before this are emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _emit(self, force: bool) -> str:
        n = len(self.ids)
        if self._read >= n:
            return ""

        def dec(a: int, b: int) -> str:
            return self.tokenizer.decode(self.ids[a:b], skip_special=self.skip_special)

        end, new_text = n, dec(self._prefix, n)
        if not force and new_text.endswith("\ufffd"):
            # Emit up to the last token boundary that closes a character; hold the rest back. (A
            # byte-level BPE token may span character boundaries, so several tokens can be pending.)
            # An invalid byte inside the text is emitted as U+FFFD once later text completes it.
            for cut in range(n - 1, max(self._read, n - self.MAX_SEARCH), -1):
                text = dec(self._prefix, cut)
                if not text.endswith("\ufffd"):
                    end, new_text = cut, text
                    break
            else:
                return ""  # wait for the character to complete (or for flush())
        prefix_text = dec(self._prefix, self._read)
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:  # should not happen with byte-level BPE; stay consistent with a full decode
            delta = dec(0, end)[len(self.text):]
        self._prefix, self._read = self._read, end
        self._pieces.append(delta)
        return delta

    def feed(self, ids: int | Iterable[int]) -> str:
        """Append one id or several; return the text they completed ("" while a character is incomplete)."""
        try:
            self.ids.extend(int(i) for i in ids)  # type: ignore[union-attr]
        except TypeError:  # a single id
            self.ids.append(int(ids))  # type: ignore[arg-type]
        return self._emit(force=False)

    def flush(self) -> str:
        """Emit whatever is still held back (end of generation)."""
        return self._emit(force=True)
