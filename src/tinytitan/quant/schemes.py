"""Quantization schemes as data: one dataclass per tensor decision, one QuantConfig per variant.

A variant name is either a preset (`tinytitan quantize --list`) or spelled out:
    w4g32          int4, groups of 32, asymmetric, everything (embedding included)
    w4g64s         int4, groups of 64, symmetric
    w8             int8 per output channel
    w4g32-e8       blocks int4 g32, tied embedding/head int8 per row
    w4g32-e8@10+4g32@25+2g32-imatrix   embedding rows by importance: the 10% most used tokens int8,
                   the next 25% int4 g32, the rest int2 g32 (importance: the reference's probability
                   mass per token on the calibration text, so this needs a calibrated method)
    w4g64-e4g64-gptq   ... with GPTQ error compensation (also: -awq, -imatrix)
    w4g32-kv8      ... and an int8 KV cache (-kv4: int4; -kv8c / -kv4c: keys per channel)
    w3g64-imatrix-kd   ... then recovered by distillation from the reference (quant/recover.py):
                   200 training steps of 512 tokens; -kd400: 400 steps
    q4_k / q5_0 / q6_k ...   a GGML block format for every matrix (llama.cpp's fallbacks for short rows)
    q4_k-eq8_0     GGML blocks with a different embedding format
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tinytitan.checks import of_type
from tinytitan.errors import TinyTitanError

FORMAT_VERSION = 1
METHODS = ("rtn", "imatrix", "gptq", "awq")
RECOVER_STEPS = 200  # "-kd": recovery steps (of 512 tokens) when the variant name gives no number
RECOVER_TOKENS = 32768
MAX_RECOVER_STEPS = 1_000_000


class QuantConfigError(TinyTitanError):
    """An unknown scheme name or an impossible quantization request."""


@dataclass(frozen=True)
class TensorScheme:
    kind: str  # "int": group-wise ints; "ggml": a GGML block format; "float": bf16; "keep": the source blocks
    bits: int = 4  # int: 8, 4, 3 or 2
    group: int = 32  # int: weights per scale along the input dimension; 0 = one scale per output row
    symmetric: bool = False  # int: no zero point (w = q * s) instead of w = q * s + m
    ggml_type: str | None = None  # ggml: "Q4_K", "Q8_0", ...
    # rows: the tied embedding/head split by row importance: (scheme label, share of the rows in percent)
    # per tier, most important rows first; the last tier's share is 0 = "the rest"
    tiers: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists
        object.__setattr__(self, "tiers", tuple((str(t), float(f)) for t, f in self.tiers))

    def tier_schemes(self) -> list[tuple[TensorScheme, float]]:
        return [(_parse_tensor(t), f) for t, f in self.tiers]

    def label(self) -> str:
        if self.kind == "rows":
            return "+".join(f"{t[1:]}@{f:g}" if f else t[1:] for t, f in self.tiers)
        if self.kind == "ggml":
            return str(self.ggml_type).lower()
        if self.kind == "float":
            return "bf16"
        if self.kind == "keep":
            return "keep"
        g = f"g{self.group}" if self.group else ""
        return f"w{self.bits}{g}{'s' if self.symmetric else ''}"

    def bits_per_weight(self, cols: int = 4096) -> float:
        """Storage bits per weight, scales and zero points included (f16 each)."""
        if self.kind == "rows":
            shares = [f for _, f in self.tiers[:-1]]
            rest = 100.0 - sum(shares)
            bits = [s.bits_per_weight(cols) for s, _ in self.tier_schemes()]
            return sum(b * f for b, f in zip(bits, [*shares, rest], strict=True)) / 100.0
        if self.kind in ("float", "keep"):
            return 16.0  # keep: depends on the source; QuantInfo reports the real size
        if self.kind == "ggml":
            from tinytitan.quant.ggml_formats import FORMATS

            return float(FORMATS[str(self.ggml_type)].bits_per_weight)
        group = self.group or cols
        symmetric = self.symmetric or self.bits == 8  # int8 is always stored symmetric
        return self.bits + (16 if symmetric else 32) / group


@dataclass(frozen=True)
class QuantConfig:
    name: str
    blocks: TensorScheme  # every Linear inside the transformer blocks
    embedding: TensorScheme  # the tied token embedding / output head: its own decision (63% of Gemma 3 270M)
    method: str = "rtn"  # rtn | imatrix (importance-weighted rounding) | gptq | awq
    overrides: dict[str, TensorScheme] = field(default_factory=dict)  # per parameter name (mixed precision)
    calib_tokens: int = 4096  # calibrated methods: tokens of calibration text to collect statistics on
    kv_cache: str | None = None  # "f16" | "int8" | "int4": how the variant stores its KV cache
    kv_axis: str = "token"  # "token" | "channel"
    version: int = FORMAT_VERSION
    # recovery by distillation (quant/recover.py): training steps of 512 tokens (0: none) and the
    # calibration tokens they draw from
    recover_steps: int = 0
    recover_tokens: int = RECOVER_TOKENS

    @property
    def row_tiered(self) -> bool:
        """Whether a tensor is split by row importance (its calibration needs the token probabilities)."""
        return any(t.kind == "rows" for t in (self.blocks, self.embedding, *self.overrides.values()))

    def scheme_for(self, param: str) -> TensorScheme:
        if param in self.overrides:
            return self.overrides[param]
        return self.embedding if param.startswith(("embed_tokens", "lm_head")) else self.blocks

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.recover_steps:  # configs without recovery keep the digest they always had
            del d["recover_steps"], d["recover_tokens"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """From a manifest's `quant_config`; a field of the wrong type or value is a QuantConfigError."""
        if not isinstance(d, dict):
            raise QuantConfigError(f"quant_config must be an object, not {type(d).__name__}")
        overrides = d.get("overrides", {})
        if not isinstance(overrides, dict):
            raise QuantConfigError("quant_config.overrides must be an object")
        cfg = cls(
            name=_typed(d.get("name"), str, "name"),
            blocks=_scheme(d.get("blocks"), "blocks"),
            embedding=_scheme(d.get("embedding"), "embedding"),
            method=_choice(d.get("method", "rtn"), METHODS, "method"),
            overrides={str(k): _scheme(v, f"overrides.{k}") for k, v in overrides.items()},
            calib_tokens=_typed(d.get("calib_tokens", 4096), int, "calib_tokens"),
            version=_typed(d.get("version", FORMAT_VERSION), int, "version"),
            kv_cache=_choice(d.get("kv_cache"), (None, "f16", "int8", "int4"), "kv_cache"),
            kv_axis=_choice(d.get("kv_axis", "token"), ("token", "channel"), "kv_axis"),
            recover_steps=_typed(d.get("recover_steps", 0), int, "recover_steps"),
            recover_tokens=_typed(d.get("recover_tokens", RECOVER_TOKENS), int, "recover_tokens"),
        )
        if cfg.calib_tokens <= 0:
            raise QuantConfigError(f"quant_config.calib_tokens is {cfg.calib_tokens}, not positive")
        if not 0 <= cfg.recover_steps <= MAX_RECOVER_STEPS or cfg.recover_tokens <= 0:
            raise QuantConfigError(
                f"quant_config.recover_steps {cfg.recover_steps} / recover_tokens {cfg.recover_tokens} "
                f"are out of range (steps 0..{MAX_RECOVER_STEPS}, tokens positive)"
            )
        return cfg

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def calibrated(self) -> bool:
        """Needs calibration statistics (row tiers rank the embedding's rows by measured use)."""
        schemes = [self.embedding, *self.overrides.values()]
        return self.method != "rtn" or any(s.kind == "rows" for s in schemes)


