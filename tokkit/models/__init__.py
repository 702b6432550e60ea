"""The tokenizer model: conv autoencoder blocks, the PatchGAN discriminator and ``Tokenizer``."""

from tokkit.models.autoencoder import Decoder, Encoder
from tokkit.models.tokenizer import Tokenizer, decoder_kwargs, encoder_kwargs

__all__ = ["Decoder", "Encoder", "Tokenizer", "decoder_kwargs", "encoder_kwargs"]
