"""OpenAI-compatible HTTP server on the continuous-batching engine (``tpserve serve``)."""

from .openai_api import create_app, serve

__all__ = ["create_app", "serve"]
