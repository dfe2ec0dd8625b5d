"""JSON Schema -> a compiled node graph that the JSON parser (`json_grammar`) follows.

Supported keywords: type (one or a list), properties, required, additionalProperties (only without
`properties`: objects with declared properties never get other keys), items, minItems, maxItems,
minLength, maxLength, enum, const, anyOf / oneOf (alternatives of different JSON types), allOf with one
member, nullable, $ref to "#/..." ($defs / definitions, recursion allowed). Keywords that restrict values
further (pattern, format, minimum, ...) are not enforced. Every node knows the length of its shortest
valid value (`min_len`), which the parser needs to close a document in time.

Schemas come from clients, so every keyword's value is checked for its type, and the size is bounded:
at most MAX_DEPTH levels of nesting, MAX_SCHEMAS subschemas and MAX_ENUM values per enum, and minItems /
minLength at most MAX_COUNT (no response could be that long); a maxItems / maxLength above MAX_COUNT is no
limit at all, for the same reason. Anything else is a SchemaError with a one-line message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tinytitan.checks import of_type
from tinytitan.errors import TinyTitanError

KINDS = ("object", "array", "string", "number", "integer", "boolean", "null")
_FIRST_BYTES = {  # the bytes a value of each kind can start with
    "object": b"{",
    "array": b"[",
    "string": b'"',
    "number": b"-0123456789",
    "integer": b"-0123456789",
    "boolean": b"tf",
    "null": b"n",
}
_UNSUPPORTED = ("not", "if", "then", "else", "patternProperties", "prefixItems", "dependentSchemas")
INF = 1 << 62  # the min_len of a schema with no finite instance
LONGEST = 1 << 40  # a finite min_len is capped here: no response comes near it
MAX_DEPTH = 64  # levels of nesting (properties, items, anyOf, $ref, ...)
MAX_SCHEMAS = 5000  # subschemas in one schema
MAX_ENUM = 1000  # values of one enum
MAX_COUNT = 100_000  # minItems / minLength beyond this can never fit in a response


class SchemaError(TinyTitanError):
    """A JSON schema this decoder cannot follow."""


def dumps(value: Any) -> bytes:
    """Compact JSON text, as UTF-8: how enum values and property names must appear."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(eq=False)
class Node:
    """One compiled schema. `kinds` maps each JSON type allowed here to the node describing it (a
    single-type node maps its type to itself; a union maps each type to one alternative)."""

    kinds: dict[str, Node] = field(default_factory=dict)
    literals: tuple[bytes, ...] = ()  # enum / const: the value is exactly one of these JSON texts
    properties: dict[str, Node] | None = None  # None: keys are free, values follow `additional`
    keys: dict[bytes, str] = field(default_factory=dict)  # JSON text of each property name -> name
    required: frozenset[str] = frozenset()
    additional: Node | None = None
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None
    min_length: int = 0
    max_length: int | None = None
    min_len: int = INF  # bytes of the shortest valid value (filled by `compile_schema`)

    def value_node(self, key: str | None) -> Node:
        if self.properties is not None and key is not None:
            return self.properties[key]
        assert self.additional is not None
        return self.additional


def any_node() -> Node:
    """Any JSON value (what `response_format: json_object` allows inside the top-level object)."""
    node = Node()
    node.kinds = {k: node for k in KINDS if k != "integer"}
    node.additional, node.items = node, node
    _fill_min_len([node])
    return node


def object_node() -> Node:
    """Any JSON object: `response_format: {"type": "json_object"}`."""
    node = Node(additional=any_node())
    node.kinds = {"object": node}
    _fill_min_len([node])
    return node


