"""Reading JSON that is still being written: where an object's members start and end, so far.

A streamed tool call's arguments go out in pieces as the model writes them (`tools.StreamedCalls`):
what is needed is not the parsed value but, at each moment, where the `name` is complete and how
much of the `arguments` object exists. Positions are indices into the text; an end of None means
the value is not complete yet (its text so far runs to the end).
"""

from __future__ import annotations

import json
import re

_WS = " \t\r\n"
_SCALAR = re.compile(r"[^,}\]\s]*")


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def string_end(s: str, i: int) -> int | None:
    """The index after the string that opens at `s[i]` (a quote), or None if it is not closed yet."""
    j = i + 1
    while j < len(s):
        if s[j] == "\\":
            j += 2
        elif s[j] == '"':
            return j + 1
        else:
            j += 1
    return None


class Scan:
    """Where a string, object or array that starts at one index ends, read as the text grows: each
    call goes on from where the last stopped, so a value streamed in n pieces is read once, not n times."""

    __slots__ = ("pos", "depth", "in_string", "escape", "end")

    def __init__(self, start: int):
        self.pos, self.depth, self.in_string, self.escape, self.end = start, 0, False, False, None

    def advance(self, s: str) -> int | None:
        if self.end is not None:
            return self.end
        i, depth, in_string, escape = self.pos, self.depth, self.in_string, self.escape
        while i < len(s):
            c = s[i]
            i += 1
            if in_string:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == '"':
                    in_string = False
                    if depth == 0:
                        self.end = i
                        break
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    self.end = i
                    break
        self.pos, self.depth, self.in_string, self.escape = i, depth, in_string, escape
        return self.end


def value_end(s: str, i: int, scans: dict[int, Scan] | None = None) -> int | None:
    """The index after the JSON value that starts at `s[i]`, or None if it is not complete yet (a
    number or literal running to the end of the text may go on). `scans`: each value's reading so
    far, by start, kept by a caller whose text only grows."""
    if i >= len(s):
        return None
    if s[i] in '"{[':
        scan = Scan(i) if scans is None else scans.setdefault(i, Scan(i))
        return scan.advance(s)
    end = _SCALAR.match(s, i).end()
    return end if end < len(s) else None


def members(s: str, i: int, scans: dict[int, Scan] | None = None) -> tuple[dict[str, tuple[int, int | None]],
                                                                              int | None]:
    """The members of the object that opens at `s[i]` seen so far, as key -> (value start, value end
    or None), and the object's end (None while it is open, or where the text stops being JSON)."""
    out: dict[str, tuple[int, int | None]] = {}
    j = skip_ws(s, i + 1)
    while j < len(s):
        if s[j] == "}":
            return out, j + 1
        if s[j] == ",":
            j = skip_ws(s, j + 1)
            continue
        key_end = string_end(s, j) if s[j] == '"' else None
        if key_end is None:
            return out, None
        key = json.loads(s[j:key_end])
        j = skip_ws(s, key_end)
        if j >= len(s) or s[j] != ":":
            return out, None
        start = skip_ws(s, j + 1)
        if start >= len(s):
            return out, None
        end = value_end(s, start, scans)
        out[key] = (start, end)
        if end is None:
            return out, None
        j = skip_ws(s, end)
    return out, None


def object_starts(s: str, i: int, sep: str, scans: dict[int, Scan] | None = None) -> list[int]:
    """The starts of the objects in `{...} SEP {...} SEP ...` from `s[i]` (after whitespace), as far
    as they are written: a JSON array's items (`sep` ","), or Llama 3's calls (";")."""
    starts = []
    j = skip_ws(s, i)
    while j < len(s) and s[j] == "{":
        starts.append(j)
        end = value_end(s, j, scans)
        if end is None:
            break
        j = skip_ws(s, end)
        if j >= len(s) or s[j] != sep:
            break
        j = skip_ws(s, j + 1)
    return starts
