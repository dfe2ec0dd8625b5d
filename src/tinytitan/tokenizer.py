"""Text <-> token ids, with the same ids llama.cpp produces for the same GGUF file.

Two GGUF tokenizer families are supported, both run by the Hugging Face `tokenizers` library:

* ``llama`` (SentencePiece-style BPE, e.g. Gemma 3): the file has token scores but no merge list.
  llama.cpp merges the adjacent pair whose joined text is a token with the highest score, so we derive
  a merge list from the vocabulary, ranked by the score of the token each merge produces.
* ``gpt2`` (byte-level BPE, e.g. SmolLM2): the file has a ranked merge list; text is first split by the
  pre-tokenizer regexes llama.cpp uses for the file's ``tokenizer.ggml.pre`` value.

Special tokens are split out of the text before either model runs, in llama.cpp's order (longest token
text first). A Hugging Face ``tokenizer.json`` directory goes through the same code path.
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tinytitan.checks import of_type
from tinytitan.errors import TinyTitanError, TokenizerError, first_line
from tinytitan.io.folders import atomic_path

if TYPE_CHECKING:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from tinytitan.chat_template import TemplateLimits

SPACE_ESCAPE = "\u2581"  # "▁": SentencePiece writes spaces as this character inside tokens
CACHE_DIR = Path.home() / ".cache" / "tinytitan" / "tokenizers"
_MERGES_CACHE_VERSION = "spm-merges-v1"  # bump when the derived-merge recipe changes


class Attr:
    """Token attribute bits, as llama.cpp derives them from GGUF ``tokenizer.ggml.token_type``.

    Plain ints, not an IntFlag: they are combined for every token of a 262k vocabulary.
    """

    UNDEFINED = 0
    UNKNOWN = 1
    UNUSED = 2
    NORMAL = 4
    CONTROL = 8
    USER_DEFINED = 16
    BYTE = 32


# GGUF token_type value -> attribute (0 undefined, 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)
_TOKEN_TYPE_ATTR = {
    0: Attr.UNDEFINED,
    1: Attr.NORMAL,
    2: Attr.UNKNOWN,
    3: Attr.CONTROL,
    4: Attr.USER_DEFINED,
    5: Attr.UNUSED,
    6: Attr.BYTE,
}

# Token texts llama.cpp treats as end of generation (and forces to CONTROL if the file says otherwise).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
    "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "</s>", "<eos>",
})  # fmt: skip
# FIM pad / repo / file-separator tokens: llama.cpp also stops on these (first match of each list).
_FIM_EOG_TEXTS = (
    ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("<|file_sep|>",),
)
# Other FIM markers llama.cpp forces to CONTROL (they change how the text around them is split).
_FIM_CONTROL_TEXTS = frozenset({
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>",
})  # fmt: skip

# Pre-tokenizer regexes, keyed by GGUF `tokenizer.ggml.pre`. llama.cpp applies the list in order, each
# regex splitting the pieces left by the previous one; text a regex does not match stays a piece.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells the (?i:...) contraction group as explicit ASCII classes: do the same, so that
# e.g. U+017F (long s, which case-folds to "s") is not taken as a contraction.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + (
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]
    clean_spaces: bool  # detokenize drops the space before ?!., and in front of 's 'm 're 've
    ignore_merges: bool = False  # a whole pre-token that is already in the vocab is taken as is
    add_bos: bool = False  # default when the file has no tokenizer.ggml.add_bos_token


_PRE_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), True)
_PRE_GPT2 = PreTokenizer((_GPT2,), True)
_PRE_LLAMA3 = PreTokenizer((_LLAMA3,), True, ignore_merges=True, add_bos=True)
_PRE_QWEN2 = PreTokenizer((_QWEN2,), False)
_PRE_SMOLLM = PreTokenizer((r"\p{N}", _GPT2), False)  # digits are always single tokens

PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _PRE_DEFAULT,
    "gpt2": _PRE_GPT2,
    "gpt-2": _PRE_GPT2,
    "llama3": _PRE_LLAMA3,
    "llama-v3": _PRE_LLAMA3,
    "llama-bpe": _PRE_LLAMA3,
    "qwen2": _PRE_QWEN2,
    "smollm": _PRE_SMOLLM,
    "starcoder": PreTokenizer(_PRE_SMOLLM.regexes, True),
}

# Chat templates for files that carry none, keyed by general.architecture. Gemma has no system role:
# a system message is folded into the first user turn, as Gemma's own template does.
_GEMMA_TEMPLATE = (
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.prefix = ns.prefix + (m['content'] | trim) + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + ns.prefix + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- set ns.prefix = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
BUILTIN_CHAT_TEMPLATES = {  # GGUF general.architecture, or config.json model_type for HF directories
    arch: _GEMMA_TEMPLATE for arch in ("gemma", "gemma2", "gemma3", "gemma3_text")
}


class Tokenizer:
    """llama.cpp-compatible encode/decode. Build with `from_gguf`, `from_gguf_path` or `from_hf_dir`."""

    def __init__(
        self,
        *,
        backend: HFTokenizer,
        tokens: list[str],
        attrs: list[int],
        byte_level: bool,
        escape_spaces: bool,
        add_space_prefix: bool,
        clean_spaces: bool,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: set[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        architecture: str | None = None,
    ) -> None:
        self._backend = backend  # runs one fragment of plain text; knows no special tokens
        self._tokens = tokens
        self._attrs = attrs
        self._byte_level = byte_level  # GPT-2 byte-to-unicode token text (else ▁ + <0xNN> byte tokens)
        self._escape_spaces = escape_spaces  # we turn " " into "▁" before the backend runs
        self.add_space_prefix = add_space_prefix
        self._clean_spaces = clean_spaces
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self.architecture = architecture
        # llama.cpp splits these out of the text longest-first; CONTROL/UNKNOWN ones only when asked to
        # (an empty text would match everywhere: such a token is never split out)
        flags = Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN
        special = [i for i, a in enumerate(attrs) if a & flags and tokens[i]]
        special.sort(key=lambda i: -len(tokens[i].encode()))
        self._special_all = [(tokens[i], i) for i in special]
        self._special_user = [(tokens[i], i) for i in special if not attrs[i] & (Attr.CONTROL | Attr.UNKNOWN)]
        self._user_texts = {t for t, _ in self._special_user}  # split out with or without `special`
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._pieces: list[bytes | None] = [None] * len(tokens)  # lazily filled token_to_bytes cache

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_gguf_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        from tinytitan.io.gguf import read_metadata

        return cls.from_gguf(read_metadata(path), where=str(path))

    @classmethod
    def from_gguf(cls, fields: dict[str, Any], where: str | None = None) -> Tokenizer:
        """Build from GGUF metadata: key -> Python value (arrays as lists). Every field is checked for its
        type first; a vocabulary the tokenizers library still refuses is a TokenizerError too. `where`
        (the file) starts the error's message."""
        try:
            _check_gguf_fields(fields)
            return cls._from_gguf(fields)
        except TinyTitanError as e:
            if where is None:
                raise
            raise TokenizerError(f"{where}: {e}") from None
        except Exception as e:  # the tokenizers library raises plain Exception for what it refuses
            prefix = f"{where}: " if where else ""
            raise TokenizerError(f"{prefix}the GGUF tokenizer cannot be built: {first_line(e)}") from None

    @classmethod
    def _from_gguf(cls, fields: dict[str, Any]) -> Tokenizer:
        model = _require(fields, "tokenizer.ggml.model")
        tokens: list[str] = list(_require(fields, "tokenizer.ggml.tokens"))
        n = len(tokens)
        types = fields.get("tokenizer.ggml.token_type")
        if types is None:  # no types in the file: every token is normal
            types = [1] * n
        attrs = [_TOKEN_TYPE_ATTR.get(int(t), Attr.UNDEFINED) for t in types[:n]]
        if len(attrs) < n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(attrs)} entries for {n} tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != n:
            raise TokenizerError("the GGUF vocabulary has duplicate tokens")

        if model == "llama":
            scores = fields.get("tokenizer.ggml.scores")
            if scores is None:
                scores = [0.0] * n
            backend = _build_spm_backend(tokens, vocab, [float(s) for s in scores[:n]])
            byte_level, escape, clean, pre_add_bos = False, True, False, True
            add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            bos_default, eos_default = 1, 2
        elif model == "gpt2":
            pre_name = fields.get("tokenizer.ggml.pre") or "default"
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise TokenizerError(
                    f"unsupported pre-tokenizer {pre_name!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
                )
            merges = [_split_merge(m) for m in _require(fields, "tokenizer.ggml.merges")]
            backend = _build_bpe_backend(vocab, merges, pre)
            byte_level, escape, clean, pre_add_bos = True, False, pre.clean_spaces, pre.add_bos
            add_space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", False))
            bos_default, eos_default = 11, 11  # llama.cpp's defaults for BPE files without the keys
        else:
            raise TokenizerError(f"unsupported tokenizer model {model!r}; supported: 'llama', 'gpt2'")

        def special_id(key: str, default: int | None) -> int | None:
            value = fields.get(key, default)
            return int(value) if value is not None and 0 <= int(value) < n else None

        bos_id = special_id("tokenizer.ggml.bos_token_id", bos_default)
        eos_id = special_id("tokenizer.ggml.eos_token_id", eos_default)
        eos_ids = _promote_eog(vocab, attrs, eos_id, special_id("tokenizer.ggml.eot_token_id", None))
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", pre_add_bos))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is true but there is no BOS token")
        return cls(
            backend=backend,
            tokens=tokens,
            attrs=attrs,
            byte_level=byte_level,
            escape_spaces=escape,
            add_space_prefix=add_space_prefix,
            clean_spaces=clean,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            add_eos=add_eos and eos_id is not None,
            chat_template=fields.get("tokenizer.chat_template"),
            architecture=fields.get("general.architecture"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face directory: tokenizer.json (+ tokenizer_config.json, config.json); a
        malformed file is a TokenizerError naming the folder."""
        try:
            return cls._from_hf_dir(path)
        except TinyTitanError:
            raise
        except Exception as e:  # malformed JSON or fields of the wrong shape, or the library's refusal
            raise TokenizerError(f"{path}: the tokenizer files are malformed: {first_line(e)}") from None

    @classmethod
    def _from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise TokenizerError(f"no tokenizer.json in {root}")
        spec = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
        config = _read_json(root / "tokenizer_config.json")
        model_type = spec.get("model", {}).get("type")
        if model_type != "BPE":
            raise TokenizerError(f"unsupported tokenizer.json model {model_type!r}; supported: 'BPE'")

        # The backend must not know the added tokens: we split them out ourselves (llama.cpp's way),
        # and it must not add BOS/EOS on its own.
        added = spec.pop("added_tokens", None) or []
        post = spec.pop("post_processor", None) or {}
        backend = HFTokenizer.from_str(json.dumps(spec))
        vocab = dict(spec["model"]["vocab"])
        for tok in added:
            vocab[tok["content"]] = tok["id"]
        n = max(vocab.values()) + 1
        tokens = [f"[EMPTY_{i}]" for i in range(n)]  # llama.cpp's name for holes in the id range
        for text, i in vocab.items():
            tokens[i] = text

        byte_level = "ByteLevel" in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        byte_fallback = bool(spec["model"].get("byte_fallback"))
        attrs = [Attr.NORMAL] * n
        if byte_fallback:
            for b in range(256):
                byte_id = vocab.get(f"<0x{b:02X}>")
                if byte_id is not None:
                    attrs[byte_id] = Attr.BYTE
        for tok in added:
            attrs[tok["id"]] = Attr.CONTROL if tok.get("special") else Attr.USER_DEFINED
        normalizer = json.dumps(spec.get("normalizer"))
        add_space_prefix = not byte_level and ('"Prepend"' in normalizer or _metaspace_prepends(spec))

        def token_id(key: str) -> int | None:
            value = config.get(key)
            text = value.get("content") if isinstance(value, dict) else value
            return vocab.get(text) if text else None

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # no explicit flag: BOS is added if the post-processor put it first
            first = (post.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
            add_bos = first is not None and vocab.get(first) == bos_id
        eos_ids = _promote_eog(vocab, attrs, eos_id, None)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(
            backend=backend,
            tokens=tokens,
            attrs=attrs,
            byte_level=byte_level,
            escape_spaces=False,  # the tokenizer.json normalizer does it
            add_space_prefix=add_space_prefix,
            clean_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            add_bos=bool(add_bos) and bos_id is not None,
            chat_template=template,
            architecture=_read_json(root / "config.json").get("model_type"),
        )

    # ---------------------------------------------------------------- encode

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        special: bool = False,
        plain_spans: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """Token ids for `text`, as llama.cpp's tokenize(text, add_special=add_bos, parse_special=special).

        `add_bos` None follows the file; True adds BOS only when the file asks for it (like llama.cpp).
        With `special`, control-token texts such as "<start_of_turn>" become those tokens, except where
        they overlap one of `plain_spans` ((start, end) character ranges, e.g. what a chat's user wrote),
        which are read as with `special` False. User-defined tokens (e.g. Gemma's runs of spaces and
        newlines) are always split out.
        """
        add_special = self.add_bos if add_bos is None else add_bos
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        prev_special = True  # SentencePiece prefixes a space to text at the start or after a special token
        for frag in self._partition(text, special, plain_spans):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if self._escape_spaces:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                frag = frag.replace(" ", SPACE_ESCAPE)
            out.extend(self._backend.encode(frag, add_special_tokens=False).ids)
            prev_special = False
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def special_texts(self) -> list[str]:
        """The texts `encode` reads as tokens only with `special` (control and unknown tokens)."""
        return [t for t, _ in self._special_all if t not in self._user_texts]

    def _partition(
        self, text: str, special: bool, plain_spans: Sequence[tuple[int, int]] = ()
    ) -> list[str | int]:
        """Split special-token texts out of `text`: llama.cpp's tokenizer_st_partition.

        One token at a time, longest text first, every occurrence in every remaining text fragment. This
        is not leftmost-longest matching: a longer token wins even when a shorter one starts earlier.
        With `special`, a control token overlapping one of `plain_spans` stays text.
        """
        spans = sorted(plain_spans) if special else []
        starts = [a for a, _ in spans]

        def plain(i: int, j: int) -> bool:  # does [i, j) overlap a span?
            k = bisect.bisect_left(starts, j) - 1
            return k >= 0 and spans[k][1] > i

        frags: list[tuple[int, str] | int] = [(0, text)] if text else []  # text fragments keep their offset
        for tok_text, tok_id in self._special_all if special else self._special_user:
            if tok_text not in text:
                continue
            checked, n = bool(spans) and tok_text not in self._user_texts, len(tok_text)
            split: list[tuple[int, str] | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok_text not in frag[1]:
                    split.append(frag)
                    continue
                off, s = frag
                cut = pos = 0
                while (i := s.find(tok_text, pos)) >= 0:
                    if checked and plain(off + i, off + i + n):
                        pos = i + 1
                        continue
                    if i > cut:
                        split.append((off + cut, s[cut:i]))
                    split.append(tok_id)
                    cut = pos = i + n
                if cut < len(s):
                    split.append((off + cut, s[cut:]))
            frags = split
        return [f if isinstance(f, int) else f[1] for f in frags]

    # ---------------------------------------------------------------- decode

    def token_to_bytes(self, id: int, special: bool = True) -> bytes:
        """The bytes token `id` contributes to the text (llama.cpp's token_to_piece).

        Byte tokens give their byte, "▁" gives a space, GPT-2 byte-level characters map back to bytes.
        Control tokens give their own text, or nothing when `special` is False.
        """
        attr = self._attrs[id]
        if not special and attr & (Attr.CONTROL | Attr.UNKNOWN):
            return b""
        piece = self._pieces[id]
        if piece is None:
            piece = self._pieces[id] = self._piece(id)
        return piece

    def _piece(self, id: int) -> bytes:
        text, attr = self._tokens[id], self._attrs[id]
        if attr & (Attr.CONTROL | Attr.UNKNOWN | Attr.USER_DEFINED):
            return text.encode()  # verbatim: no ▁ or byte-level unescaping
        if attr & Attr.NORMAL:
            if not self._byte_level:
                return text.replace(SPACE_ESCAPE, " ").encode()
            out = bytearray()
            for ch in text:
                byte = self._byte_decoder.get(ch)
                if byte is None:  # not a byte-level character: llama.cpp writes this marker
                    out += f"[UNK_BYTE_0x{ch.encode().hex()}{text}]".encode()
                else:
                    out.append(byte)
            return bytes(out)
        if attr & Attr.BYTE:
            return bytes([int(text[3:5], 16)])  # "<0x0A>" -> b"\n"
        return b""  # UNUSED / UNDEFINED tokens render as nothing

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text for `ids`, as llama.cpp's detokenize(remove_special=skip_special, unparse_special=not it).

        With add_space_prefix, the space SentencePiece put in front of the text is dropped from the first
        piece, except when a leading BOS was removed: llama.cpp keeps it then, and so do we.
        """
        ids = list(ids)
        strip_space = self.add_space_prefix  # undo the space SentencePiece put in front of the text
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids = ids[1:]
            strip_space = False
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        out = bytearray()
        for i in ids:
            piece = self.token_to_bytes(i, special=not skip_special)
            if strip_space and piece.startswith(b" "):
                piece = piece[1:]
            strip_space = False
            out += piece
        if self._clean_spaces:
            out = bytearray(_clean_spaces(bytes(out)))
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, id: int) -> str:
        """The raw vocabulary entry of `id` (with ▁ / byte-level characters as stored)."""
        return self._tokens[id]

    def is_control(self, id: int) -> bool:
        return bool(self._attrs[id] & Attr.CONTROL)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        limits: TemplateLimits | None = None,
    ) -> str:
        """Render a chat as prompt text, to be encoded with ``encode(text, special=True)``.

        Uses the file's Jinja template, else the architecture's known turn format. The template runs
        sandboxed and bounded (`tinytitan.chat_template`: 2 s, 2 Mi characters by default); any failure
        is a one-line TokenizerError. A BOS written by the template is dropped when `encode` adds one
        anyway, so the prompt has exactly one.
        """
        # here, not at import: jinja2's sandbox costs 0.1 s of CLI start
        from tinytitan.chat_template import render

        template: str | None = self.chat_template
        name = "the model's chat template"
        if not template:
            template = BUILTIN_CHAT_TEMPLATES.get(self.architecture or "")
            name = f"the built-in {self.architecture} chat template"
        if template is None:
            raise TokenizerError(
                f"the model has no chat template and none is built in for architecture "
                f"{self.architecture!r} (built in: {', '.join(sorted(BUILTIN_CHAT_TEMPLATES))})"
            )
        bos = self._tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self._tokens[self.eos_id] if self.eos_id is not None else ""
        variables = {
            "messages": messages, "add_generation_prompt": add_generation_prompt, "bos_token": bos,
            "eos_token": eos,
        }  # fmt: skip
        text = render(template, variables, name, limits)
        if self.add_bos and bos and text.startswith(bos):
            text = text[len(bos) :]
        return text


class StreamDecoder:
    """Turns generated ids into text piece by piece, never splitting a multi-byte character.

    A character spread over several byte tokens (CJK, emoji) is held back until its last byte arrives;
    bytes that can never form valid UTF-8 come out as U+FFFD. Pieces are not space-stripped or cleaned,
    as llama.cpp streams them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_bytes(id, special=not self._skip_special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


# -------------------------------------------------------------------- backends


def _build_spm_backend(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> HFTokenizer:
    """A `tokenizers` BPE equivalent to llama.cpp's SentencePiece merger.

    llama.cpp starts from single characters and repeatedly joins the adjacent pair whose joined text is
    a vocabulary token with the highest score (ties: leftmost). Ranking every such (left, right) pair
    by the score of the token it forms gives the same result; characters that are not tokens fall back
    to <0xNN> byte tokens. Any token can be formed this way, control tokens included, as in llama.cpp.
    """
    pairs = _cached_spm_merges(tokens, scores, vocab)
    text = np.array(tokens, dtype=object)  # fancy indexing picks the strings without int objects per id
    merges = list(zip(text[pairs[:, 0]], text[pairs[:, 1]], strict=True))
    unk = next((t for t in ("<unk>", "<UNK>") if t in vocab), None)
    return HFTokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True))


def _cached_spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> np.ndarray:
    """Derived merges as (left id, right id) rows, best first, cached on disk by vocabulary hash."""
    digest = hashlib.sha256(_MERGES_CACHE_VERSION.encode())
    digest.update("\0".join(tokens).encode())
    digest.update(np.asarray(scores, dtype=np.float32).tobytes())
    path = CACHE_DIR / f"{digest.hexdigest()}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    pairs = _derive_spm_merges(tokens, scores, vocab)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # readers never see a half-written file
            np.save(f, pairs)
    except OSError:
        pass  # read-only home: the cache is an optimisation only
    return pairs


def _derive_spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> np.ndarray:
    rows = []
    for tid, tok in enumerate(tokens):
        for k in range(1, len(tok)):
            left = vocab.get(tok[:k])
            if left is not None:
                right = vocab.get(tok[k:])
                if right is not None:
                    rows.append((-scores[tid], tid, k, left, right))
    rows.sort()  # highest score first; ties by token id, then split point (deterministic)
    return np.array([(r[3], r[4]) for r in rows], dtype=np.int32).reshape(-1, 2)


def _build_bpe_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], pre: PreTokenizer
) -> HFTokenizer:
    backend = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    # split first, then map every byte to its printable GPT-2 stand-in (the regexes see real text)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    # Split at the first space after the first character: a merge's left side may itself be " ".
    pos = merge.find(" ", 1)
    if pos < 0:
        raise TokenizerError(f"malformed BPE merge {merge!r}")
    return merge[:pos], merge[pos + 1 :]


def _promote_eog(index: dict[str, int], attrs: list[int], eos_id: int | None, eot_id: int | None) -> set[int]:
    """End-of-generation ids, by llama.cpp's rules; marks those tokens CONTROL (mutates `attrs`).

    llama.cpp recognises these tokens by their text and treats them as control tokens even when the
    file calls them user-defined (Gemma's "</s>"), which changes how "</s>" in plain text is split.
    """
    eog = {i for i in (eos_id, eot_id) if i is not None}
    for texts in _FIM_EOG_TEXTS:
        found = next((index[t] for t in texts if t in index), None)
        if found is not None:
            eog.add(found)
            attrs[found] |= Attr.CONTROL
    for text in _EOG_TEXTS:
        if text in index:
            eog.add(index[text])
            attrs[index[text]] |= Attr.CONTROL
    for text in _FIM_CONTROL_TEXTS:
        if text in index:
            attrs[index[text]] |= Attr.CONTROL
    return eog


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces for BPE vocabularies (three passes, in this order)."""
    for before, after in ((b" ?", b"?"), (b" !", b"!"), (b" .", b"."), (b" ,", b",")):
        text = text.replace(before, after)
    text = _strip_lone_apostrophes(text)
    for before, after in ((b" 's", b"'s"), (b" 'm", b"'m"), (b" 're", b"'re"), (b" 've", b"'ve")):
        text = text.replace(before, after)
    return text


def _strip_lone_apostrophes(text: bytes) -> bytes:
    # " ' " -> "'": both spaces around an apostrophe go, scanning left to right.
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i : i + 3] == b" ' ":
            out += b"'"
            i += 3
        else:
            out.append(text[i])
            i += 1
    return bytes(out)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to U+0100 upwards in byte order (so a space is "Ġ", a newline "Ċ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _metaspace_prepends(spec: dict[str, Any]) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in items)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The sandbox chat templates render in (bounded in time and size: tinytitan.chat_template)."""
    from tinytitan.chat_template import environment

    return environment()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# GGUF tokenizer fields and the types they must have (a hostile file gives ints for tokens, strings for
# ids...): checked before anything is built, so the error names the field.
_MAX_TOKENS = 1 << 22
_LISTS = {
    "tokenizer.ggml.tokens": (str,),
    "tokenizer.ggml.token_type": (int,),
    "tokenizer.ggml.scores": (int, float),
    "tokenizer.ggml.merges": (str,),
}
_IDS = ("bos", "eos", "eot", "unknown", "padding", "seperator", "mask")
_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template", "general.architecture")


def _check_gguf_fields(fields: dict[str, Any]) -> None:
    for key, kinds in _LISTS.items():
        value = fields.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise TokenizerError(f"GGUF metadata {key} must be an array, not {type(value).__name__}")
        if len(value) > _MAX_TOKENS:
            raise TokenizerError(f"GGUF metadata {key} has {len(value)} entries (at most {_MAX_TOKENS})")
        bad = next((v for v in value if not of_type(v, kinds)), None)
        if bad is not None:
            names = "/".join(k.__name__ for k in kinds)
            raise TokenizerError(f"GGUF metadata {key} holds {bad!r}, not {names}")
    if not fields.get("tokenizer.ggml.tokens", [None]):
        raise TokenizerError("GGUF metadata tokenizer.ggml.tokens is empty")
    for name in _IDS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = fields.get(key)
        if value is not None and not of_type(value, int):
            raise TokenizerError(f"GGUF metadata {key} must be an integer, not {value!r}")
    for key in _STRINGS:
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            raise TokenizerError(f"GGUF metadata {key} must be a string, not {type(value).__name__}")


def _require(fields: dict[str, Any], key: str) -> Any:
    if key not in fields:
        raise TokenizerError(f"GGUF metadata has no {key!r}: not a supported tokenizer")
    return fields[key]
