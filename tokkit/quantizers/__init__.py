"""Quantizers behind one interface; each importable alone. Importing this package registers every family."""

from tokkit.quantizers.base import (
    CodebookUsage,
    Quantizer,
    QuantizerOutput,
    build_quantizer,
    get_quantizer_class,
    list_quantizers,
    register_quantizer,
)
from tokkit.quantizers.fsq import FSQ, levels_for
from tokkit.quantizers.lfq import LFQ, bits_to_indices, indices_to_bits, split_indices
from tokkit.quantizers.residual import ResidualQuantizer
from tokkit.quantizers.vq import VQ

__all__ = [
    "FSQ",
    "LFQ",
    "VQ",
    "CodebookUsage",
    "Quantizer",
    "QuantizerOutput",
    "ResidualQuantizer",
    "bits_to_indices",
    "build_quantizer",
    "get_quantizer_class",
    "indices_to_bits",
    "levels_for",
    "list_quantizers",
    "register_quantizer",
    "split_indices",
]
