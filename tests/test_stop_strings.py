"""`StopMatcher`: stop strings found across streamed pieces, text that may begin one held back."""

import random

import pytest

from engine.serving.text import StopMatcher


def feed_all(stops, pieces):
    """(text emitted, whether a stop was hit, the emitted text after each piece)."""
    m, out, seen = StopMatcher(stops), "", []
    for i, p in enumerate(pieces):
        text, hit = m.feed(p, final=i == len(pieces) - 1)
        out += text
        seen.append(out)
        if hit:
            return out, True, seen
    return out, False, seen


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. END", " more"], ["Hello world. E", "N", "D more"],
                                    ["Hello world. ", "", "EN", "D"], ["Hello world. END more"]])
def test_a_stop_split_across_pieces_ends_the_text_before_it(pieces):
    out, hit, _ = feed_all(["END"], pieces)
    assert hit and out == "Hello world. "


def test_text_that_may_begin_a_stop_is_held_then_released():
    m = StopMatcher(["</answer>"])
    assert m.feed("x </an", final=False) == ("x ", False)  # "</an" may begin the stop
    assert m.feed("d", final=False) == ("</and", False)  # it did not
    assert m.feed(" <", final=False) == (" ", False)
    assert m.feed("", final=True) == ("<", False)  # the end releases what is held


def test_the_earliest_of_several_stops_wins_and_no_stop_passes_everything():
    out, hit, _ = feed_all(["\n\n", "User:"], ["a User", ": b\n\nc"])
    assert hit and out == "a "
    out, hit, seen = feed_all([], ["a", "b", "c"])
    assert not hit and out == "abc" and seen == ["a", "ab", "abc"]


def test_random_chunkings_agree_with_a_plain_search():
    rng = random.Random(0)
    stops = ["STOP", "\n#", "xyzzy"]
    for _ in range(300):
        text = "".join(rng.choice(["ab", "S", "T", "O", "P", "\n", "#", "x", "yz", "zy", " "]) for _ in range(30))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, 6)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        out, hit, seen = feed_all(stops, pieces)
        first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        assert (out, hit) == ((text[:first], True) if first >= 0 else (text, False)), pieces
        assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))  # never takes text back
