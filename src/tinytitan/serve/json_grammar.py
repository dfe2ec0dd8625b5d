"""An incremental byte-level JSON parser that follows a compiled schema (`json_schema.Node`).

The parser is a stack of immutable frames (each frame points at the frame that continues after it), so
one state can be extended by many candidate tokens without copying. `Frame.feed(byte)` returns the next
state, or None when the byte cannot be part of any valid document. `Frame.est()` is the exact length in
bytes of the shortest text that completes the document from that state: the decoder keeps it within
the tokens left, so generation always ends in valid JSON.
"""

from __future__ import annotations

from tinytitan.serve.json_schema import Node, dumps, kv_len

WS = frozenset(b" \t\n\r")
WS_RUN = 16  # whitespace bytes allowed in a row: no endless blank lines, room for indentation
NUMBER_BYTES = 24  # a number stops growing here (its shortest completion is always within reach)


class Frame:
    """One level of the parse stack. Immutable; `parent` is what continues after this frame ends."""

    __slots__ = ("_est", "parent")

    def __init__(self, parent: Frame | None) -> None:
        self.parent = parent
        self._est = -1

    def feed(self, b: int) -> Frame | None:
        raise NotImplementedError

    def resume(self, result: bytes | None) -> Frame:
        """The state after a child frame ends (`result`: the text of a property name, if one)."""
        return self

    def own(self) -> int:
        """Bytes needed to end this frame, beyond what its parent then needs."""
        raise NotImplementedError

    def est(self) -> int:
        """Exact length of the shortest text that completes the whole document from here."""
        if self._est < 0:
            self._est = self.own() + (self.parent.resume(None).est() if self.parent else 0)
        return self._est

    def can_end(self) -> bool:
        """Whether the document may end right here (a top-level number can always grow, so ask)."""
        return False

    @property
    def done(self) -> bool:
        return False


def feed_bytes(state: Frame | None, data: bytes) -> Frame | None:
    for b in data:
        if state is None:
            return None
        state = state.feed(b)
    return state


def start(node: Node) -> Frame:
    """The parser state before the first byte of a document that follows `node`."""
    return Value(node, Done(), ws=WS_RUN)  # no leading whitespace: the document starts at once


