"""Input pipeline: sources -> FLAN-style templates / chat templates -> tokenize/mask -> mix -> pack -> batch (Grain)."""

from jaxtune.data.chat import render_chat

__all__ = ["render_chat"]
