"""tinytitan: run, quantize, measure and ship tiny long-context language models on ordinary hardware.

import tinytitan as tt
m = tt.load("gemma-3-270m")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tinytitan.errors import TinyTitanError
from tinytitan.version import __version__

if TYPE_CHECKING:
    from tinytitan.loader import load
    from tinytitan.runtime import Model

__all__ = ["Model", "TinyTitanError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # torch is imported only when a model is wanted: `tinytitan --help` stays instant.
    if name == "Model":
        from tinytitan.runtime import Model

        return Model
    if name == "load":
        from tinytitan.loader import load

        return load
    raise AttributeError(name)
