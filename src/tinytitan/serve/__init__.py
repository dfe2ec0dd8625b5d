"""An OpenAI-compatible HTTP server for a loaded Model: `create_app(model, ServeConfig(...))`."""

from tinytitan.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
