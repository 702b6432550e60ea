"""CUDA paths: quantizers under bf16 autocast, training, encoding and decoding on the GPU against the CPU.

Every test here is marked ``cuda`` and skipped (with the reason) when no CUDA GPU is visible. Comparisons between the
GPU and the CPU run in full float32 (TF32 off), so the two differ by rounding only; tokens are compared on a
tokenizer trained for a while first, whose latents sit far enough from the quantization boundaries for rounding
to flip at most a few in a thousand.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_quantizers_contract import DIM, PARAMS, make

import tokkit
from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.data import center_crop_resize, open_source, to_float
from tokkit.decode import decode_tokens
from tokkit.encode import encode_dataset
from tokkit.shards import open_shards
from tokkit.train import train

pytestmark = pytest.mark.cuda

FAMILIES = {
    "fsq": {"z_channels": 4, "quantizer_kwargs": {"levels": [5, 5, 5]}},
    "vq": {"z_channels": 8, "quantizer_kwargs": {"codebook_size": 64}},
    "lfq": {"z_channels": 6, "quantizer_kwargs": {"codebook_size": 64}},
}
TRAIN_STEPS = 100


@pytest.fixture
def float32_exact():
    """Full float32 matmuls and convolutions on the GPU (no TF32) for the duration of a test."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _agreement(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    assert a.shape == b.shape
    return float((a == b).double().mean())


# ----------------------------------------------------------------------------------------------------------------------
# quantizers


@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_quantizer_bf16_autocast_forward_backward(name, kwargs, float32_exact):
    q = make(name, kwargs).cuda().train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, DIM, 16, 16, device="cuda", generator=gen).bfloat16().requires_grad_()  # 1024 tokens
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = q(x)
        loss = (out.codes.float() * torch.linspace(-1, 1, out.codes.numel(), device="cuda").view_as(out.codes)).sum()
        loss = loss + out.loss
    assert out.codes.dtype == torch.bfloat16 and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname

    # eval: bf16 latents under autocast get the float32 indices of the same (upcast) values, on the GPU and the CPU
    q.eval()
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            auto = q(x.detach())
        ref = q(x.detach().float())
        cpu = copy.deepcopy(q).cpu()(x.detach().float().cpu())
    assert _agreement(auto.indices.cpu(), ref.indices.cpu()) >= 0.999
    assert _agreement(ref.indices.cpu(), cpu.indices) >= 0.99  # only near-ties may differ between devices


# ----------------------------------------------------------------------------------------------------------------------
# a tokenizer trained on the GPU (bf16 autocast), then encoded and decoded on both devices


