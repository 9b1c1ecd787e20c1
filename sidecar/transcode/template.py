"""google.api.http path templates: parse once at config time, match per request.

Grammar (from google/api/http.proto)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

A template is flattened into a list of segments (variables become ranges over that list) so
matching is a single walk over the request path's segments.  ``**`` may only be the last
segment; it matches zero or more path segments and keeps their ``/``.  Captured values are
percent-decoded: fully for a one-segment variable, and with ``%2F`` left encoded for a
multi-segment one (so a decoded value still splits back into the segments it came from).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_to_bytes

from sidecar.transcode.errors import TranscodeConfigError

LITERAL, ONE, MANY = "lit", "*", "**"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL_STOP = "/{}:*"
_RANK = {LITERAL: 2, ONE: 1, MANY: 0}


@dataclass(frozen=True)
class Variable:
    field_path: str          # "user.id"
    start: int               # first flattened segment it covers
    end: int                 # one past the last (end == start + 1 for "{x}")
    pattern: str             # the segments as written: "*", "shelves/*", "**"

    @property
    def multi_segment(self) -> bool:
        return self.pattern != "*"


@dataclass(frozen=True)
class PathTemplate:
    text: str
    segments: tuple[tuple[str, str], ...]   # (kind, literal text or "")
    variables: tuple[Variable, ...]
    verb: str                                # "" when none

    @classmethod
    def parse(cls, text: str, where: str = "path template") -> "PathTemplate":
        return _Parser(text, where).parse()

    def specificity(self) -> tuple:
        """Sort key: a verb beats none, then a literal beats `*` beats `**`, left to right."""
        return (bool(self.verb), tuple(_RANK[k] for k, _ in self.segments))

    def shape(self) -> str:
        """The template with variable names erased: two bindings with equal shapes are ambiguous."""
        parts = [text if kind == LITERAL else kind for kind, text in self.segments]
        return "/" + "/".join(parts) + (":" + self.verb if self.verb else "")

    def match(self, path: str) -> dict[str, str] | None:
        """Variables captured from ``path`` (no query string), or None when it does not match."""
        if not path.startswith("/"):
            return None
        if self.verb:
            suffix = ":" + self.verb
            if not path.endswith(suffix):
                return None
            path = path[: -len(suffix)]
        raw = path[1:].split("/")
        return self.match_segments(raw)

    def match_segments(self, raw: list[str]) -> dict[str, str] | None:
        segs = self.segments
        many = bool(segs) and segs[-1][0] == MANY
        fixed = len(segs) - 1 if many else len(segs)
        if many:
            if len(raw) < fixed:
                return None
            if len(raw) == fixed + 1 and raw[-1] == "" and fixed > 0:
                raw = raw[:-1]  # "/files/" is "/files" with zero segments under "**"
        elif len(raw) != fixed:
            return None
        for i in range(fixed):
            kind, lit = segs[i]
            seg = raw[i]
            if kind == LITERAL:
                if seg != lit and unquote(seg, errors="surrogateescape") != lit:
                    return None
            elif seg == "":
                return None
        out: dict[str, str] = {}
        for var in self.variables:
            end = len(raw) if var.end == len(segs) and many else var.end
            captured = raw[var.start:end]
            out[var.field_path] = _decode(captured, var.multi_segment)
        return out

    def openapi_path(self, names: dict[str, str] | None = None) -> str:
        """The template as an OpenAPI path: each variable becomes one ``{name}`` placeholder."""
        names = names or {}
        parts: list[str] = []
        i = 0
        by_start = {v.start: v for v in self.variables}
        wildcard = 0
        while i < len(self.segments):
            var = by_start.get(i)
            if var is not None:
                parts.append("{" + names.get(var.field_path, var.field_path) + "}")
                i = var.end
                continue
            kind, lit = self.segments[i]
            if kind == LITERAL:
                parts.append(lit)
            else:
                wildcard += 1
                parts.append("{" + names.get(f"_wildcard{wildcard}", f"_wildcard{wildcard}") + "}")
            i += 1
        return "/" + "/".join(parts) + (":" + self.verb if self.verb else "")

    def placeholders(self) -> list[str]:
        """The names ``openapi_path`` gives its placeholders, left to right."""
        out: list[str] = []
        by_start = {v.start: v for v in self.variables}
        i = wildcard = 0
        while i < len(self.segments):
            var = by_start.get(i)
            if var is not None:
                out.append(var.field_path)
                i = var.end
                continue
            if self.segments[i][0] != LITERAL:
                wildcard += 1
                out.append(f"_wildcard{wildcard}")
            i += 1
        return out


def _decode(captured: list[str], multi: bool) -> str:
    text = "/".join(captured)
    if "%" not in text:
        return text
    if not multi:
        return unquote_to_bytes(text).decode("utf-8", "surrogateescape")
    # Keep %2F as it is: decoding it would merge two segments' worth of meaning into one.
    pieces = re.split(r"(%2[Ff])", text)
    return "".join(p if re.fullmatch(r"%2[Ff]", p) else unquote_to_bytes(p).decode("utf-8", "surrogateescape")
                   for p in pieces)


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self.text, self.where, self.pos = text, where, 0
        self.segments: list[tuple[str, str]] = []
        self.variables: list[Variable] = []

    def fail(self, reason: str) -> TranscodeConfigError:
        return TranscodeConfigError(self.where, f"{reason} in path template {self.text!r} (at offset {self.pos})")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> PathTemplate:
        if not self.text.startswith("/"):
            raise self.fail("must start with '/'")
        self.pos = 1
        self.segments_until(("", ":"), in_variable=False)
        verb = ""
        if self.peek() == ":":
            self.pos += 1
            verb = self.literal()
            if not verb:
                raise self.fail("empty verb")
            if self.pos != len(self.text):
                raise self.fail("unexpected text after the verb")
        for i, (kind, _) in enumerate(self.segments):
            if kind == MANY and i != len(self.segments) - 1:
                raise self.fail("'**' must be the last segment")
        paths = [v.field_path for v in self.variables]
        dup = {p for p in paths if paths.count(p) > 1}
        if dup:
            raise self.fail(f"field {sorted(dup)[0]!r} bound twice")
        return PathTemplate(self.text, tuple(self.segments), tuple(self.variables), verb)

    def segments_until(self, stops: tuple[str, ...], in_variable: bool) -> None:
        while True:
            self.segment(in_variable)
            ch = self.peek()
            if ch == "/":
                self.pos += 1
                continue
            if ch in stops:
                return
            raise self.fail(f"unexpected {ch!r}" if ch else "unexpected end")

    def segment(self, in_variable: bool) -> None:
        ch = self.peek()
        if ch == "*":
            if self.text.startswith("**", self.pos):
                self.pos += 2
                self.segments.append((MANY, ""))
            else:
                self.pos += 1
                self.segments.append((ONE, ""))
        elif ch == "{":
            if in_variable:
                raise self.fail("nested variable")
            self.variable()
        else:
            lit = self.literal()
            if not lit:
                raise self.fail("empty segment")
            self.segments.append((LITERAL, lit))

    def literal(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _LITERAL_STOP:
            self.pos += 1
        return self.text[start:self.pos]

    def variable(self) -> None:
        self.pos += 1  # "{"
        names = []
        while True:
            m = _IDENT.match(self.text, self.pos)
            if not m:
                raise self.fail("expected a field name")
            names.append(m.group())
            self.pos = m.end()
            if self.peek() != ".":
                break
            self.pos += 1
        start = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            pat_start = self.pos
            self.segments_until(("}",), in_variable=True)
            pattern = self.text[pat_start:self.pos]
        elif self.peek() == "}":
            self.segments.append((ONE, ""))
            pattern = "*"
        else:
            raise self.fail("expected '=' or '}'")
        self.pos += 1  # "}"
        self.variables.append(Variable(".".join(names), start, len(self.segments), pattern))
