"""Our runtime as an lm-evaluation-harness model (`pip install 'tinytitan[lmeval]'`).

Registers the model type `tinytitan` with lm-eval, so its whole task library runs on our models:

    python -m tinytitan.eval.lm_eval_adapter --model_args model=gemma-3-270m,batch_size=16 \\
        --tasks arc_easy --limit 100

or from Python: `lm_eval.simple_evaluate(model=TinyTitanLM(model="gemma-3-270m"), tasks=[...])`.

lm-eval does the prompting, tokenization (`tok_encode` here: BOS where the model's metadata asks, as
lm-eval's Hugging Face backend does) and metrics; we supply the three requests through `RuntimeLM`, so the
numbers equal those of our built-in scorer on the same items.
"""

from __future__ import annotations

import sys
from typing import Any

from tinytitan.errors import TinyTitanError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    raise TinyTitanError(
        "lm-evaluation-harness is not installed: pip install 'tinytitan[lmeval]' (or pip install lm-eval)"
    ) from None

from tinytitan.eval.api import GenerateRequest, RuntimeLM


@register_model("tinytitan")
class TinyTitanLM(TemplateLM):
    """model: a zoo name, path, or an already loaded tinytitan Model; variant: passed to the loader."""

    def __init__(
        self,
        model: Any = "gemma-3-270m",
        variant: Any = None,
        batch_size: int | str = 16,
        dtype: str = "float32",
        device: str | None = None,
        ctx: int | None = None,
        max_length: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            from tinytitan.eval.runner import load_model

            model = load_model(model, variant, dtype=dtype, device=device, ctx=int(ctx) if ctx else None)
        self.model = model
        bs = 16 if batch_size in ("auto", None) else int(batch_size)
        self.runtime = RuntimeLM(model, batch_size=bs, max_length=int(max_length) if max_length else None)
        self.tokenizer = None  # lm-eval: no Hugging Face tokenizer (no chat template from it)

    # -- what TemplateLM needs ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        tok = self.model.tokenizer
        return tok.eos_id if tok.eos_id is not None else self.runtime.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.runtime.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.runtime.max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        tok = self.model.tokenizer
        if add_special_tokens is False:
            return tok.encode(string, add_bos=False)
        if tok.bos_id is not None and string.startswith(tok.id_to_token(tok.bos_id)):
            return tok.encode(string, add_bos=False, special=True)  # the text already carries BOS
        return tok.encode(string, add_bos=None)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        out = self.runtime.loglikelihood_tokens(pairs)
        for (cache_key, _, _), res in zip(requests, out, strict=True):
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.runtime.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_tokens) :]  # lm-eval cuts from the left
            text = self.runtime.generate_until([GenerateRequest(ids, until, max_tokens)])[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `--model tinytitan` already chosen."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in args:
        args = ["--model", "tinytitan", *args]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
