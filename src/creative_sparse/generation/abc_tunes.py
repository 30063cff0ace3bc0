"""ABC 2.1 tunes: the structural check behind the ``"abc"`` validator.

A tune is a header block (``X:`` first, then ``T:``, more ``<letter>:`` fields, and
``K:`` last) and a body that ends at the first empty line (ABC 2.1, section 2.2:
an empty line ends a tune; text after it is free). Body lines are the fields the
standard allows there (``w:`` lyrics, ``M:`` changes, ``K:``, ``P:`` parts...), ``%``
comments, or *music code*: notes, rests,
bar lines, accidentals, lengths, chords, slurs, grace notes and decorations, plus
``"..."`` chord symbols and annotations, ``!...!`` decorations and ``[K:...]`` inline
fields, whose insides may hold any text.

The rules (each broken rule is one violation of a finished text):

1. ``X:`` is the first header, 2. there is a ``T:``, 3. there is a ``K:``,
4. a body line has notes and a bar line, 5. every music line is music code (no
prose in the tune: a body line such as "This reel is in D" is not ABC),
6. brackets close in order, 7. none is left open.

:meth:`AbcNotation.rejects_prefix` says when no continuation can satisfy them (the
decoding guard then takes the token back), and :meth:`AbcNotation.closing` what
would end the tune validly near the end of the length budget: the open brackets'
closers and a bar line. Rule 5 is what lets decoding enforce anything: without it a
line of prose counts as notes (it has the letters a-g) and the guard lets a model
write about music instead of writing it.

ABC has no maintained lightweight parser on PyPI (music21 is large and slow to
import), so these are the structural rules of the standard that matter for "is this
a tune", and nothing more: durations, bar lengths against the metre and the key's
spelling are not checked.
"""

from __future__ import annotations

import re

__all__ = ["AbcNotation", "abc_notation"]

_FIELD = re.compile(r"^([A-Za-z]):(.*)$")
# The fields ABC 2.1 allows in a tune body (its table of fields, section 3): others
# (O: origin, X: a new tune...) belong to the header, and a body line such as "O:22"
# is read as music code, which must hold notes and a bar line.
_BODY_LETTERS = "IKLMmNPQRrsTUVWw"
_BODY_FIELD = re.compile(f"^[{_BODY_LETTERS}]:")
_NOTE = re.compile(r"[A-Ga-gz]")
_PAIRS = {"[": "]", "(": ")", "{": "}"}
# Notes, rests (z Z x X) and the spacer y, octave marks, accidentals, lengths, bar
# lines and repeats, chords, slurs and tuplets, grace notes, ties, broken rhythm, the
# shorthand decorations (. ~ H L M O P S T u v), voice overlay, line continuation,
# beam breaks and spaces.
_MUSIC = frozenset("ABCDEFGabcdefgzZxXy',^_=0123456789/|:[](){}-<>.~HLMOPSTuv&$\\` \t")
# Spans whose insides are free text: chord symbols and annotations, long decorations,
# inline fields, and a comment to the end of the line. An unclosed span at the end of
# a line being written is free too (it may still close); "[c" opens a chord, "[K" may
# open an inline field (field letters are never note letters).
_FREE = re.compile(r'"[^"]*"|![^!\s]*!|\+[^+\s]*\+|\[[A-Za-z]:[^\]]*\]|%.*$')
_OPEN_FREE = re.compile(r'"[^"]*$|![^!\s]*$|\+[^+\s]*$|\[[A-Za-z]:[^\]]*$|\[[H-Zh-y]$')


def _code(line: str, *, writing: bool = False) -> str:
    """The music code of a body line: free-text spans removed (and, for the line being
    written, a span still open at its end)."""
    code = _FREE.sub(" ", line)
    return _OPEN_FREE.sub("", code) if writing else code


def _is_music(code: str) -> bool:
    return all(ch in _MUSIC for ch in code)


def _brackets(code: str) -> tuple[bool, list[str]]:
    """``(a bracket closed out of order, the closers still owed, innermost first)``."""
    owed = []
    for ch in code:
        if ch in _PAIRS:
            owed.append(_PAIRS[ch])
        elif ch in _PAIRS.values() and (not owed or owed.pop() != ch):
            return True, owed[::-1]
    return False, owed[::-1]


