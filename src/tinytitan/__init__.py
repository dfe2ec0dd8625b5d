"""tinytitan: run, quantize, measure and ship tiny long-context language models on ordinary hardware.

import tinytitan as tt
m = tt.load("gemma-3-270m")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinytitan.errors import TinyTitanError

if TYPE_CHECKING:
    from tinytitan.runtime import Model, load

__version__ = "0.1.0"
__all__ = ["Model", "TinyTitanError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # torch is imported only when a model is wanted: `tinytitan --help` stays instant.
    if name in ("Model", "load"):
        from tinytitan import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
