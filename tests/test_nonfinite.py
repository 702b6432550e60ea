"""Non-finite latents (a diverging run): every quantizer keeps going long enough for the training loop to stop cleanly.

A quantizer must not raise on NaN / Inf input, in training or eval mode: indices stay valid, the loss may become
non-finite (that is how the loop sees it), and training-time statistics (EMA codebooks, k-means, dead-code restarts)
skip the bad rows. The loop then stops with one ``TrainingDiverged`` line naming the step and the last good
checkpoint, the same for every family.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import tiny_train_sets
from test_quantizers_contract import CASES, DIM, PARAMS, expected_index_shape, make
from typer.testing import CliRunner

import tokkit
from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.errors import TrainingDiverged
from tokkit.models import autoencoder
from tokkit.quantizers import VQ, list_quantizers
from tokkit.train import train

BAD_TOKENS = [(0, 1, 1), (1, 0, 0), (1, 3, 2)]  # (b, h, w) of the non-finite tokens in a (2, DIM, 4, 4) batch


def _with_bad_tokens(x: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``x`` (2, D, 4, 4): one whole token ``value``, one token with one channel ``value``, one ``-value``."""
    x = x.clone()
    (b0, h0, w0), (b1, h1, w1), (b2, h2, w2) = BAD_TOKENS
    x[b0, :, h0, w0] = value
    x[b1, 2, h1, w1] = value
    x[b2, :, h2, w2] = -value
    return x


def _finite_state(q: torch.nn.Module) -> bool:
    return all(torch.isfinite(v).all() for v in q.state_dict().values() if v.is_floating_point())


def test_every_registered_quantizer_is_covered():
    assert {n for n in list_quantizers() if CASES.get(n)} == set(list_quantizers())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_nonfinite_tokens_keep_valid_indices_in_eval(name, kwargs, bad):
    q = make(name, kwargs).eval()
    clean = torch.randn(2, DIM, 4, 4)
    out = q(_with_bad_tokens(clean, bad))
    assert out.indices.dtype == torch.int64 and out.indices.shape == expected_index_shape(q, clean)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    # tokens are quantized independently in eval mode: the finite ones get exactly their usual indices
    ref = q(clean).indices
    finite = torch.ones(2, 4, 4, dtype=torch.bool)
    for b, h, w in BAD_TOKENS:
        finite[b, h, w] = False
    assert torch.equal(out.indices[finite], ref[finite])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name,kwargs", PARAMS)
def test_nonfinite_tokens_in_training_do_not_poison_the_state(name, kwargs, bad):
    q = make(name, kwargs).train()
    gen = torch.Generator().manual_seed(3)
    out = q(_with_bad_tokens(torch.randn(2, DIM, 4, 4, generator=gen), bad))  # the first step (k-means init, if any)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert out.loss.dim() == 0
    out = q(torch.full((2, DIM, 4, 4), bad))  # a whole batch of non-finite latents
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
    assert _finite_state(q), "a non-finite batch leaked into the quantizer's state"
    # the quantizer still works on finite input afterwards
    out = q(torch.randn(2, DIM, 4, 4, generator=gen))
    assert torch.isfinite(out.codes).all() and torch.isfinite(out.loss)
    q.eval()
    assert torch.isfinite(q(torch.randn(2, DIM, 4, 4, generator=gen)).codes).all()


def test_vq_ema_update_skips_exactly_the_nonfinite_rows():
    torch.manual_seed(0)
    q = VQ(dim=3, codebook_size=16, decay=0.8, dead_code_threshold=0.5)
    twin = copy.deepcopy(q)
    x = torch.randn(1, 3, 40)  # (B, D, T): 40 tokens
    bad = torch.zeros(40, dtype=torch.bool)
    bad[[3, 17, 30]] = True
    x_bad = x.clone()
    x_bad[0, :, 3], x_bad[0, 1, 17], x_bad[0, :, 30] = float("nan"), float("inf"), float("-inf")
    torch.manual_seed(1)
    q(x_bad)
    torch.manual_seed(1)
    twin(x[:, :, ~bad])  # the same batch without the bad tokens
    for key, value in q.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[key], msg=key)