def _typed(value: Any, kind: type, name: str) -> Any:
    if not of_type(value, kind):
        raise QuantConfigError(f"quant_config.{name} is {str(value)[:40]!r}, not a {kind.__name__}")
    return value


def _choice(value: Any, allowed: tuple, name: str) -> Any:
    if not isinstance(value, str | type(None)) or value not in allowed:
        raise QuantConfigError(f"quant_config.{name} is {str(value)[:40]!r}; allowed: {allowed}")
    return value


_SCHEME_FIELDS = {"kind", "bits", "group", "symmetric", "ggml_type", "tiers"}


def _scheme(d: Any, name: str) -> TensorScheme:
    """A stored TensorScheme, each field checked (a hostile manifest gives bits 0 or a list for a kind)."""
    if not isinstance(d, dict) or set(d) - _SCHEME_FIELDS:
        raise QuantConfigError(
            f"quant_config.{name} must be an object with the fields {sorted(_SCHEME_FIELDS)}"
        )
    kind = _choice(d.get("kind"), ("int", "ggml", "float", "keep", "rows"), f"{name}.kind")
    bits = _typed(d.get("bits", 4), int, f"{name}.bits")
    group = _typed(d.get("group", 32), int, f"{name}.group")
    symmetric = _typed(d.get("symmetric", False), bool, f"{name}.symmetric")
    if kind == "int" and (bits not in (2, 3, 4, 8) or group < 0 or group & (group - 1)):
        raise QuantConfigError(f"quant_config.{name}: bits {bits} group {group} is not an integer scheme")
    ggml_type = d.get("ggml_type")
    if kind == "ggml" and (not isinstance(ggml_type, str) or ggml_type.lower() not in GGML_TYPES):
        raise QuantConfigError(f"quant_config.{name}.ggml_type {str(ggml_type)[:40]!r} is not a GGML type")
    tiers = d.get("tiers", [])
    ok = isinstance(tiers, list | tuple) and all(
        isinstance(t, list | tuple)
        and len(t) == 2
        and isinstance(t[0], str)
        and isinstance(t[1], int | float)
        for t in tiers
    )
    if not ok or (kind == "rows") != bool(tiers):
        raise QuantConfigError(f"quant_config.{name}.tiers must be [scheme, percent] pairs (for kind rows)")
    scheme = TensorScheme(kind, bits, group, symmetric, ggml_type if kind == "ggml" else None, tiers)
    for t, _ in scheme.tier_schemes():  # each tier is itself a scheme (raises QuantConfigError)
        if t.kind != "int":
            raise QuantConfigError(f"quant_config.{name}: row tiers take integer schemes")
    return scheme


