"""`StopMatcher`: stop strings found across streamed pieces, text that may begin one held back."""

import random

import pytest

from engine.serving.text import StopMatcher


def feed_all(stops, pieces):
    """(text emitted, the stop string hit or None, the emitted text after each piece)."""
    m, out, seen = StopMatcher(stops), "", []
    for i, p in enumerate(pieces):
        text, hit = m.feed(p, final=i == len(pieces) - 1)
        out += text
        seen.append(out)
        if hit is not None:
            return out, hit, seen
    return out, None, seen


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. END", " more"], ["Hello world. E", "N", "D more"],
                                    ["Hello world. ", "", "EN", "D"], ["Hello world. END more"]])
def test_a_stop_split_across_pieces_ends_the_text_before_it(pieces):
    out, hit, _ = feed_all(["END"], pieces)
    assert hit == "END" and out == "Hello world. "


def test_text_that_may_begin_a_stop_is_held_then_released():
    m = StopMatcher(["</answer>"])
    assert m.feed("x </an", final=False) == ("x ", None)  # "</an" may begin the stop
    assert m.feed("d", final=False) == ("</and", None)  # it did not
    assert m.feed(" <", final=False) == (" ", None)
    assert m.feed("", final=True) == ("<", None)  # the end releases what is held


def test_the_earliest_of_several_stops_wins_and_no_stop_passes_everything():
    out, hit, _ = feed_all(["\n\n", "User:"], ["a User", ": b\n\nc"])
    assert hit == "User:" and out == "a "  # the stop found first in the text, whichever is listed first
    out, hit, seen = feed_all([], ["a", "b", "c"])
    assert hit is None and out == "abc" and seen == ["a", "ab", "abc"]


def test_random_chunkings_agree_with_a_plain_search():
    rng = random.Random(0)
    stops = ["STOP", "\n#", "xyzzy"]
    for _ in range(300):
        text = "".join(rng.choice(["ab", "S", "T", "O", "P", "\n", "#", "x", "yz", "zy", " "]) for _ in range(30))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 6)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out, hit, seen = feed_all(stops, pieces)
        first = min(((i, s) for s in stops if (i := text.find(s)) >= 0), default=None)
        assert (out, hit) == ((text[: first[0]], first[1]) if first else (text, None)), pieces
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # never takes text back
