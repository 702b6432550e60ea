"""``Tokenizer`` = Encoder + any registered quantizer + Decoder.

Axis legend: B batch, H/W image size, h/w token grid, G index groups (grouped / residual quantizers), Z latent channels.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from tokkit.checkpoint import load_checkpoint, save_checkpoint
from tokkit.config import TokenizerConfig
from tokkit.data.images import BadImage, _first_line, _to_rgb, _upright, decode_image, reduced_decode
from tokkit.data.inputs import max_input_bytes, read_regular_file
from tokkit.data.transforms import center_crop_resize, to_float, to_uint8
from tokkit.errors import ConfigError
from tokkit.quantizers.base import Quantizer, QuantizerOutput, build_quantizer

# arch name -> the module holding its ``Encoder`` and ``Decoder`` (imported when first used)
ARCHS: dict[str, str] = {"vqgan": "tokkit.models.autoencoder", "magvit2": "tokkit.models.magvit2"}

# keyword arguments an arch may lack, as long as the config leaves them at these values
_OPTIONAL_KWARGS: dict[str, Any] = {"attention": False, "attn_levels": [], "spatial_norm": False, "cond_channels": None}


def arch_modules(arch: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The ``(Encoder, Decoder)`` classes of ``arch`` (a key of ``ARCHS``).

    Raises:
        ConfigError: an unknown arch, or one whose module this install lacks.
    """
    if arch not in ARCHS:
        raise ConfigError(f"tokenizer.arch: unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    name = ARCHS[arch]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ConfigError(
            f"tokenizer.arch {arch!r} needs the module {name}, which this tokkit install lacks: upgrade tokkit"
        ) from None
    return module.Encoder, module.Decoder