def _int(bits: int, group: int, sym: bool = False) -> TensorScheme:
    return TensorScheme(kind="int", bits=bits, group=group, symmetric=sym)


def _ggml(t: str) -> TensorScheme:
    return TensorScheme(kind="ggml", ggml_type=t.upper())


GGML_TYPES = ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k")

# Named presets with a one-line description each (`tinytitan quantize --list`).
PRESETS: dict[str, tuple[str, str]] = {
    "w8": ("w8", "int8 per output channel everywhere"),
    "w4g32": ("w4g32", "int4 groups of 32 (asymmetric) everywhere"),
    "w4g64": ("w4g64", "int4 groups of 64 everywhere"),
    "w4g128": ("w4g128", "int4 groups of 128 everywhere"),
    "w4g32-e8": ("w4g32-e8", "int4 g32 blocks, int8 embedding/head"),
    "w3g32": ("w3g32", "int3 groups of 32 everywhere (runs on the 4-bit kernel)"),
    "w2g32": ("w2g32", "int2 groups of 32 everywhere (runs on the 4-bit kernel)"),
    "w4g32-gptq": ("w4g32-gptq", "int4 g32 with GPTQ error compensation (calibrated)"),
    "w4g32-awq": ("w4g32-awq", "int4 g32 with activation-aware scales folded into norms (calibrated)"),
    "w4g32-imatrix": ("w4g32-imatrix", "int4 g32 with importance-weighted rounding (calibrated)"),
    **{t: (t, f"GGML {t.upper()} for every matrix (llama.cpp fallbacks for short rows)") for t in GGML_TYPES},
}

_INT = re.compile(r"^w(?P<bits>[2348])(?:g(?P<group>\d+))?(?P<sym>s)?$")
_EMB = re.compile(r"^e(?P<spec>.+)$")
_KD = re.compile(r"^kd(?P<steps>\d+)?$")
_TIER = re.compile(r"^(?P<scheme>[^@]+)(?:@(?P<share>\d+(?:\.\d+)?))?$")


