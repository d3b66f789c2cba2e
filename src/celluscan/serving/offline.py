"""Keep Gradio offline: set before ``import gradio`` (no analytics, no version check, no hub)."""

from __future__ import annotations

import os

__all__ = ["disable_gradio_telemetry"]


def disable_gradio_telemetry() -> None:
    """Switch off Gradio analytics and every remote lookup it would otherwise make."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
