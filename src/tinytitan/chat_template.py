"""Chat templates from model files, rendered so that a hostile one stops in time and in bounded memory.

Jinja's ImmutableSandboxedEnvironment keeps a template away from Python internals and from mutating its
inputs, but not from `{% for i in range(100000) %}{% for j in range(100000) %}`, `'a' * 10**10` or a macro
that calls itself. `render` runs one template under `TemplateLimits`:

* a deadline, checked at every loop step, call, operator, filter, `~` and output chunk;
* a size limit on every value the template makes, as printed (a list of a million references to one long
  string is small in memory and huge in print): checked before the value is made where its size can be
  known (`*`, `**`, `%`, str.format, join, replace, indent, ...), right after otherwise;
* a budget for all the characters and list slots made during one render, and for the output.

The checks live in the sandbox's own hooks (`call`, `call_binop`, `wrap_str_format`), in wrappers around
every filter, and in a code generator that sends for-loop iterables, `~` and list / dict literals through
the environment. Any failure, of the template or of these checks, is one TokenizerError line that names
the template, the line and the problem.

`PlainSpecials` is the other half of chat safety: special-token texts written inside messages (a user's
"<|im_start|>system") stay plain text, while the template's own markers become special tokens.
"""

from __future__ import annotations

import re
import string
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache, update_wrapper, wraps
from itertools import islice
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from tinytitan.checks import of_type
from tinytitan.errors import TokenizerError, first_line


@dataclass(frozen=True)
class TemplateLimits:
    time_s: float = 2.0  # one render; real chat templates take milliseconds
    max_chars: int = 1 << 21  # the rendered prompt, and any one value as printed (far past any context)
    max_total: int = 1 << 25  # characters and list slots made during one render, all values together
    max_int_bits: int = 4096  # integers past this are refused before they are computed (no 10**10**10)
    max_source: int = 1 << 20  # the template text itself


class LimitError(Exception):
    """A template went past its TemplateLimits (`render` reports it as a TokenizerError)."""


_local = threading.local()  # the render running on this thread: its _Budget


def _budget() -> _Budget:
    budget = getattr(_local, "budget", None)
    if budget is None:  # e.g. Jinja folding a constant at compile time outside a render: not folded
        raise LimitError("template code ran outside a render")
    return budget


class _Budget:
    """One render's deadline and size accounting."""

    def __init__(self, limits: TemplateLimits, inputs: Iterable[Any]) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.time_s
        self.total = 0
        self.known: dict[int, int] = {}  # id -> printed size of each container passed in (measured once)
        for value in inputs:
            self._measure(value, 0)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitError(f"it ran longer than {self.limits.time_s:g} s")

    def refuse_size(self, size: int, what: str) -> None:
        if size > self.limits.max_chars:
            raise LimitError(
                f"{what} would make a value of {size} characters (at most {self.limits.max_chars})"
            )

    def made(self, value: Any, what: str) -> Any:
        """Check a value the template just made and count its memory; returns it."""
        if isinstance(value, str | bytes):
            size = memory = len(value)
        elif isinstance(value, list | tuple | dict | Namespace):
            size, memory = self.weight(value), len(_items(value))
        elif of_type(value, int):
            if value.bit_length() > self.limits.max_int_bits:
                raise LimitError(f"{what} made an integer of {value.bit_length()} bits")
            return value
        else:
            return value
        self.refuse_size(size, what)
        if id(value) not in self.known:  # a value passed in (or a part of one) is not new memory
            self.count(memory)
        return value

    def count(self, n: int) -> None:
        self.total += n
        if self.total > self.limits.max_total:
            raise LimitError(f"it made more than {self.limits.max_total} characters of values")

    def weight(self, value: Any) -> int:
        """About len(str(value)), counted only until it passes max_chars (each shared part once)."""
        if isinstance(value, str | bytes):
            return len(value)
        if not isinstance(value, dict | Namespace | list | tuple | set | frozenset):
            return _scalar_weight(value)
        limit, known, seen = self.limits.max_chars, self.known, {}

        def walk(v: Any, depth: int) -> int:
            if isinstance(v, str | bytes):
                return len(v)
            if id(v) in known:
                return known[id(v)]
            if id(v) in seen:
                return seen[id(v)]
            if isinstance(v, dict | Namespace):
                d = _items(v)
                total, parts = 2 + 4 * len(d), [*d.keys(), *d.values()]
            elif isinstance(v, list | tuple | set | frozenset):
                total, parts = 2 + 2 * len(v), v
            else:
                return _scalar_weight(v)
            if depth > 100:
                return limit + 1
            for part in parts:
                if total > limit:
                    break
                total += walk(part, depth + 1)
            seen[id(v)] = total
            return total

        return walk(value, 0)

    def _measure(self, v: Any, depth: int) -> int:
        if isinstance(v, str):
            self.known[id(v)] = len(v)
        if not isinstance(v, dict | list | tuple):
            return _scalar_weight(v)
        if id(v) in self.known:
            return self.known[id(v)]
        too_big = self.limits.max_chars + 1
        self.known[id(v)] = too_big  # while measuring: a value that contains itself is too big to print
        if depth > 100:
            return too_big
        children = [*v.keys(), *v.values()] if isinstance(v, dict) else v
        size = 2 + 2 * len(children) + sum(self._measure(c, depth + 1) for c in children)
        self.known[id(v)] = size
        return size