def _parse_tiers(spec: str) -> TensorScheme:
    """'8@10+4g32@25+2g32' -> a row-tiered scheme (shares in percent of the rows; the last takes the rest)."""
    tiers = []
    parts = spec.split("+")
    for i, part in enumerate(parts):
        m = _TIER.match(part)
        if not m:
            raise QuantConfigError(f"cannot read tier {part!r} (e.g. 8@10+4g32@25+2g32)")
        scheme = _parse_tensor(m["scheme"])
        if scheme.kind != "int":
            raise QuantConfigError(f"row tiers take integer schemes (w8, w4g32, ...), not {m['scheme']!r}")
        last = i == len(parts) - 1
        if last != (m["share"] is None):
            raise QuantConfigError("each tier but the last needs a share (@PERCENT); the last takes the rest")
        tiers.append((scheme.label(), 0.0 if last else float(m["share"])))
    shares = sum(f for _, f in tiers)
    if len(tiers) < 2 or not 0 < shares < 100 or any(f <= 0 for _, f in tiers[:-1]):
        raise QuantConfigError(f"row tiers {spec!r}: two or more tiers whose shares add up to under 100%")
    return TensorScheme(kind="rows", tiers=tuple(tiers))


def _parse_tensor(spec: str) -> TensorScheme:
    spec = spec.lower()
    if spec in GGML_TYPES:
        return _ggml(spec)
    if spec in ("bf16", "f16", "float"):
        return TensorScheme(kind="float")
    if spec in ("keep", "source"):
        return TensorScheme(kind="keep")
    m = _INT.match(spec if spec.startswith("w") else f"w{spec}")
    if not m:
        raise QuantConfigError(f"cannot read {spec!r} as a tensor scheme (e.g. w4g32, w8, q4_k)")
    bits = int(m["bits"])
    group = int(m["group"]) if m["group"] else (0 if bits == 8 else 32)
    if group and (group < 16 or group & (group - 1)):
        raise QuantConfigError(f"group size {group} must be a power of two >= 16")
    return _int(bits, group, bool(m["sym"]))


def parse_variant(name: str) -> QuantConfig:
    """A preset name or a spelled-out variant -> QuantConfig; unknown names list the presets."""
    text = name.strip().lower()
    parts = text.split("-")
    try:
        blocks = _parse_tensor(parts[0])
        embedding, method = blocks, "rtn"
        kv, axis = None, "token"
        steps = 0
        for part in parts[1:]:
            if part in METHODS:
                method = part
            elif part == "kv16":  # float16 keys and values (llama.cpp's default cache)
                kv = "f16"
            elif part in ("kv8", "kv4", "kv8c", "kv4c"):
                kv, axis = f"int{part[2]}", "channel" if part.endswith("c") else "token"
            elif _KD.match(part):  # recovery by distillation: -kd or -kd<steps>
                steps = int(_KD.match(part)["steps"] or RECOVER_STEPS)  # type: ignore[index]
                if not 0 < steps <= MAX_RECOVER_STEPS:
                    raise QuantConfigError(f"recovery steps {steps} must be 1..{MAX_RECOVER_STEPS}")
            elif _EMB.match(part):
                spec = _EMB.match(part)["spec"]  # type: ignore[index]
                embedding = _parse_tiers(spec) if "@" in spec or "+" in spec else _parse_tensor(spec)
            else:
                raise QuantConfigError(f"unknown part {part!r}")
    except QuantConfigError as e:
        raise QuantConfigError(
            f"unknown quantization scheme {name!r} ({e}); known: {', '.join(PRESETS)} "
            "or spell one out like w4g64-e8-gptq"
        ) from None
    return QuantConfig(
        name=text,
        blocks=blocks,
        embedding=embedding,
        method=method,
        kv_cache=kv,
        kv_axis=axis,
        recover_steps=steps,
    )


def with_overrides(cfg: QuantConfig, overrides: dict[str, TensorScheme], name: str) -> QuantConfig:
    return replace(cfg, overrides=dict(overrides), name=name)
