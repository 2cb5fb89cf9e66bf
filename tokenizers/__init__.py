"""Tokenizers map uint8 pixels to the (normalised) space the diffusion model works in and back.

This package shadows Hugging Face's ``tokenizers``; the repository is run from its root and never
installed (see docs/architecture.md).
"""

from __future__ import annotations

from tokenizers.base import Tokenizer
from tokenizers.pixels import PixelTokenizer

__all__ = ["PixelTokenizer", "Tokenizer"]