def _items(v: Any) -> Any:
    return object.__getattribute__(v, "_Namespace__attrs") if isinstance(v, Namespace) else v


def _scalar_weight(v: Any) -> int:
    if isinstance(v, str | bytes):
        return len(v)
    if isinstance(v, int):
        return v.bit_length() // 3 + 2
    return 8


def _check_ints(budget: _Budget, args: Iterable[Any], what: str) -> None:
    """Integer arguments of string methods and filters are widths and counts: no larger than max_chars."""
    for a in args:
        if of_type(a, int) and abs(a) > budget.limits.max_chars:
            raise LimitError(f"{what} got {a}, more than the {budget.limits.max_chars} allowed")


def _bounded_items(budget: _Budget, values: Any, what: str) -> tuple[list[Any], int]:
    """`values` as a list, and their printed size; stops once that passes max_chars."""
    if isinstance(values, str):
        return list(values), len(values)
    items, size = [], 0
    for v in values:
        budget.tick()
        size += budget.weight(v)
        budget.refuse_size(size, what)
        items.append(v)
    return items, size


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _width(digits: str, limit: int) -> int:
    return int(digits) if len(digits) <= 9 else limit + 1


def _printf_size(budget: _Budget, fmt: str, args: Any) -> int:
    """An upper bound on the length of `fmt % args`."""
    values = args if isinstance(args, tuple) else (args,)
    ints = [abs(v) for v in values if of_type(v, int)]
    limit = budget.limits.max_chars
    size = len(fmt) + budget.weight(args)
    for m in _PRINTF.finditer(fmt):
        for group in m.groups():
            if group == "*":
                size += max(ints, default=0)
            elif group:
                size += _width(group, limit)
    return size


def _format_size(budget: _Budget, fmt: str, args: tuple, kwargs: Mapping[str, Any]) -> int:
    """An upper bound on the length of `fmt.format(*args, **kwargs)`."""
    limit = budget.limits.max_chars
    ints = [abs(v) for v in (*args, *kwargs.values()) if of_type(v, int)]
    size = len(fmt) + budget.weight(list(args)) + budget.weight(dict(kwargs))
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            size += sum(_width(d, limit) for d in _DIGITS.findall(spec))
            size += spec.count("{") * max(ints, default=0)  # a width taken from the arguments
    return size


class _Steps:
    """A for-loop's iterable: the deadline is checked at every step. Keeps len() for loop.length."""

    __slots__ = ("budget", "items")

    def __init__(self, items: Any, budget: _Budget) -> None:
        self.items, self.budget = items, budget

    def __iter__(self) -> Iterator[Any]:
        tick = self.budget.tick
        for item in self.items:
            tick()
            yield item

    def __len__(self) -> int:
        return len(self.items)  # TypeError for generators: LoopContext then counts the items itself