def _tiny_tok(family: str) -> TokenizerConfig:
    base = {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
    return TokenizerConfig(quantizer=family, **base, **FAMILIES[family])


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, TrainResult) of TRAIN_STEPS steps on the GPU."""
    family = request.param
    cfg = TrainConfig(steps=TRAIN_STEPS, batch_size=16, lr=3e-3, warmup_steps=5, log_every=1, eval_every=50,
                      checkpoint_every=50, eval_images=8, perceptual="none", ema_decay=0.9)  # fmt: skip
    res = train(_tiny_tok(family), cfg, "sample", tmp_path_factory.mktemp(f"cuda-{family}") / "run", device="cuda")
    return family, res


@pytest.fixture(scope="module")
def sample_images() -> torch.Tensor:
    """Every image of the built-in sample set at 16 px: (448, 3, 16, 16) float in [-1, 1]."""
    src = open_source("sample")
    return to_float(np.stack([center_crop_resize(src.read(i), 16) for i in range(len(src))]))


def test_training_on_cuda(trained):
    family, res = trained
    assert res.step == TRAIN_STEPS
    recs = [json.loads(ln) for ln in res.metrics_file.read_text().splitlines()]
    curve = [r["rec_loss"] for r in recs if "rec_loss" in r]
    assert len(curve) == TRAIN_STEPS and all(math.isfinite(v) for v in curve)
    assert np.mean(curve[-10:]) < 0.9 * np.mean(curve[:10]), curve  # it learns
    assert math.isfinite(res.metrics["psnr"]) and 0 < res.metrics["usage"] <= 1
    tok = tokkit.load(res.checkpoint)  # loads on the CPU
    assert tok.config == _tiny_tok(family)
    assert all(torch.isfinite(v).all() for v in tok.state_dict().values() if v.is_floating_point())


def test_encode_on_cuda_matches_cpu(trained, sample_images, float32_exact):
    _, res = trained
    cpu, gpu = tokkit.load(res.checkpoint, device="cpu"), tokkit.load(res.checkpoint, device="cuda")
    with torch.inference_mode():
        ids_cpu = cpu.encode(sample_images)
        ids_gpu = gpu.encode(sample_images.cuda()).cpu()
    assert ids_gpu.dtype == torch.int64 and ids_gpu.shape == ids_cpu.shape == (448, 8, 8)
    assert _agreement(ids_gpu, ids_cpu) >= 0.999


def test_encode_dataset_on_cuda(trained, sample_images, tmp_path):
    _, res = trained
    shards_gpu = encode_dataset(res.checkpoint, "sample", tmp_path / "gpu", batch_size=64, workers=0, device="cuda")
    shards_cpu = encode_dataset(res.checkpoint, "sample", tmp_path / "cpu", batch_size=64, workers=0, device="cpu")
    assert shards_gpu.complete and shards_gpu.images == shards_cpu.images == 448
    gpu_ds, cpu_ds = open_shards(tmp_path / "gpu"), open_shards(tmp_path / "cpu")
    ids_gpu = torch.stack([gpu_ds[i][0] for i in range(len(gpu_ds))])
    ids_cpu = torch.stack([cpu_ds[i][0] for i in range(len(cpu_ds))])
    assert gpu_ds.keys == cpu_ds.keys and np.array_equal(gpu_ds.labels, cpu_ds.labels)
    # the shards hold what the model gives under the same bf16 autocast, batch by batch as encode_dataset runs it
    tok = tokkit.load(res.checkpoint, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        direct = torch.cat([tok.encode(sample_images[a : a + 64].cuda()).cpu() for a in range(0, 448, 64)])
    assert _agreement(ids_gpu, direct) >= 0.999
    # bf16 autocast against float32 on the CPU: bf16 rounds the activations (~0.4%), which flips the tokens that sit
    # near a boundary (about 1% of them for these tiny tokenizers on the CPU's bf16); a wrong pipeline agrees far less
    assert _agreement(ids_gpu, ids_cpu) >= 0.95


def test_open_shards_and_decode_on_cuda(trained, tmp_path, float32_exact):
    _, res = trained
    encode_dataset(res.checkpoint, "sample", tmp_path / "shards", batch_size=64, workers=0, device="cuda")
    ds = open_shards(tmp_path / "shards")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=False)
    tokens, labels = next(iter(loader))
    assert tokens.dtype == torch.int64 and tokens.shape == (32, 8, 8) and labels.shape == (32,)
    cpu, gpu = tokkit.load(res.checkpoint, device="cpu"), tokkit.load(res.checkpoint, device="cuda")
    with torch.inference_mode():
        img_gpu = gpu.decode(tokens.cuda())
        img_cpu = cpu.decode(tokens)
    assert img_gpu.shape == (32, 3, 16, 16) and img_gpu.dtype == torch.float32
    torch.testing.assert_close(img_gpu.cpu(), img_cpu, rtol=0, atol=1e-3)
    # the library entry point writes the same PNGs (up to rounding to the nearest uint8 level)
    dec_gpu = decode_tokens(res.checkpoint, tmp_path / "shards", tmp_path / "png-gpu", limit=16, device="cuda")
    dec_cpu = decode_tokens(res.checkpoint, tmp_path / "shards", tmp_path / "png-cpu", limit=16, device="cpu")
    assert dec_gpu.count == 16 and [f.name for f in dec_gpu.files] == [f.name for f in dec_cpu.files]
    for fg, fc in zip(dec_gpu.files, dec_cpu.files, strict=True):
        a, b = np.asarray(Image.open(fg), dtype=np.int16), np.asarray(Image.open(fc), dtype=np.int16)
        assert a.shape == (16, 16, 3) and np.abs(a - b).max() <= 1, fg.name
