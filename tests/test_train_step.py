"""The step's pieces: no host sync needed for the divergence check, usage counts, workers, checkpointed blocks."""

from __future__ import annotations

import pytest
import torch

from tokkit.config import TokenizerConfig, TrainConfig
from tokkit.runstate import TrainState
from tokkit.train import _build_state
from tokkit.train_data import resolve_workers
from tokkit.train_step import Divergence, TrainStep, checkpoint_blocks, use_compile

TOK = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=6,
                      quantizer="vq", quantizer_kwargs={"codebook_size": 32})
CFG = TrainConfig(batch_size=4, perceptual="none", ema_decay=0.9, warmup_steps=1)


def test_divergence_names_the_first_bad_step_and_its_loss():
    div = Divergence(step=10, device=torch.device("cpu"))
    for loss in (1.0, 2.0, float("inf"), float("nan"), 3.0):
        div.record(torch.tensor(loss))
    assert div.read(distributed=False) == (13, float("inf"))
    assert Divergence(0, torch.device("cpu")).read(distributed=False) is None


def test_auto_workers_zero_on_cpu_and_sized_on_cuda(monkeypatch):
    assert resolve_workers(-1, torch.device("cpu")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(32)), raising=False)
    assert resolve_workers(-1, torch.device("cuda")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_workers(-1, torch.device("cuda")) == 3
    assert use_compile("auto", torch.device("cuda")) and not use_compile("auto", torch.device("cpu"))


def _steps(state: TrainState, n: int = 3) -> TrainState:
    step = TrainStep(state, CFG, state.model, None, None, amp=False, distributed=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        out = step(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1)
        assert all(v.dim() == 0 for v in out.values())  # scalars stay tensors: read once per log interval
    return state


def test_usage_counts_add_every_token_and_state_round_trips(tmp_path):
    torch.manual_seed(0)
    st = _steps(_build_state(TOK, CFG, torch.device("cpu"))[0])
    assert int(st.usage_counts.sum()) == 3 * 4 * 8 * 8 and st.step == 3
    twin = _build_state(TOK, CFG, torch.device("cpu"))[0]
    twin.load_state_dict(st.state_dict(), rank=0, where=tmp_path)
    assert twin.step == 3 and torch.equal(twin.usage_counts, st.usage_counts)
    for a, b in zip(st.state_dict()["model"].values(), twin.state_dict()["model"].values(), strict=True):
        assert torch.equal(a, b)


def test_grad_checkpointing_gives_the_same_weights():
    torch.manual_seed(0)
    plain = _build_state(TOK, CFG, torch.device("cpu"))[0]
    torch.manual_seed(0)
    ckpt = _build_state(TOK, CFG, torch.device("cpu"))[0]
    assert checkpoint_blocks(ckpt.model) > 0
    keys = list(ckpt.model.state_dict())
    torch.manual_seed(5)
    _steps(plain)
    torch.manual_seed(5)
    _steps(ckpt)
    assert list(ckpt.model.state_dict()) == keys  # the saved keys do not change
    for (k, a), b in zip(plain.model.state_dict().items(), ckpt.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_run_on_cpu(tmp_path):
    """train.compile=on works on the CPU too (slow: the compile takes a minute or two) and says how long it took."""
    from tokkit.train import train

    messages = []

    class Rep:
        def start(self, *a): ...
        def advance(self, *a, **k): ...
        def stop(self): ...
        def message(self, text): messages.append(text)

    cfg = TrainConfig(steps=3, batch_size=4, log_every=1, eval_every=0, checkpoint_every=0, eval_images=4,
                      perceptual="none", compile="on", cpu_threads=1, warmup_steps=1)
    tok = TokenizerConfig(resolution=16, base_channels=8, channel_mult=[1, 2], num_res_blocks=1, z_channels=4,
                          quantizer="fsq", quantizer_kwargs={"levels": [5, 5, 5, 5]})
    res = train(tok, cfg, "sample", tmp_path / "run", device="cpu", reporter=Rep())
    assert res.step == 3 and any(m.startswith("compiled the training step in") for m in messages), messages
    assert "encoder.conv_in.weight" in __import__("tokkit").load(res.checkpoint).state_dict()