def compile_schema(schema: Any) -> Node:
    """Compile a JSON Schema (a dict, or True for anything) into the node graph the parser follows."""
    compiler = _Compiler(schema)
    root = compiler.node(schema, 0)
    _fill_min_len(compiler.nodes)
    if root.min_len >= INF:
        raise SchemaError("the schema has no finite instance (a required property recurses forever)")
    if root.min_len >= LONGEST:
        raise SchemaError(f"the shortest JSON the schema allows is longer than {LONGEST} bytes")
    return root


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.memo: dict[int, Node] = {}
        self.nodes: list[Node] = []
        self.pending: set[int] = set()  # ids of unions being merged (their `kinds` are incomplete)
        self.following: set[int] = set()  # ids of the $ref schemas being resolved (a $ref loop)
        self.count = 0  # subschemas compiled

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise SchemaError(f"only local $ref ('#/...') is supported, not {ref!r}")
        target = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} does not resolve")
        return target

    def node(self, schema: Any, depth: int) -> Node:
        self.count += 1
        if self.count > MAX_SCHEMAS:
            raise SchemaError(f"the schema has more than {MAX_SCHEMAS} subschemas")
        if depth > MAX_DEPTH:
            raise SchemaError(f"the schema is nested more than {MAX_DEPTH} levels deep")
        if schema is True or schema == {}:
            return any_node()
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or true, got {schema!r:.60}")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str):
                raise SchemaError(f"$ref must be a string, not {ref!r:.60}")
            if id(schema) in self.following:
                raise SchemaError(f"$ref {ref!r:.60} leads back to itself")
            self.following.add(id(schema))
            try:
                return self.node(self.resolve(ref), depth + 1)
            finally:
                self.following.discard(id(schema))
        key = id(schema)
        if key in self.memo:
            return self.memo[key]
        for word in _UNSUPPORTED:
            if word in schema:
                raise SchemaError(f"schema keyword {word!r} is not supported")
        node = Node()
        self.memo[key] = node
        self.nodes.append(node)
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("enum must be a non-empty list")
            if len(values) > MAX_ENUM:
                raise SchemaError(f"enum has {len(values)} values (at most {MAX_ENUM})")
            node.literals = tuple(dict.fromkeys(dumps(v) for v in values))
            return node
        alternatives = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf")
        if alternatives is not None:
            if not isinstance(alternatives, list) or not alternatives:
                raise SchemaError("anyOf / oneOf / allOf must be a non-empty list")
            if "allOf" in schema and len(alternatives) > 1:
                raise SchemaError("allOf with more than one schema is not supported")
            self.pending.add(id(node))
            for alt in alternatives:
                self._merge(node, self.node(alt, depth + 1))
            self.pending.discard(id(node))
            if schema.get("nullable"):
                self._merge(node, self._single("null", {}, depth))
            return node
        types = _types(schema)
        if len(types) == 1:
            node.kinds = {types[0]: node}
            self._fill(node, types[0], schema, depth)
        else:
            self.pending.add(id(node))
            for t in types:
                self._merge(node, self._single(t, schema, depth))
            self.pending.discard(id(node))
        return node

    def _single(self, kind: str, schema: dict[str, Any], depth: int) -> Node:
        node = Node(kinds={})
        node.kinds[kind] = node
        self.nodes.append(node)
        self._fill(node, kind, schema, depth)
        return node

    def _merge(self, union: Node, alt: Node) -> None:
        if id(alt) in self.pending:
            raise SchemaError("a union that contains itself is not supported")
        for kind, sub in alt.kinds.items():
            clash = {"number": "integer", "integer": "number"}.get(kind)
            if kind in union.kinds or clash in union.kinds:
                raise SchemaError(f"anyOf alternatives must have different types ({kind!r} repeats)")
            union.kinds[kind] = sub
        union.literals = tuple(dict.fromkeys(union.literals + alt.literals))
        starts = {lit[0] for lit in union.literals}
        if any(b in starts for kind in union.kinds for b in _FIRST_BYTES[kind]):
            raise SchemaError("anyOf mixes an enum with a type whose values start the same way")

    def _fill(self, node: Node, kind: str, schema: dict[str, Any], depth: int) -> None:
        depth += 1
        if kind == "object":
            props = schema.get("properties")
            if props is not None:
                if not isinstance(props, dict):
                    raise SchemaError("properties must be an object")
                node.properties = {str(k): self.node(v, depth) for k, v in props.items()}
                node.keys = {dumps(k): k for k in node.properties}
                required = schema.get("required", [])
                if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                    raise SchemaError(f"required must be a list of property names, not {required!r:.60}")
                missing = [r for r in required if r not in node.properties]
                if missing:
                    raise SchemaError(f"required properties {missing} are not declared in properties")
                node.required = frozenset(required)
            else:
                extra = schema.get("additionalProperties", True)
                node.additional = self.node(True if extra is False else extra, depth)
                if extra is False:  # no properties and no additional ones: only {}
                    node.properties, node.keys = {}, {}
        elif kind == "array":
            node.items = self.node(schema.get("items", True), depth)
            node.min_items, node.max_items = _counts(schema, "minItems", "maxItems")
        elif kind == "string":
            node.min_length, node.max_length = _counts(schema, "minLength", "maxLength")


