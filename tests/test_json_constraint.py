"""The JSON grammar and the constrained sampler: valid JSON always, within the token budget."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from tinytitan.engine import SamplingParams
from tinytitan.serve.json_constraint import JsonSampler, TokenTable, token_table
from tinytitan.serve.json_grammar import Frame, feed_bytes, start
from tinytitan.serve.json_schema import Node, SchemaError, compile_schema, object_node

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", 3, None]}, "minItems": 1, "maxItems": 3},
        "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}]},
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age", "tags"],
    "$defs": {
        "pet": {
            "type": "object",
            "properties": {"kind": {"const": "cat"}, "good": {"type": "boolean"}},
            "required": ["kind"],
        }
    },
}
TREE = {  # recursion through $ref
    "$ref": "#/$defs/node",
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["v"],
        }
    },
}


def complete(node: Node, text: str) -> bool:
    state = feed_bytes(start(node), text.encode())
    return state is not None and state.can_end()


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"a": 1}',
        '{"a":[1,2.5e-3,{"b":null}],"c":"x\\u00e9\\n\\"","d":-0,"e":true,"f":false}',
        '{"unicode": "héllo 世界 🙂"}',
        '{\n  "nested": {"deep": [[], {}]}\n}',
    ],
)
def test_any_object_accepts_valid_json(text: str) -> None:
    assert complete(object_node(), text)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[1]",
        '{"a"}',
        '{"a":01}',
        '{"a":1,}',
        '{"a":tru}',
        '{"a":"\x01"}',
        '{"a":"\\x"}',
        '{"a":1.}',
        '{"a":-}',
        '{"a":1}}',
    ],
)
def test_any_object_rejects_invalid_json(text: str) -> None:
    assert not complete(object_node(), text)
    with contextlib.suppress(ValueError):  # Python's parser agrees: not a JSON object
        assert not isinstance(json.loads(text), dict)


def test_the_document_starts_at_once() -> None:
    assert not complete(object_node(), ' {"a": 1}')  # no whitespace before the value (wasted tokens)


def test_invalid_utf8_is_rejected_byte_by_byte() -> None:
    state = feed_bytes(start(object_node()), b'{"a":"')
    assert feed_bytes(state, b"\xc3\xa9") is not None  # é
    assert feed_bytes(state, b"\xc3\x28") is None  # a lead byte without its continuation
    assert feed_bytes(state, b"\xed\xa0\x80") is None  # a UTF-16 surrogate
    assert feed_bytes(state, b"\xc0\xaf") is None  # an overlong form


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"name":"bob","age":3,"tags":["a"]}', True),
        ('{"tags":["bb",3,null],"age":-12,"name":"x","pet":{"kind":"cat","good":true},"score":1.5}', True),
        ('{"name":"bob","age":3,"tags":["a"],"pet":null,"score":null}', True),
        ('{"name":"bob","age":3.5,"tags":["a"]}', False),  # integer
        ('{"name":"","age":3,"tags":["a"]}', False),  # minLength
        ('{"name":"bobbybobbybobby","age":3,"tags":["a"]}', False),  # maxLength
        ('{"name":"bob","age":3,"tags":[]}', False),  # minItems
        ('{"name":"bob","age":3,"tags":["a","a","a","a"]}', False),  # maxItems
        ('{"name":"bob","age":3,"tags":["c"]}', False),  # enum
        ('{"name":"bob","age":3}', False),  # required
        ('{"name":"bob","age":3,"tags":["a"],"other":1}', False),  # undeclared property
        ('{"name":"bob","name":"bob","age":3,"tags":["a"]}', False),  # repeated property
        ('{"name":"bob","age":3,"tags":["a"],"pet":{"kind":"dog"}}', False),  # const
    ],
)
def test_schema_is_followed(text: str, ok: bool) -> None:
    assert complete(compile_schema(PERSON), text) is ok


def test_recursive_schema() -> None:
    node = compile_schema(TREE)
    assert complete(node, '{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}')
    assert not complete(node, '{"v":1,"kids":[{"kids":[]}]}')
    assert node.min_len == len('{"v":0}')


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "not": {}},
        {"type": "strange"},
        {"anyOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]},
        {"$ref": "https://example.com/schema"},
        {"$ref": "#/$defs/missing"},
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
        {"enum": []},
        {"type": "array", "minItems": -1},
        {
            "$ref": "#/$defs/a",
            "$defs": {"a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]}},
        },
    ],
)
def test_unsupported_or_impossible_schemas_are_refused(schema: dict) -> None:
    with pytest.raises(SchemaError):
        compile_schema(schema)


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _arrays(levels: int) -> dict:
    schema: dict = {"type": "null"}
    for _ in range(levels):
        schema = {"type": "array", "minItems": 100000, "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": 5}, "type must be a type name"),
        ({"type": ["string", None]}, "type must be a type name"),
        ({"type": ["integer", "integer"], "minimum": 0}, None),  # repeats are fine
        ({"$ref": 5}, "$ref must be a string"),
        ({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, "back to"),
        ({"type": "object", "properties": {"a": {}}, "required": 5}, "required must be a list"),
        ({"type": "object", "properties": {"a": {}}, "required": [{"a": 1}]}, "required must be a list"),
        ({"type": "object", "properties": "a"}, "properties must be an object"),
        ({"type": "array", "minItems": 10**15}, "minItems is 1000000000000000; at most 100000"),
        ({"type": "string", "minLength": 10**6}, "minLength is 1000000; at most 100000"),
        ({"type": "array", "maxItems": 10**15}, None),  # beyond any response: no limit
        ({"type": "string", "minLength": 5, "maxLength": 4}, "larger than maxLength"),
        ({"type": "array", "minItems": True}, "minItems must be a non-negative integer"),
        ({"enum": 5}, "enum must be a non-empty list"),
        ({"enum": list(range(1001))}, "at most 1000"),
        ({"type": "object", "properties": {str(i): {} for i in range(5001)}}, "more than 5000 subschemas"),
        (_nested(64), None),
        (_nested(10000), "nested more than 64 levels"),
        (
            {"type": "array", "minItems": 100000, "items": {"type": "array", "minItems": 100000}},
            None,  # long but finite: max_tokens refuses it later, with the length
        ),
        (_arrays(4), "longer than 1099511627776 bytes"),  # 100000 ** 4 items
    ],
)
def test_hostile_schemas_get_one_clear_line(schema: dict, message: str | None) -> None:
    if message is None:
        assert compile_schema(schema).min_len < 1 << 40
        return
    with pytest.raises(SchemaError) as info:
        compile_schema(schema)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "recurses forever" not in str(info.value)


def _shortest_completion(state: Frame) -> int:
    """Follow bytes that lower est() by one: est() must be exact and always reachable this way."""
    steps = 0
    while not state.done:
        nxt = [s for b in range(256) if (s := state.feed(b)) is not None and s.est() == state.est() - 1]
        assert nxt, f"no byte continues the shortest completion from est {state.est()}"
        state, steps = nxt[0], steps + 1
    return steps


@pytest.mark.parametrize(
    ("schema", "doc"),
    [
        (PERSON, '{"tags":["bb",3],"name":"x\\u00e9","pet":{"kind":"cat"},"age":-1.0e5}'),
        (TREE, '{"v":1,"kids":[{"v":2,"kids":[]}]}'),
        (None, '{"a":[1,{"b":"c"}],"d":true}'),
    ],
)
def test_estimate_is_the_shortest_completion(schema: dict | None, doc: str) -> None:
    node = object_node() if schema is None else compile_schema(schema)
    data = doc.encode()
    for i in range(len(data) + 1):
        state = feed_bytes(start(node), data[:i])
        if state is None:  # PERSON's age is an integer: the document is invalid from there on
            break
        assert _shortest_completion(state) == state.est()


# -- the sampler on a small synthetic vocabulary ---------------------------------------------------
_PIECES = [bytes([b]) for b in range(32, 127)] + [
    b"\n", b"  ", b'{"', b'":', b'",', b'"}', b"},", b"name", b"age", b"tags", b' "', b"true", b"null",
    b"12", b"3.5", b"\xc3\xa9", b"\xe4\xb8\x96", b'\\"', b"\\u00", b"]}", b"[[", b"kind", b"cat", b"pet",
]  # fmt: skip
EOS = len(_PIECES)
TABLE = TokenTable([*_PIECES, b""], {EOS})


def _generate(node: Node, params: SamplingParams, max_tokens: int, seed: int) -> tuple[str, int]:
    sampler = JsonSampler(node, TABLE, params, max_tokens)
    gen = torch.Generator().manual_seed(seed)
    out, n = b"", 0
    while not sampler.done and n < max_tokens:
        token = sampler(torch.randn(EOS + 1, generator=gen) * 3)
        n += 1
        if token == EOS:
            break
        out += TABLE.bytes[token]
    return out.decode(), n


@pytest.mark.parametrize("schema", [None, PERSON, TREE])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_logits_always_give_valid_json_within_budget(schema: dict | None, temperature: float) -> None:
    node = object_node() if schema is None else compile_schema(schema)
    for seed in range(12):
        budget = node.min_len + seed * 3
        text, n = _generate(node, SamplingParams(temperature=temperature, seed=seed), budget, seed)
        assert n <= budget
        value = json.loads(text)
        assert isinstance(value, dict)
        if schema is PERSON:
            assert {"name", "age", "tags"} <= value.keys() and isinstance(value["age"], int)
            assert 1 <= len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "bb", 3, None}


def test_too_small_a_budget_is_refused_up_front() -> None:
    node = compile_schema(PERSON)
    with pytest.raises(ValueError, match="too small"):
        JsonSampler(node, TABLE, SamplingParams(), node.min_len - 1)


def test_vocabulary_walk_matches_brute_force(smollm) -> None:
    table = token_table(smollm.tokenizer)
    cases = [
        (PERSON, b""),
        (PERSON, b'{"'),
        (PERSON, b'{"name":"x'),
        (PERSON, b'{"name":"abcdefghij'),  # two characters left before maxLength
        (PERSON, b'{"name":"x","age":1'),
        (PERSON, b'{"tags":["a",'),
        (None, b'{"ke'),  # a free property name
        (None, b'{"k":"\\'),  # an escape
    ]
    for schema, prefix in cases:
        node = object_node() if schema is None else compile_schema(schema)
        sampler = JsonSampler(node, table, SamplingParams(), 40)
        sampler.state = feed_bytes(sampler.state, prefix)
        for budget in (39 - len(prefix), sampler.state.est() - 1):  # roomy, then just enough
            walked = set(sampler._valid(budget).tolist())
            brute = {t for t in range(len(table.bytes)) if sampler._check(t, budget) is not None}
            assert walked == brute and walked, (prefix, budget)
