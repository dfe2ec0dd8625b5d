"""Fine-tuning data: JSONL to token ids with a loss mask, validated line by line, batched with padding.

Each line is one example, in either form:
- `{"prompt": "...", "completion": "..."}`: plain text; ids = [BOS?] prompt + completion + EOS, the loss
  covers the completion and the EOS (so the model learns to stop);
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`: rendered with the
  model's chat template; the loss covers every assistant reply and the template's end-of-turn text after
  it. The prompt before each reply is tokenized exactly as `Model.chat_prompt_ids` tokenizes it at
  inference, so training and generation see the same token boundary.

Batches are right-padded: with causal attention a real position never sees the padding after it, so no
attention mask is needed, and padded positions carry the label IGNORE, so they never count in the loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinytitan.errors import DataError

IGNORE = -100  # label of a position that does not count in the loss (prompt, padding)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list[int]  # the whole sequence
    labels: list[int]  # next-token targets aligned with ids (labels[i] is predicted at position i - 1)
    where: str  # "file:line", for messages

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def read_examples(path: str | Path, tokenizer, max_len: int) -> list[Example]:
    """Every line of a JSONL file as an Example; the first bad line raises DataError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        out.append(encode_example(obj, tokenizer, max_len, where))
    if not out:
        raise DataError(f"{path}: no examples (expected one JSON object per line)")
    return out


def encode_example(obj: Any, tokenizer, max_len: int, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        ids, labels = _encode_chat(obj["messages"], tokenizer, where)
    elif "prompt" in obj or "completion" in obj:
        ids, labels = _encode_pair(obj, tokenizer, where)
    else:
        raise DataError(
            f'{where}: an example needs "prompt" and "completion", or "messages"; found {sorted(obj)[:6]}'
        )
    if len(ids) > max_len:
        raise DataError(
            f"{where}: the example is {len(ids)} tokens, longer than the limit of {max_len} "
            "(shorten it, drop it, or raise --max-len)"
        )
    return Example(ids, labels, where)


def _text_field(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f'{where}: missing field "{key}"')
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, found {type(value).__name__}')
    return value


def _encode_pair(obj: dict[str, Any], tokenizer, where: str) -> tuple[list[int], list[int]]:
    prompt, completion = _text_field(obj, "prompt", where), _text_field(obj, "completion", where)
    if not completion.strip():
        raise DataError(f"{where}: empty completion (nothing to learn from)")
    p = tokenizer.encode(prompt) if prompt else ([tokenizer.bos_id] if tokenizer.add_bos else [])
    c = tokenizer.encode(completion, add_bos=False)
    eos = tokenizer.eos_id
    if eos is not None:
        c = [*c, eos]
    return _join([(p, False), (c, True)])


def _encode_chat(messages: Any, tokenizer, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: message {i} needs a string "content"')
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has role {m.get('role')!r}; expected one of {ROLES}")
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    for i in replies:
        if not messages[i]["content"].strip():
            raise DataError(f"{where}: assistant message {i} is empty (nothing to learn from)")
    from tinytitan.chat_template import PlainSpecials

    template = _template(tokenizer, where)
    # special-token texts inside the messages stay plain text, as in Model.chat_prompt_ids
    plain = PlainSpecials(messages, tokenizer.special_texts(), avoid=tokenizer.chat_template or "")
    messages = plain.messages
    pieces: list[tuple[list[int], bool]] = []
    done = ""  # the rendered text already turned into pieces
    for i in replies:
        prompt_text = template(messages[:i], True)
        full_text = template(messages[: i + 1], False)
        if not (prompt_text.startswith(done) and full_text.startswith(prompt_text)):
            raise DataError(f"{where}: the chat template does not render the conversation incrementally")
        prompt = _encode_segment(tokenizer, prompt_text[len(done) :], plain, first=not done)
        pieces.append((prompt, False))
        pieces.append((_encode_segment(tokenizer, full_text[len(prompt_text) :], plain, first=False), True))
        done = full_text
    return _join(pieces)


def _template(tokenizer, where: str):
    from tinytitan.errors import TokenizerError

    def render(msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None

    return render


def _encode_segment(tokenizer, text: str, plain, first: bool) -> list[int]:
    """Template text to ids the way Model.chat_prompt_ids does: the template's special tokens are real
    tokens, the messages' special-token texts plain text (`plain`: a PlainSpecials), and BOS only at the
    start, only when the model wants one and the template did not write it."""
    add_bos = False
    if first and tokenizer.add_bos:
        bos = tokenizer.bos_id
        add_bos = not (bos is not None and text.startswith(tokenizer.id_to_token(bos)))
    text, spans = plain.restore(text)
    return tokenizer.encode(text, add_bos=add_bos, special=True, plain_spans=spans)


def _join(pieces: list[tuple[list[int], bool]]) -> tuple[list[int], list[int]]:
    """Concatenate pieces; a piece marked True is a target. labels[i] = ids[i] where ids[i] is a target."""
    ids: list[int] = []
    labels: list[int] = []
    for toks, target in pieces:
        ids += toks
        labels += toks if target else [IGNORE] * len(toks)
    return ids, labels


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] right-padded
    targets: torch.Tensor  # [B, T]: the token to predict at each position, IGNORE where none counts
    n_tokens: int  # real (unpadded) tokens
    n_target: int  # positions that count in the loss


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest; targets are the labels shifted left by one (predict the next token)."""
    t = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        targets[b, : len(e.ids) - 1] = torch.tensor(e.labels[1:])
    return Batch(ids, targets, sum(len(e.ids) for e in examples), int((targets != IGNORE).sum()))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of the examples, a pure function of (seed, epoch): resuming replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(examples: list[Example], order: list[int], batch_size: int) -> Iterator[list[Example]]:
    for s in range(0, len(order), batch_size):
        yield [examples[i] for i in order[s : s + batch_size]]