class Done(Frame):
    """The document is complete: nothing more may follow."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(None)

    def feed(self, b: int) -> Frame | None:
        return None

    def own(self) -> int:
        return 0

    def can_end(self) -> bool:
        return True

    @property
    def done(self) -> bool:
        return True


class Value(Frame):
    """Before a value: whitespace, then the first byte picks the kind."""

    __slots__ = ("node", "ws")

    def __init__(self, node: Node, parent: Frame, ws: int = 0) -> None:
        super().__init__(parent)
        self.node, self.ws = node, ws

    def feed(self, b: int) -> Frame | None:
        if b in WS:
            return Value(self.node, self.parent, self.ws + 1) if self.ws < WS_RUN else None  # type: ignore[arg-type]
        return open_value(self.node, self.parent, b)  # type: ignore[arg-type]

    def own(self) -> int:
        return self.node.min_len


def open_value(node: Node, parent: Frame, b: int) -> Frame | None:
    """The state after `b`, the first byte of a value that follows `node`."""
    kinds = node.kinds
    if node.literals and any(lit[0] == b for lit in node.literals):
        return Choice(node.literals, 0, parent).feed(b)
    if b == 0x7B and "object" in kinds:  # {
        return Obj(kinds["object"], parent, Obj.FIRST, frozenset(), None, 0)
    if b == 0x5B and "array" in kinds:  # [
        arr = kinds["array"]
        return Arr(arr, parent, Arr.FIRST, 0, 0)
    if b == 0x22 and "string" in kinds:  # "
        s = kinds["string"]
        return Str(parent, s.min_length, s.max_length, 0, 0, 0, 0x80, 0xBF)
    if (b == 0x2D or 0x30 <= b <= 0x39) and ("number" in kinds or "integer" in kinds):
        return Num(parent, "number" not in kinds, Num.START, 0).feed(b)
    if b in (0x74, 0x66) and "boolean" in kinds:  # t f
        return Choice((b"true", b"false"), 0, parent).feed(b)
    if b == 0x6E and "null" in kinds:  # n
        return Choice((b"null",), 0, parent).feed(b)
    return None


class Choice(Frame):
    """Exactly one of a few fixed texts: enum values, literals, the remaining property names."""

    __slots__ = ("options", "pos")

    def __init__(self, options: tuple[bytes, ...], pos: int, parent: Frame) -> None:
        super().__init__(parent)
        self.options, self.pos = options, pos

    def feed(self, b: int) -> Frame | None:
        pos, parent = self.pos, self.parent
        assert parent is not None
        nxt = tuple(o for o in self.options if len(o) > pos and o[pos] == b)
        if nxt:
            if len(nxt) == 1 and len(nxt[0]) == pos + 1:
                return parent.resume(nxt[0])
            return Choice(nxt, pos + 1, parent)
        for o in self.options:  # a complete option followed by the next byte of the parent
            if len(o) == pos:
                return parent.resume(o).feed(b)
        return None

    def est(self) -> int:
        if self._est < 0:
            parent = self.parent
            assert parent is not None
            self._est = min(len(o) - self.pos + parent.resume(o).est() for o in self.options)
        return self._est

    def can_end(self) -> bool:
        parent = self.parent
        assert parent is not None
        return any(len(o) == self.pos and parent.resume(o).can_end() for o in self.options)


class Str(Frame):
    """Inside a string: escapes, UTF-8 validity (byte by byte), length limits in characters."""

    __slots__ = ("esc", "hi", "lo", "max_len", "min_len", "n", "need")

    def __init__(
        self, parent: Frame, min_len: int, max_len: int | None, n: int, esc: int, need: int, lo: int, hi: int
    ) -> None:
        super().__init__(parent)
        self.min_len, self.max_len, self.n = min_len, max_len, n
        self.esc = esc  # 0: plain; 1: after a backslash; 2..5: hex digits of \uXXXX still due (+1)
        self.need, self.lo, self.hi = need, lo, hi  # UTF-8 continuation bytes due, range of the next

    def _next(self, n: int, esc: int = 0, need: int = 0, lo: int = 0x80, hi: int = 0xBF) -> Str:
        return Str(self.parent, self.min_len, self.max_len, n, esc, need, lo, hi)  # type: ignore[arg-type]

    def feed(self, b: int) -> Frame | None:
        n = self.n
        if self.need:
            return self._next(n, 0, self.need - 1) if self.lo <= b <= self.hi else None
        if self.esc == 1:
            if b in b'"\\/bfnrt':
                return self._next(n)
            return self._next(n, 5) if b == 0x75 else None  # \u + 4 hex digits
        if self.esc:
            return (
                self._next(n, self.esc - 1 if self.esc > 2 else 0) if b in b"0123456789abcdefABCDEF" else None
            )
        if b == 0x22:  # closing quote
            return self.parent.resume(None) if n >= self.min_len else None  # type: ignore[union-attr]
        if self.max_len is not None and n >= self.max_len:
            return None
        if b == 0x5C:  # backslash
            return self._next(n + 1, 1)
        if b < 0x20:  # raw control characters are not allowed in JSON strings
            return None
        if b < 0x80:
            return self._next(n + 1)
        if 0xC2 <= b <= 0xDF:
            return self._next(n + 1, 0, 1)
        if 0xE0 <= b <= 0xEF:  # no overlong forms, no UTF-16 surrogates
            return self._next(n + 1, 0, 2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF)
        if 0xF0 <= b <= 0xF4:
            return self._next(n + 1, 0, 3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF)
        return None

    def own(self) -> int:
        pending = self.need + (self.esc - 1 if self.esc > 1 else self.esc)
        return pending + max(0, self.min_len - self.n) + 1


class Num(Frame):
    """A JSON number (an integer when `integer`): the number grammar as a small DFA."""

    START, MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_DIGITS = range(9)
    ACCEPTING = frozenset({ZERO, INT, FRAC, EXP_DIGITS})
    __slots__ = ("integer", "length", "phase")

    def __init__(self, parent: Frame, integer: bool, phase: int, length: int) -> None:
        super().__init__(parent)
        self.integer, self.phase, self.length = integer, phase, length

    def feed(self, b: int) -> Frame | None:
        p, digit = self.phase, 0x30 <= b <= 0x39
        if p in Num.ACCEPTING and self.length >= NUMBER_BYTES:
            nxt = None  # long enough: only the end of the number may follow
        elif p == Num.START:
            nxt = Num.MINUS if b == 0x2D else Num.ZERO if b == 0x30 else Num.INT if digit else None
        elif p == Num.MINUS:
            nxt = Num.ZERO if b == 0x30 else Num.INT if digit else None
        elif p in (Num.INT, Num.FRAC, Num.EXP_DIGITS) and digit:
            nxt = p
        elif p in (Num.DOT, Num.EXP_SIGN):
            nxt = (Num.FRAC if p == Num.DOT else Num.EXP_DIGITS) if digit else None
        elif p == Num.EXP:
            nxt = Num.EXP_SIGN if b in (0x2B, 0x2D) else Num.EXP_DIGITS if digit else None
        elif self.integer:
            nxt = None
        elif b == 0x2E and p in (Num.ZERO, Num.INT):  # .
            nxt = Num.DOT
        elif b in (0x65, 0x45) and p in (Num.ZERO, Num.INT, Num.FRAC):  # e E
            nxt = Num.EXP
        else:
            nxt = None
        if nxt is not None:
            return Num(self.parent, self.integer, nxt, self.length + 1)  # type: ignore[arg-type]
        if p in Num.ACCEPTING:  # the number ends; the byte belongs to what follows
            return self.parent.resume(None).feed(b)  # type: ignore[union-attr]
        return None

    def own(self) -> int:
        return 0 if self.phase in Num.ACCEPTING else 1

    def can_end(self) -> bool:
        return self.phase in Num.ACCEPTING and self.parent.resume(None).can_end()  # type: ignore[union-attr]


class Obj(Frame):
    """Inside an object: keys (declared ones at most once each), colons, values, commas."""

    FIRST, KEY, COLON, AFTER, NAMING = range(5)  # after "{", after ",", after a key, after a value
    __slots__ = ("_named", "key", "node", "phase", "seen", "ws")

    def __init__(
        self, node: Node, parent: Frame, phase: int, seen: frozenset[str], key: str | None, ws: int
    ) -> None:
        super().__init__(parent)
        self.node, self.phase, self.seen, self.key, self.ws = node, phase, seen, key, ws
        self._named: Obj | None = None  # NAMING with free keys: the state after any name (cached)

    def _to(self, phase: int, seen: frozenset[str] | None = None, key: str | None = None) -> Obj:
        return Obj(self.node, self.parent, phase, self.seen if seen is None else seen, key, 0)  # type: ignore[arg-type]

    def _remaining(self) -> list[str] | None:
        """Property names still allowed (None: any name)."""
        props = self.node.properties
        return None if props is None else [k for k in props if k not in self.seen]

    def _open_key(self) -> Frame | None:
        remaining = self._remaining()
        naming = self._to(Obj.NAMING)
        if remaining is None:
            return Str(naming, 0, None, 0, 0, 0, 0x80, 0xBF)
        if not remaining:
            return None
        return Choice(tuple(dumps(k) for k in remaining), 1, naming)

    def _close(self) -> Frame | None:
        return None if self.node.required - self.seen else self.parent.resume(None)  # type: ignore[union-attr]

    def resume(self, result: bytes | None) -> Frame:
        if self.phase != Obj.NAMING:
            return self
        if result is None:  # a free name: which one does not matter
            if self._named is None:
                self._named = self._to(Obj.COLON)
            return self._named
        return self._to(Obj.COLON, key=self.node.keys.get(result))

    def feed(self, b: int) -> Frame | None:
        phase = self.phase
        if b in WS:
            if self.ws >= WS_RUN:
                return None
            return Obj(self.node, self.parent, phase, self.seen, self.key, self.ws + 1)  # type: ignore[arg-type]
        if phase in (Obj.FIRST, Obj.KEY):
            if b == 0x22:
                return self._open_key()
            return self._close() if b == 0x7D and phase == Obj.FIRST else None
        if phase == Obj.COLON:
            if b != 0x3A:
                return None
            seen = self.seen | {self.key} if self.key is not None else self.seen
            return Value(self.node.value_node(self.key), self._to(Obj.AFTER, seen))
        if phase == Obj.AFTER:
            if b == 0x2C:  # ,
                remaining = self._remaining()
                return self._to(Obj.KEY) if remaining is None or remaining else None
            return self._close() if b == 0x7D else None
        return None

    def own(self) -> int:
        node, phase = self.node, self.phase
        missing = sorted(node.required - self.seen)
        req = sum(kv_len(node, k) for k in missing)
        if phase == Obj.AFTER:
            return req + len(missing) + 1
        if phase == Obj.COLON:
            value = node.value_node(self.key).min_len
            seen = self.seen | {self.key} if self.key is not None else self.seen
            return 1 + value + self._to(Obj.AFTER, seen).own()
        if missing:  # FIRST, KEY: the missing properties, comma-separated, then "}"
            return req + len(missing) - 1 + 1
        if phase == Obj.FIRST:
            return 1
        remaining = self._remaining()  # KEY: one more property is due after the comma
        if remaining is None:
            return 3 + node.value_node(None).min_len + 1
        return min(kv_len(node, k) for k in remaining) + 1


class Arr(Frame):
    """Inside an array: items, commas, the item-count limits."""

    FIRST, NEXT, AFTER = range(3)  # after "[", after ",", after an item
    __slots__ = ("count", "node", "phase", "ws")

    def __init__(self, node: Node, parent: Frame, phase: int, count: int, ws: int) -> None:
        super().__init__(parent)
        self.node, self.phase, self.count, self.ws = node, phase, count, ws

    def feed(self, b: int) -> Frame | None:
        node, phase, count, parent = self.node, self.phase, self.count, self.parent
        assert parent is not None
        if b in WS:
            return Arr(node, parent, phase, count, self.ws + 1) if self.ws < WS_RUN else None
        if phase == Arr.AFTER:
            if b == 0x2C:  # ,
                full = node.max_items is not None and count >= node.max_items
                return None if full else Arr(node, parent, Arr.NEXT, count, 0)
            return parent.resume(None) if b == 0x5D and count >= node.min_items else None
        if phase == Arr.FIRST and b == 0x5D:  # ]
            return parent.resume(None) if node.min_items == 0 else None
        if node.max_items is not None and count >= node.max_items:
            return None
        assert node.items is not None
        return open_value(node.items, Arr(node, parent, Arr.AFTER, count + 1, 0), b)

    def own(self) -> int:
        node, count = self.node, self.count
        item = node.items.min_len + 1  # type: ignore[union-attr]
        if self.phase == Arr.AFTER:
            return max(0, node.min_items - count) * item + 1
        if self.phase == Arr.NEXT:
            return item - 1 + max(0, node.min_items - count - 1) * item + 1
        return node.min_items * item if node.min_items else 1