def _arch_kwargs(config: TokenizerConfig, cls: type[nn.Module], kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` + the ``config.arch_kwargs`` that ``cls`` takes; keywords of ``kw`` it lacks must be at their defaults."""
    extra = dict(config.arch_kwargs)
    clash = sorted(set(extra) & set(kw))
    if clash:
        raise ConfigError(f"tokenizer.arch_kwargs must not set {', '.join(clash)}: they are tokenizer fields")
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {**kw, **extra}
    out = {}
    for k, v in kw.items():
        if k in params:
            out[k] = v
        elif k not in _OPTIONAL_KWARGS or v != _OPTIONAL_KWARGS[k]:
            raise ConfigError(f"tokenizer.arch {config.arch!r}: its {cls.__name__} takes no {k!r} (= {v!r}); unset it")
    # one dict serves both classes: each takes the keys it knows; a key that neither knows is a mistake
    both = {name for c in arch_modules(config.arch) for name in inspect.signature(c).parameters}
    unknown = sorted(set(extra) - both)
    if unknown:
        raise ConfigError(
            f"tokenizer.arch_kwargs {', '.join(unknown)} not taken by arch {config.arch!r}'s Encoder or Decoder; "
            f"they take: {', '.join(sorted(both))}"
        )
    return {**out, **{k: v for k, v in extra.items() if k in params}}


def encoder_kwargs(config: TokenizerConfig) -> dict[str, Any]:
    """The keyword arguments of ``config.arch``'s ``Encoder`` described by ``config`` (``arch_kwargs`` included)."""
    kw = {
        "in_channels": config.in_channels,
        "base_channels": config.base_channels,
        "channel_mult": list(config.channel_mult),
        "num_res_blocks": config.num_res_blocks,
        "attention": config.attention,
        "attn_levels": list(config.attn_levels),
        "z_channels": config.z_channels,
    }
    return _arch_kwargs(config, arch_modules(config.arch)[0], kw)


def decoder_kwargs(config: TokenizerConfig) -> dict[str, Any]:
    """The keyword arguments of ``config.arch``'s ``Decoder`` described by ``config`` (``arch_kwargs`` included)."""
    res_blocks = config.num_res_blocks if config.decoder_res_blocks is None else config.decoder_res_blocks
    kw = {
        "out_channels": config.in_channels,
        "base_channels": config.base_channels,
        "channel_mult": list(config.channel_mult),
        "num_res_blocks": res_blocks,
        "attention": config.attention,
        "attn_levels": list(config.attn_levels),
        "z_channels": config.z_channels,
        "spatial_norm": config.spatial_norm,
        "cond_channels": config.quantizer_dim if config.spatial_norm else None,
    }
    return _arch_kwargs(config, arch_modules(config.arch)[1], kw)


def quantizer_from_config(config: TokenizerConfig) -> Quantizer:
    """Build the registered quantizer ``config.quantizer`` with ``dim=config.quantizer_dim`` and its kwargs."""
    importlib.import_module("tokkit.quantizers")  # registers every family
    kwargs = dict(config.quantizer_kwargs)
    if "dim" in kwargs:
        raise ConfigError("tokenizer.quantizer_kwargs must not set 'dim': it is tokenizer.embed_dim")
    return build_quantizer(config.quantizer, dim=config.quantizer_dim, **kwargs)


class Tokenizer(nn.Module):
    """A discrete image tokenizer: images <-> integer token grids.

    Image files, PIL images and uint8 arrays of any size go through ``encode_images``, with the same pinned
    preprocessing as ``tokkit encode`` (EXIF orientation, alpha on white, shorter side resized to ``resolution`` and
    center-cropped); ``decode_to_images`` turns ids back into PIL images::

        ids = tok.encode_images(["photo.jpg", Image.open("icon.png")])   # (2, h, w) int64
        pics = tok.decode_to_images(ids)                                 # 2 RGB PIL images, resolution x resolution

    ``encode`` and ``decode`` work on float tensors (B, 3, H, W) in [-1, 1] at ``resolution``. For uint8 batches that
    are already that size use ``to_float`` / ``to_uint8`` from ``tokkit.data``::

        from tokkit.data import to_float, to_uint8
        ids = tok.encode(to_float(uint8_images))        # uint8 (B, H, W, 3) -> (B, h, w) int64
        out = to_uint8(tok.decode(ids))                  # (B, H, W, 3) uint8

    ``decode(encode(x))`` equals ``forward(x)[0].clamp(-1, 1)`` in eval mode (up to float rounding of the
    straight-through estimator).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        """Build encoder, quantizer and decoder from ``config`` (weights randomly initialised)."""
        super().__init__()
        if isinstance(config, dict):
            config = TokenizerConfig.from_dict(config)
        self.config = config
        encoder_cls, decoder_cls = arch_modules(config.arch)
        self.encoder = encoder_cls(**encoder_kwargs(config))
        self.quant_conv: nn.Conv2d | None = None
        self.post_quant_conv: nn.Conv2d | None = None
        if config.quant_conv:
            self.quant_conv = nn.Conv2d(config.z_channels, config.quantizer_dim, 1)
        self.quantizer = quantizer_from_config(config)
        if config.quant_conv:
            self.post_quant_conv = nn.Conv2d(config.quantizer_dim, config.z_channels, 1)
        self.decoder = decoder_cls(**decoder_kwargs(config))

    @classmethod
    def from_config(cls, config: TokenizerConfig | dict[str, Any]) -> Tokenizer:
        """Same as ``Tokenizer(config)``; also takes the dict form (``config.json``'s ``tokenizer``)."""
        if not isinstance(config, TokenizerConfig):
            config = TokenizerConfig.from_dict(config)
        return cls(config)

    # ---- properties ----------------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        """Image side the tokenizer was built for."""
        return self.config.resolution

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) tokens per image at ``resolution``."""
        return self.config.token_grid

    @property
    def codebook_size(self) -> int:
        """Number of distinct token ids (per group)."""
        return int(self.quantizer.codebook_size)

    @property
    def bits_per_token(self) -> float:
        """Bits carried by one token position (all groups)."""
        return float(self.quantizer.bits_per_token)

    @property
    def index_dtype(self) -> np.dtype:
        """Smallest numpy dtype that holds every index."""
        return self.quantizer.index_dtype

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of one image's indices: (h, w), or (h, w, G) for grouped / residual quantizers."""
        g = int(getattr(self.quantizer, "num_groups", 1))
        return (*self.token_grid, g) if g > 1 else tuple(self.token_grid)

    # ---- the three operations ------------------------------------------------------------------------------------
    def latents(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> what the quantizer sees (B, E, h, w): the encoder's output, through ``quant_conv``."""
        z = self.encoder(images)  # (B, Z, h, w)
        return z if self.quant_conv is None else self.quant_conv(z)  # (B, E, h, w)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Quantized codes (B, E, h, w) -> images (B, 3, H, W), unclamped.

        ``post_quant_conv`` maps the codes to the decoder's input; a spatial-norm decoder is conditioned on the codes
        themselves (before ``post_quant_conv``), as diffusers' MoVQ is.
        """
        h = codes if self.post_quant_conv is None else self.post_quant_conv(codes)  # (B, Z, h, w)
        return self.decoder(h, codes) if self.config.spatial_norm else self.decoder(h)

    def forward(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct: (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), unclamped; QuantizerOutput)."""
        q = self.quantizer(self.latents(images))
        return self.decode_codes(q.codes), q

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) float in [-1, 1] -> int64 token ids (B, h, w) or (B, h, w, G)."""
        self._check_images(images)
        was_training = self.quantizer.training
        self.quantizer.eval()  # never update codebook statistics (EMA, dead codes) while tokenizing
        try:
            return self.quantizer(self.latents(images)).indices
        finally:
            self.quantizer.train(was_training)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """int token ids (B, h, w[, G]) -> float images (B, 3, H, W) clamped to [-1, 1]."""
        if indices.is_floating_point():
            raise ConfigError(f"decode expects integer token ids, got {indices.dtype}")
        codes = self.quantizer.indices_to_codes(indices.long())  # (B, E, h, w) float32
        param = next(self.decoder.parameters())
        return self.decode_codes(codes.to(param.dtype)).clamp(-1.0, 1.0)

    # ---- images in, images out ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        decode: str = "auto",
    ) -> Tensor:
        """Image files, PIL images or uint8 arrays -> int64 token ids (N, h, w[, G]) on the CPU.

        The preprocessing is ``tokkit encode``'s, step for step, so the ids equal those in its shards: files are
        read and decoded by ``tokkit.data.decode_image`` (EXIF orientation applied, alpha composited on white,
        16-bit and palette images made 8-bit RGB), the shorter side is resized to ``resolution`` (bicubic,
        antialiased) and center-cropped (``center_crop_resize``), and pixels become [-1, 1] (``to_float``). On CUDA
        the encoder runs under bf16 autocast, as ``tokkit encode`` does. Files are read one batch at a time.

        Args:
            images: one image or a sequence of them. An image is a path (``str`` / ``os.PathLike``) to an image
                file, a ``PIL.Image`` (EXIF orientation and alpha handled as for files), or a uint8 array (H, W, 3)
                (also (H, W) / (H, W, 1) gray, (H, W, 4) RGBA); a uint8 array (N, H, W, 3) is N images.
            batch_size: images per forward pass.
            device: where to run; None: where the tokenizer is. Another device moves the tokenizer there
                (``tok.to(device)``); ``auto`` picks CUDA when available.
            decode: JPEG files as ``tokkit encode --decode`` reads them: ``auto`` (its default: libjpeg DCT scaling
                down to 2x the resolution), ``reduced`` or ``full`` (``gpu`` sets are matched closest by ``full``).

        Returns:
            int64 (N, *index_shape), one row per image in order (N = 1 for a single image).

        Raises:
            DataError: a file that cannot be read or decoded (``BadImage``: one line naming the file and why).
            ConfigError: an input of another kind (float arrays and tensors go to ``encode``), bad ``batch_size``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        margins = {"auto": 2, "reduced": 1, "full": None}
        if decode not in margins:
            raise ConfigError(f"decode must be one of {', '.join(margins)}, got {decode!r}")
        dev = self._device(device)
        items = _image_items(images)
        r = self.resolution
        target = None if margins[decode] is None else r * margins[decode]
        out = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            with reduced_decode(target):
                pixels = np.stack([center_crop_resize(_rgb_image(x, key), r) for x, key in chunk])  # (b, r, r, 3)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
            with amp:
                out.append(self.encode(to_float(torch.from_numpy(pixels).to(dev))).cpu())  # (b, *index_shape)
        if not out:
            return torch.zeros((0, *self.index_shape), dtype=torch.int64)
        return torch.cat(out)

    @torch.no_grad()
    def decode_to_images(
        self, ids: Tensor | np.ndarray, *, batch_size: int = 64, device: str | torch.device | None = None
    ) -> list[Image.Image]:
        """Token ids (N, h, w[, G]) or one grid (h, w[, G]) -> N RGB ``PIL.Image`` of ``resolution`` x ``resolution``.

        Pixels are ``decode``'s output clamped to [-1, 1] and rounded to uint8 (``to_uint8``).

        Args:
            ids: integer token ids (a tensor or a numpy array, any integer dtype; shard codes as they are).
            batch_size: grids per forward pass.
            device: as for ``encode_images``.

        Raises:
            ConfigError: float ids, a shape other than (N, *index_shape), ids outside [0, codebook_size).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        dev = self._device(device)
        if isinstance(ids, Tensor):
            integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
        else:
            ids = np.asarray(ids)
            integer = ids.dtype.kind in "iu"
        if not integer:
            raise ConfigError(f"decode_to_images expects integer token ids, got {ids.dtype}")
        t = ids.long() if isinstance(ids, Tensor) else torch.from_numpy(ids.astype(np.int64))  # uint16 shard codes too
        shape = tuple(self.index_shape)
        if tuple(t.shape) == shape:
            t = t.unsqueeze(0)  # one grid -> a batch of one
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise ConfigError(f"expected token ids (N, {', '.join(map(str, shape))}), got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.codebook_size):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ConfigError(f"token id {bad} outside [0, {self.codebook_size}): ids from another tokenizer?")
        pics: list[Image.Image] = []
        for start in range(0, len(t), batch_size):
            pixels = to_uint8(self.decode(t[start : start + batch_size].to(dev))).cpu().numpy()  # (b, H, W, 3)
            pics += [Image.fromarray(p) for p in pixels]
        return pics

    def _device(self, device: str | torch.device | None) -> torch.device:
        """The device to run on: the tokenizer's own for None; otherwise the tokenizer is moved there."""
        here = next(self.parameters()).device
        if device is None:
            return here
        from tokkit.runtime import resolve_device

        dev = resolve_device(device)
        if dev != here:
            self.to(dev)
        return next(self.parameters()).device

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint folder (model.safetensors + config.json); see ``tokkit.checkpoint``."""
        return save_checkpoint(self, path)

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ConfigError(f"expected images (B, {self.config.in_channels}, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ConfigError(
                f"expected float images in [-1, 1], got {images.dtype}: convert uint8 with tokkit.data.to_float"
            )


def load(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Load a checkpoint folder as a ``Tokenizer`` in eval mode (also ``tokkit.load``).

    Args:
        path: checkpoint folder, or a run folder holding ``checkpoint/``.
        device: where to put the model.

    Raises:
        CheckpointError: see ``tokkit.checkpoint.read_checkpoint_meta``; also weights that do not fit the config.
    """
    return load_with_meta(path, device)[0]


def load_with_meta(path: str | Path, device: str | torch.device = "cpu") -> tuple[Tokenizer, dict[str, Any]]:
    """``load``, also returning the validated ``config.json`` content (so callers need not read and hash it again)."""
    return load_checkpoint(path, Tokenizer, device)


# what ``encode_images`` takes as one image
ImageInput = str | os.PathLike | Image.Image | np.ndarray


def _image_items(images: Any) -> list[tuple[Any, str]]:
    """One image or a sequence of them -> [(image, name for error messages)], without reading anything."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [(a, f"array[{i}]") for i, a in enumerate(images)]  # (N, H, W, C): N images
    if isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
        images = [images]
    if isinstance(images, Tensor):
        raise ConfigError(
            "encode_images takes files, PIL images or uint8 numpy arrays; for a float tensor (B, 3, H, W) in [-1, 1] "
            "use tok.encode(x), for a uint8 tensor tok.encode(tokkit.data.to_float(x))"
        )
    if not isinstance(images, Iterable) or isinstance(images, bytes | dict):
        raise ConfigError(
            f"encode_images takes a path, a PIL image, a uint8 array or a list of them, not {type(images).__name__}"
        )
    items = []
    for i, x in enumerate(list(images)):
        if isinstance(x, str | os.PathLike):
            items.append((x, os.fspath(x)))
        else:
            items.append((x, f"{getattr(x, 'filename', '') or f'image[{i}]'}"))
    return items


def _rgb_image(x: Any, key: str) -> Image.Image:
    """One input as an upright 8-bit RGB image, read as ``tokkit encode`` reads files; ``BadImage`` when unreadable."""
    if isinstance(x, str | os.PathLike):
        return decode_image(read_regular_file(x, key, max_input_bytes()), key)
    if isinstance(x, Image.Image):
        try:
            x.load()
            return _to_rgb(_upright(x))
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage(key, f"unreadable PIL image: {_first_line(e)}") from None
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ConfigError(
                f"{key}: encode_images takes uint8 arrays, got {x.dtype}; for floats in [-1, 1] use tok.encode"
            )
        if x.ndim == 3 and x.shape[-1] == 1:
            x = x[..., 0]  # (H, W, 1) -> (H, W)
        if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (3, 4))):
            raise ConfigError(f"{key}: expected a uint8 image (H, W, 3), (H, W, 4) or (H, W), got shape {x.shape}")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(x)))
    raise ConfigError(f"{key}: encode_images takes paths, PIL images or uint8 arrays, not {type(x).__name__}")


__all__ = [
    "ARCHS",
    "ImageInput",
    "Tokenizer",
    "arch_modules",
    "decoder_kwargs",
    "encoder_kwargs",
    "load",
    "load_with_meta",
    "quantizer_from_config",
]