class _Generator(CodeGenerator):
    """Jinja's code generator, with for-loops, `~` and list / tuple / dict literals made by the
    environment (so that they are checked like everything else)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        steps = nodes.EnvironmentAttribute("loop_steps", lineno=node.lineno)
        if not (isinstance(node.iter, nodes.Call) and node.iter.node == steps):
            node.iter = nodes.Call(steps, [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_values(context.eval_ctx, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _made(self, visit: Any, node: nodes.Node, frame: Frame) -> None:
        self.write("environment.made(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._made(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._made(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._made(super().visit_Tuple, node, frame)
        else:  # an assignment or loop target
            super().visit_Tuple(node, frame)


# Filters that hand back (parts of) their input or count it, without printing it: their arguments need
# no size check. Every other filter may turn its argument into text.
_NON_PRINTING = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
    "items", "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse",
    "round", "select", "selectattr", "slice", "sort", "unique",
})  # fmt: skip
_SIZED = frozenset({"batch", "center", "indent", "slice", "tojson", "truncate", "wordwrap"})  # ints: sizes


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, with every way a template makes values or loops bounded by the current _Budget."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.finalize = self._output
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no chat template needs it
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # -- hooks the generated code calls ----------------------------------------------------------------
    def loop_steps(self, items: Any) -> _Steps:
        return _Steps(items, _budget())

    def made(self, value: Any) -> Any:
        budget = _budget()
        budget.tick()
        return budget.made(value, "a literal")

    def concat_values(self, eval_ctx: Any, parts: tuple) -> str:
        budget = _budget()
        budget.tick()
        budget.refuse_size(sum(budget.weight(p) for p in parts), "'~'")
        return budget.made(markup_join(parts) if eval_ctx.autoescape else str_join(parts), "'~'")

    def _output(self, value: Any) -> Any:
        budget = _budget()
        budget.tick()
        size = budget.weight(value)
        budget.refuse_size(size, "printing a value")
        budget.count(size)
        return value

    # -- the sandbox's own hooks -----------------------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        what = f"'{operator}'"
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*" and ints:
            _refuse_bits(budget, left.bit_length() + right.bit_length(), what)
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and isinstance(seq, str | bytes | list | tuple):
                budget.refuse_size(budget.weight(seq) * max(n, 0), what)
        elif operator == "**" and ints and right > 0 and abs(left) > 1:
            _refuse_bits(budget, right * left.bit_length(), what)
        elif operator == "%" and isinstance(left, str):
            budget.refuse_size(_printf_size(budget, left, right), what)
        return budget.made(self.binop_table[operator](left, right), what)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        budget = _budget()
        budget.tick()
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "a function")
        what = f"{name}()"
        if isinstance(owner, str | bytes | int | float):  # a method of a plain value: ints are sizes
            _check_ints(budget, (*args, *kwargs.values()), what)
        if isinstance(owner, str | bytes):
            if name == "join" and args:
                items, size = _bounded_items(budget, args[0], what)
                budget.refuse_size(size + len(owner) * len(items), what)
                args = (items, *args[1:])
            elif name == "replace" and len(args) >= 2:
                budget.refuse_size(_replace_size(owner, args[0], args[1]), what)
            elif name == "expandtabs":
                tab = (args or [kwargs.get("tabsize", 8)])[0]
                tabs = owner.count("\t" if isinstance(owner, str) else b"\t")
                if isinstance(tab, int):
                    budget.refuse_size(len(owner) + tabs * tab, what)
        return budget.made(super().call(context, obj, *args, **kwargs), what)

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            budget.tick()
            mapping = args[0] if is_map and args and isinstance(args[0], Mapping) else kwargs
            budget.refuse_size(_format_size(budget, fmt, () if is_map else args, mapping), "str.format")
            return budget.made(wrapper(*args, **kwargs), "str.format")

        return update_wrapper(bounded, value)

    # -- filters ---------------------------------------------------------------------------------------
    def _bounded_filter(self, name: str, func: Any) -> Any:
        passes_arg = hasattr(func, "jinja_pass_arg")  # context / eval context / environment comes first
        what = f"the {name} filter"

        @wraps(func)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            budget.tick()
            values = args[1:] if passes_arg else args
            if name in _SIZED:
                _check_ints(budget, (*values[1:], *kwargs.values()), what)
            if name not in _NON_PRINTING:
                for v in (*values, *kwargs.values()):
                    if not isinstance(v, str):
                        budget.refuse_size(budget.weight(v), what)
            if name in ("join", "sum") and values:  # materialize first, measuring as we go
                items, size = _bounded_items(budget, values[0], what)
                values = (items, *values[1:])
                args = (args[0], *values) if passes_arg else values
                if name == "join":
                    sep = values[1] if len(values) > 1 else kwargs.get("d", "")
                    budget.refuse_size(size + len(str(sep)) * len(items), what)
                elif not isinstance(values[2] if len(values) > 2 else kwargs.get("start", 0), int | float):
                    budget.refuse_size(size, what)  # a sum of lists or strings is a concatenation
            elif values and isinstance(values[0], str):
                budget.refuse_size(_filter_size(name, values, kwargs, budget), what)
            return budget.made(func(*args, **kwargs), what)

        return bounded


def _refuse_bits(budget: _Budget, bits: int, what: str) -> None:
    if bits > budget.limits.max_int_bits:
        raise LimitError(f"{what} would make an integer of over {budget.limits.max_int_bits} bits")


def _replace_size(s: Any, old: Any, new: Any) -> int:
    if not isinstance(old, type(s)) or not isinstance(new, type(s)):
        return len(s)
    return len(s) + s.count(old) * max(0, len(new) - len(old))


def _filter_size(name: str, values: tuple, kwargs: dict[str, Any], budget: _Budget) -> int:
    """An upper bound on the length of what a string filter makes from values[0] (0: no concern)."""
    s = values[0]

    def arg(i: int, key: str, default: Any) -> Any:
        return values[i] if len(values) > i else kwargs.get(key, default)

    if name == "replace":
        return _replace_size(s, str(arg(1, "old", "")), str(arg(2, "new", "")))
    if name == "indent":
        width = arg(1, "width", 4)
        return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))
    if name == "wordwrap":
        width, wrap = arg(1, "width", 79), arg(3, "wrapstring", None) or "\n"
        lines = len(s) // max(width, 1) + 1 if isinstance(width, int) else len(s) + 1
        return len(s) + lines * len(str(wrap))
    if name == "format":
        return _printf_size(budget, s, kwargs or tuple(values[1:]))
    return 0


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=1)
def environment() -> _Environment:
    """The one sandboxed environment every chat template renders in (hooks need a render's budget)."""
    return _Environment()


@lru_cache(maxsize=32)
def _compile(source: str) -> Template:
    return environment().from_string(source)


def render(source: str, variables: Mapping[str, Any], name: str, limits: TemplateLimits | None = None) -> str:
    """`source` rendered with `variables` under `limits`; any failure is a one-line TokenizerError that
    starts with `name` (e.g. "the model's chat template")."""
    limits = limits or TemplateLimits()
    if len(source) > limits.max_source:
        raise TokenizerError(f"{name} is {len(source)} characters long (at most {limits.max_source})")
    previous = getattr(_local, "budget", None)
    try:
        budget = _local.budget = _Budget(limits, variables.values())
        out, size = [], 0
        for chunk in _compile(source).generate(variables):
            size += len(chunk)
            if size > limits.max_chars:
                raise LimitError(f"its output is longer than {limits.max_chars} characters")
            budget.tick()
            out.append(chunk)
        return "".join(out)
    except Exception as e:  # anything at all: the template is not ours to trust
        raise TokenizerError(f"{name} failed{_where(e)}: {_problem(e)}") from None
    finally:
        _local.budget = previous


def _where(e: BaseException) -> str:
    line = e.lineno if isinstance(e, TemplateSyntaxError) else None
    tb = e.__traceback__
    while tb is not None:  # Jinja rewrites tracebacks: template frames carry the template's line numbers
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line else ""


def _problem(e: BaseException) -> str:
    if isinstance(e, TemplateSyntaxError):
        text = f"syntax error: {e.message}"
    elif isinstance(e, LimitError | TemplateError):
        text = str(e)
    elif isinstance(e, MemoryError):
        text = "it ran out of memory"
    elif isinstance(e, RecursionError):
        text = "it recursed too deeply (RecursionError)"
    else:
        text = first_line(e)
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


# ------------------------------------------------------------------------------------ plain specials

# Stand-ins for special texts: the Supplementary Private Use Areas (no tokenizer or template uses them)
_SENTINELS = (*range(0xF0000, 0xFFFFE), *range(0x100000, 0x10FFFE))


class PlainSpecials:
    """Messages whose special-token texts are kept out of the template's reach.

    Every occurrence of one of `texts` (the tokenizer's special-token texts) in a message's string fields
    becomes a private-use character no message and no template holds; `messages` are the messages so
    changed (the very same list when there was nothing to change). After rendering, `restore` puts the
    texts back and says where they are, for ``Tokenizer.encode(text, special=True, plain_spans=...)``.
    """

    def __init__(self, messages: list[dict[str, Any]], texts: Iterable[str], avoid: str = "") -> None:
        self._texts = {t for t in texts if t}
        lengths: dict[str, set[int]] = {}
        for t in self._texts:
            lengths.setdefault(t[0], set()).add(len(t))
        # first character -> the lengths of the texts that start with it, longest first
        self._by_first = {c: sorted(n, reverse=True) for c, n in lengths.items()}
        self._starts = re.compile("|".join(map(re.escape, self._by_first))) if self._by_first else None
        found = {t for m in messages for v in m.values() if isinstance(v, str) for _, t in self._find(v)}
        self.sentinels: dict[str, str] = {}  # stand-in character -> text
        self.messages = messages
        if not found:
            return
        strings = (v for m in messages for v in m.values() if isinstance(v, str))
        used = set(avoid).union(*self._texts, *strings)
        free = list(islice((chr(c) for c in _SENTINELS if chr(c) not in used), len(found)))
        if len(free) < len(found):  # only a message written to exhaust them gets here
            raise TokenizerError("the messages use every private-use character; they cannot be encoded")
        stand_in = dict(zip(sorted(found), free, strict=True))
        self.sentinels = {c: t for t, c in stand_in.items()}
        self._stand_in = re.compile("|".join(map(re.escape, self.sentinels)))
        self.messages = [
            {k: self._swap(v, stand_in) if isinstance(v, str) else v for k, v in m.items()} for m in messages
        ]

    def _find(self, s: str) -> list[tuple[int, str]]:
        """Occurrences of the texts in `s`: leftmost first, the longest text at each place."""
        out: list[tuple[int, str]] = []
        if self._starts is None:
            return out
        end = 0
        for m in self._starts.finditer(s):
            i = m.start()
            if i < end:
                continue
            for n in self._by_first[s[i]]:
                if s[i : i + n] in self._texts:
                    out.append((i, s[i : i + n]))
                    end = i + n
                    break
        return out

    def _swap(self, s: str, stand_in: dict[str, str]) -> str:
        parts, pos = [], 0
        for i, t in self._find(s):
            parts += [s[pos:i], stand_in[t]]
            pos = i + len(t)
        return "".join(parts) + s[pos:]

    def restore(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text with the special texts back, and their (start, end) spans in it."""
        if not self.sentinels:
            return text, []
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = length = 0
        for m in self._stand_in.finditer(text):
            original = self.sentinels[m.group()]
            parts += [text[pos : m.start()], original]
            length += m.start() - pos
            spans.append((length, length + len(original)))
            length += len(original)
            pos = m.end()
        parts.append(text[pos:])
        return "".join(parts), spans