def _split(lines: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """``(header letters, body lines, whether K: was reached, whether the tune ended)``
    of a text's ``lines``.

    The header block is searched from the first ``<letter>:`` line (text before it
    is skipped: a model may introduce its tune); the body runs from after ``K:`` to
    the first empty line after a non-empty one. Body lines keep their text, stripped.
    """
    headers, body, keyed, ended = [], [], False, False
    for line in lines:
        line = line.strip()
        if not keyed:
            match = _FIELD.match(line)
            if match:
                headers.append(match.group(1))
                keyed = match.group(1) == "K"
            elif headers and line:
                break                                    # prose inside the header block
            continue
        if not line:
            if body:
                ended = True
                break
            continue
        body.append(line)
    return headers, body, keyed, ended


def _is_code_line(line: str) -> bool:
    """A body line that is music code: not a body field, not a comment."""
    return not _BODY_FIELD.match(line) and not line.startswith("%")


def _music_lines(body: list[str]) -> list[str]:
    return [_code(ln) for ln in body if _is_code_line(ln)]


def _barred(code: str) -> bool:
    """A line of music code with notes and a bar line."""
    return bool(_NOTE.search(code)) and "|" in code


class AbcNotation:
    """The ``"abc"`` validator: violations of a finished tune (module doc: the rules),
    the prefixes no continuation can repair, and the ending a budget can close on.

    Example:
        >>> abc = AbcNotation()
        >>> abc("X:1\\nT:Air\\nK:D\\n|:dfa afd|efg gfe:|\\n")
        0
        >>> abc("X:1\\nT:Air\\nK:D\\nThis reel is in D | and lively\\n")
        1
        >>> abc.rejects_prefix("X:1\\nT:Air\\nK:D\\nThis r"), abc.closing("X:1\\nT:Air\\nK:D\\n(dfa")
        (True, ')|')
    """

    __name__ = "abc_notation"

    def __call__(self, text: str) -> int:
        """Number of broken rules (module doc); 0 for a well-formed tune."""
        headers, body, keyed, _ = _split(text.strip().splitlines())
        violations = (not headers or headers[0] != "X") + ("T" not in headers) + (not keyed)
        music = _music_lines(body)
        violations += not any(map(_barred, music))
        violations += not all(_is_music(ln) for ln in music)
        misordered, owed = _brackets("".join(music))
        return violations + misordered + bool(owed)

    def rejects_prefix(self, text: str) -> bool:
        """True when no continuation of ``text`` can be a well-formed tune: it does not
        open with ``X:``, a header line is not ``<letter>:``, ``K:`` comes before
        ``T:``, a finished body line lacks notes or a bar line, a body line holds
        prose, a bracket closed out of order, or the tune ended (an empty line) with
        no line of notes and bars."""
        stripped = text.lstrip()
        if stripped[:2] != "X:"[: len(stripped[:2])]:
            return True
        lines = stripped.split("\n")
        finished, current = lines[:-1], lines[-1].strip()
        headers, body, keyed, ended = _split(finished)
        if ended:                                        # the tune is over: free text,
            return not any(map(_barred, _music_lines(body)))
        if not keyed:
            if len(headers) < sum(1 for ln in finished if ln.strip()):
                return True                              # a non-header line before K:
            if current[:1] and not current[0].isalpha() or current[1:2] not in ("", ":"):
                return True                              # the header line being written
            return current.startswith("K") and "T" not in headers     # K: before T:
        if "T" not in headers:
            return True
        music = _music_lines(body)
        if any(not _barred(ln) or not _is_music(ln) for ln in music):
            return True
        if current and _is_code_line(current) and not (len(current) == 1
                                                       and current in _BODY_LETTERS):
            code = _code(current, writing=True)
            if not _is_music(code):
                return True
            music.append(code)
        return _brackets("".join(music))[0]

    def closing(self, text: str) -> str | None:
        """What would end the tune validly right now: inside the body, on a line with
        notes, the closers of the open brackets and a bar line if the tune has none
        yet; ``None`` when nothing short can (still in the header, no notes on the
        line) or nothing is needed."""
        lines = text.lstrip().split("\n")
        headers, body, keyed, ended = _split(lines[:-1])
        current = lines[-1].strip()
        if not keyed or ended or "T" not in headers or not _NOTE.search(_code(current)):
            return None
        if not _is_code_line(current) or _OPEN_FREE.search(current):
            return None
        music = _music_lines(body) + [_code(current)]
        misordered, owed = _brackets("".join(music))
        if misordered:
            return None
        ending = "".join(owed) + ("" if any(map(_barred, music)) else "|")
        return ending or None


abc_notation = AbcNotation()