def _types(schema: dict[str, Any]) -> list[str]:
    """The JSON types a (non-union, non-enum) schema allows, checked and without repeats."""
    types = schema.get("type")
    if types is None:  # untyped: infer from the keywords present, else anything
        if "properties" in schema or "additionalProperties" in schema or "required" in schema:
            types = "object"
        elif "items" in schema:
            types = "array"
        else:
            types = [k for k in KINDS if k != "integer"]
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise SchemaError(f"type must be a type name or a non-empty list of them, not {types!r:.60}")
    for t in types:
        if t not in KINDS:
            raise SchemaError(f"unknown type {t!r:.60}; known: {', '.join(KINDS)}")
    if schema.get("nullable"):
        types = [*types, "null"]
    types = list(dict.fromkeys(types))
    if "number" in types and "integer" in types:
        types.remove("integer")
    return types


def _counts(schema: dict[str, Any], low: str, high: str) -> tuple[int, int | None]:
    """minItems / maxItems (or minLength / maxLength): checked, bounded, the maximum None for no limit."""
    values = []
    for key in (low, high):
        value = schema.get(key)
        if value is not None and (not of_type(value, int) or value < 0):
            raise SchemaError(f"{key} must be a non-negative integer, not {value!r:.60}")
        values.append(value)
    lo, hi = values
    if lo is not None and lo > MAX_COUNT:
        raise SchemaError(f"{low} is {lo}; at most {MAX_COUNT} is supported (no response could be that long)")
    if hi is not None and hi > MAX_COUNT:
        hi = None  # no response reaches it: no limit
    if lo is not None and hi is not None and lo > hi:
        raise SchemaError(f"{low} ({lo}) is larger than {high} ({hi}): no value fits")
    return lo or 0, hi


def kv_len(node: Node, key: str) -> int:
    """Bytes of `"key":value` with the shortest value."""
    return len(dumps(key)) + 1 + node.properties[key].min_len  # type: ignore[index]


def _kind_min_len(node: Node, kind: str) -> int:
    if kind == "object":
        if node.properties is None:
            return 2
        req = sorted(node.required)
        return 2 + sum(kv_len(node, k) for k in req) + max(0, len(req) - 1)
    if kind == "array":
        n = node.min_items
        return 2 + (n * (node.items.min_len + 1) - 1 if n else 0)  # type: ignore[union-attr]
    if kind == "string":
        return 2 + node.min_length
    return {"number": 1, "integer": 1, "boolean": 4, "null": 4}[kind]


def _fill_min_len(nodes: list[Node]) -> None:
    """Shortest valid value of every node: relax to a fixed point (recursive schemas included).

    Nodes are listed parents first, so going backwards settles a tree in one pass. A finite length is
    capped at LONGEST, which keeps INF (no finite instance) apart from merely huge lengths."""
    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            best = min((len(lit) for lit in node.literals), default=INF)
            for kind, sub in node.kinds.items():
                best = min(best, _kind_min_len(sub, kind))
            if best < INF:
                best = min(best, LONGEST)
            if best < node.min_len:
                node.min_len, changed = best, True