def test_vq_kmeans_waits_for_a_finite_batch():
    torch.manual_seed(0)
    q = VQ(dim=2, codebook_size=4, kmeans_init=True, dead_code_threshold=0.5)
    twin = copy.deepcopy(q)
    before = q.codebook.clone()
    q(torch.full((1, 2, 8), float("nan")))
    assert not bool(q.initialized) and torch.equal(q.codebook, before)
    # the next finite batch initialises the codebook exactly as if it had been the first one
    z = torch.randn(1, 2, 40)
    torch.manual_seed(1)
    q(z)
    torch.manual_seed(1)
    twin(z)
    assert bool(q.initialized) and not torch.equal(q.codebook, before)
    for key, value in q.state_dict().items():
        torch.testing.assert_close(value, twin.state_dict()[key], msg=key)


# ----------------------------------------------------------------------------------------------------------------------
# the training loop stops with one line, the same for every family

FAMILIES = {
    "fsq": {"z_channels": 4, "quantizer_kwargs": {"levels": [5, 5, 5]}},
    "vq": {"z_channels": 8, "quantizer_kwargs": {"codebook_size": 64, "kmeans_init": True, "dead_code_threshold": 1}},
    "lfq": {"z_channels": 6, "quantizer_kwargs": {"codebook_size": 64, "spherical": True}},
}
NAN_FROM_STEP = 4


def _tiny_tok(family: str) -> TokenizerConfig:
    base = {"resolution": 16, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1}
    return TokenizerConfig(quantizer=family, **base, **FAMILIES[family])


def _tiny_train(**kw) -> TrainConfig:
    base = {"steps": 8, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
            "checkpoint_every": 2, "eval_images": 4, "perceptual": "none", "ema_decay": 0.9,
            "cpu_threads": 1}  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def nan_encoder(monkeypatch):
    """The encoder returns NaN latents from its NAN_FROM_STEP-th training forward on (eval forwards stay finite)."""
    forward = autoencoder.Encoder.forward
    calls = {"train": 0}

    def diverging(self, x):
        z = forward(self, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= NAN_FROM_STEP:
                z = z * float("nan")
        return z

    monkeypatch.setattr(autoencoder.Encoder, "forward", diverging)
    return calls


def _diverged_message(ckpt: str, step: str = str(NAN_FROM_STEP)) -> re.Pattern:
    """One line, the same for every family: the step, the last good checkpoint, then the loop's advice."""
    return re.compile(rf"loss became (nan|inf|-inf) at step {step}; last good checkpoint: {re.escape(ckpt)} \([^\n]+\)")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nan_latents_stop_training_with_one_message(tmp_path, nan_encoder, family):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(_tiny_tok(family), _tiny_train(), "sample", run, device="cpu")
    assert nan_encoder["train"] == NAN_FROM_STEP  # stopped at the first bad step, not later
    assert _diverged_message(str(run / "checkpoint")).fullmatch(str(e.value)), str(e.value)
    # the last good checkpoint (step 2) is intact and finite
    tok = tokkit.load(run / "checkpoint")
    assert all(torch.isfinite(v).all() for v in tok.state_dict().values() if v.is_floating_point())
    ids = tok.encode(torch.zeros(1, 3, 16, 16))
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.codebook_size


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exploding_learning_rate_stops_training_with_one_message(tmp_path, family):
    """The realistic trigger: weights blow up, the latents turn Inf / NaN; FSQ used to die in torch.bincount."""
    run = tmp_path / "run"
    cfg = _tiny_train(lr=1e30, grad_clip=0.0, checkpoint_every=1)
    with pytest.raises(TrainingDiverged) as e:
        train(_tiny_tok(family), cfg, "sample", run, device="cpu")
    assert _diverged_message(str(run / "checkpoint"), step=r"[2-8]").fullmatch(str(e.value)), str(e.value)


def test_cli_prints_one_line_without_traceback(tmp_path, nan_encoder):
    from tokkit.cli.app import app

    sets = tiny_train_sets("train.ema_decay=0.9", "train.batch_size=4", checkpoint_every=2)
    args = ["train", "--preset", "sample-fsq", "--out", str(tmp_path / "run"), "--steps", "8", *sets,
            "--perceptual", "none", "--device", "cpu", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    text = result.stderr.strip()
    assert "Traceback" not in result.output and len(text.splitlines()) == 1, text
    assert f"at step {NAN_FROM_STEP}; last good checkpoint:" in text, text
