"""JSON Schema -> a compiled node graph that the JSON parser (`json_grammar`) follows.

Supported keywords: type (one or a list), properties, required, additionalProperties (only without
`properties`: objects with declared properties never get other keys), items, minItems, maxItems,
minLength, maxLength, enum, const, anyOf / oneOf (alternatives of different JSON types), allOf with one
member, nullable, $ref to "#/..." ($defs / definitions, recursion allowed). Keywords that restrict values
further (pattern, format, minimum, ...) are not enforced. Every node knows the length of its shortest
valid value (`min_len`), which the parser needs to close a document in time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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
INF = 1 << 40  # the min_len of a schema with no finite instance


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
    root = compiler.node(schema)
    _fill_min_len(compiler.nodes)
    if root.min_len >= INF:
        raise SchemaError("the schema has no finite instance (a required property recurses forever)")
    return root


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.memo: dict[int, Node] = {}
        self.nodes: list[Node] = []
        self.pending: set[int] = set()  # ids of unions being merged (their `kinds` are incomplete)

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

    def node(self, schema: Any) -> Node:
        if schema is True or schema == {}:
            return any_node()
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or true, got {schema!r:.60}")
        if "$ref" in schema:
            return self.node(self.resolve(schema["$ref"]))
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
                self._merge(node, self.node(alt))
            self.pending.discard(id(node))
            if schema.get("nullable"):
                self._merge(node, self._single("null", {}))
            return node
        types = schema.get("type")
        if types is None:  # untyped: infer from the keywords present, else anything
            if "properties" in schema or "additionalProperties" in schema or "required" in schema:
                types = "object"
            elif "items" in schema:
                types = "array"
            else:
                types = [k for k in KINDS if k != "integer"]
        types = [types] if isinstance(types, str) else list(types)
        if schema.get("nullable"):
            types.append("null")
        for t in dict.fromkeys(types):
            if t not in KINDS:
                raise SchemaError(f"unknown type {t!r}; known: {', '.join(KINDS)}")
        if "number" in types and "integer" in types:
            types.remove("integer")
        if len(types) == 1:
            node.kinds = {types[0]: node}
            self._fill(node, types[0], schema)
        else:
            self.pending.add(id(node))
            for t in types:
                self._merge(node, self._single(t, schema))
            self.pending.discard(id(node))
        return node

    def _single(self, kind: str, schema: dict[str, Any]) -> Node:
        node = Node(kinds={})
        node.kinds[kind] = node
        self.nodes.append(node)
        self._fill(node, kind, schema)
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

    def _fill(self, node: Node, kind: str, schema: dict[str, Any]) -> None:
        if kind == "object":
            props = schema.get("properties")
            if props is not None:
                if not isinstance(props, dict):
                    raise SchemaError("properties must be an object")
                node.properties = {str(k): self.node(v) for k, v in props.items()}
                node.keys = {dumps(k): k for k in node.properties}
                required = schema.get("required", [])
                missing = [r for r in required if r not in node.properties]
                if missing:
                    raise SchemaError(f"required properties {missing} are not declared in properties")
                node.required = frozenset(required)
            else:
                extra = schema.get("additionalProperties", True)
                node.additional = self.node(True if extra is False else extra)
                if extra is False:  # no properties and no additional ones: only {}
                    node.properties, node.keys = {}, {}
        elif kind == "array":
            node.items = self.node(schema.get("items", True))
            node.min_items = _count(schema, "minItems", 0)
            node.max_items = _count(schema, "maxItems", None)
        elif kind == "string":
            node.min_length = _count(schema, "minLength", 0)
            node.max_length = _count(schema, "maxLength", None)


def _count(schema: dict[str, Any], key: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SchemaError(f"{key} must be a non-negative integer")
    return value


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
    """Shortest valid value of every node: relax to a fixed point (recursive schemas included)."""
    changed = True
    while changed:
        changed = False
        for node in nodes:
            best = min((len(lit) for lit in node.literals), default=INF)
            for kind, sub in node.kinds.items():
                best = min(best, _kind_min_len(sub, kind))
            if best < node.min_len:
                node.min_len, changed = best, True
