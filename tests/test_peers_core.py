"""tokkit.peers: the family registry, weights-only readers, wrappers, hf: names from the hub cache, provenance,
tokkit.load on peer checkpoints and the `tokkit convert` / `info` / `encode` / `decode` path of a converted one."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tokkit
from tokkit.cli.app import app
from tokkit.errors import CheckpointError, ConfigError, OutputError
from tokkit.peers import FAMILY_MODULES, PeerFamily, convert_source, list_families, register_family
from tokkit.peers.sources import read_source, read_weights, resolve_source, unwrap

runner = CliRunner()


# ---- weights-only reading -------------------------------------------------------------------------------------------


def _touch(path: str) -> None:
    """What the malicious pickle below would run: creates a marker file."""
    Path(path).write_text("ran")


class SideEffect:
    """Unpickling this calls ``_touch(marker)``: a stand-in for code a checkpoint could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_pickle_that_needs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hook": SideEffect(marker)}, ckpt)
    # the file is real: a full unpickling would run the code ...
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    # ... tokkit refuses it in one line, naming the global, and runs nothing
    with pytest.raises(CheckpointError) as e:
        read_weights(ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg and f"{__name__}._touch" in msg and "weights-only" in msg
    assert not marker.exists()
    res = runner.invoke(app, ["convert", str(ckpt), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "refused" in res.output and not marker.exists()
    assert not (tmp_path / "out").exists()


def test_lightning_bookkeeping_classes_are_inert_standins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """taming's .ckpt files hold {ModelCheckpoint: state} under "callbacks": read without Lightning, nothing runs."""
    marker = tmp_path / "ran.txt"

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run if the real class were used
            _touch(str(marker))

    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    ckpt = tmp_path / "last.ckpt"
    cb = ModelCheckpoint()
    cb.best = 1.0
    torch.save({"state_dict": {"a": torch.ones(1)}, "callbacks": {ModelCheckpoint: {"best": 1.0}}, "cb": cb}, ckpt)
    for name in names:
        monkeypatch.delitem(sys.modules, name)  # no Lightning installed
    assert set(read_weights(ckpt)) == {"a"}
    assert not marker.exists()


def test_wrappers_prefixes_and_non_tensors(tmp_path: Path) -> None:
    w = torch.arange(3.0)
    # LlamaGen's order: ema before model before state_dict
    assert unwrap({"ema": {"x": w}, "model": {"y": w}, "steps": 5}) == {"x": w}
    assert list(unwrap({"model": {"state_dict": {"a": w, "n": 3}}, "optimizer": {}})) == ["a"]
    assert list(unwrap({"module.enc.w": w, "module.dec.w": w})) == ["enc.w", "dec.w"]
    assert list(unwrap({"w": w, "epoch": 3, "cfg": {"lr": 1}})) == ["w"]
    with pytest.raises(CheckpointError, match="holds no tensors"):
        unwrap({"epoch": 3})
    from safetensors.torch import save_file

    save_file({"a": w}, str(tmp_path / "m.safetensors"))
    assert torch.equal(read_weights(tmp_path / "m.safetensors")["a"], w)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_weights(tmp_path / "junk.pt")


def test_taming_yaml_beside_the_ckpt_is_read_safely(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "last.ckpt")
    yaml_text = "model:\n  params:\n    embed_dim: 256\n    n_embed: 1024\n    ddconfig: {ch: 128}\n"
    (tmp_path / "last.yaml").write_text(yaml_text)
    src = read_source(tmp_path / "last.ckpt")
    assert src.extra == {"embed_dim": 256, "n_embed": 1024, "ddconfig": {"ch": 128}}
    assert set(src.files) == {"last.ckpt", "last.yaml"} and len(src.sha256) == 64
    (tmp_path / "bad.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not a readable yaml"):
        read_source(tmp_path / "last.ckpt", config=tmp_path / "bad.yaml")


# ---- registry and detection -----------------------------------------------------------------------------------------


def test_registry_lists_installed_families_and_refuses_a_clash() -> None:
    names = [f.name for f in list_families()]
    assert "diffusers" in names
    assert all(m.startswith("tokkit.peers.") for m in FAMILY_MODULES)
    fam = next(f for f in list_families() if f.name == "diffusers")
    register_family(fam)  # registering the same family again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_family(PeerFamily("diffusers", "MIT", "u", lambda s, e: False, fam.convert))


def test_unknown_layout_is_one_line(tmp_path: Path) -> None:
    torch.save({"model": {"backbone.layer1.weight": torch.ones(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as e:
        convert_source(tmp_path / "other.pt")
    msg = str(e.value)
    assert "\n" not in msg and "no known peer layout" in msg and "diffusers" in msg and "backbone.layer1.weight" in msg
    with pytest.raises(ConfigError, match="unknown peer family 'nope'"):
        convert_source(tmp_path / "other.pt", family="nope")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        tokkit.load(tmp_path / "missing.ckpt")


# ---- hf: names ------------------------------------------------------------------------------------------------------


def _hub_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face hub cache laid out by hand: models--ORG--REPO/{refs/main, snapshots/REV/FILES}."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "0123abcd"
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0123abcd")
    return snap


def test_hf_names_resolve_from_the_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub", reason="hf: names need huggingface_hub (pip install tokkit[peers])")
    cache = tmp_path / "hub"
    snap = _hub_cache(cache, "org/vq", {"ckpt/vq_ds16.pt": b"weights", "vqvae/config.json": b"{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_source("hf:org/vq/ckpt/vq_ds16.pt") == snap / "ckpt" / "vq_ds16.pt"
    assert resolve_source("hf:org/vq/vqvae") == snap / "vqvae"
    with pytest.raises(CheckpointError) as e:
        resolve_source("hf:org/vq/missing.ckpt")
    msg = str(e.value)
    assert "\n" not in msg and "`hf download org/vq missing.ckpt`" in msg and str(cache) in msg
    with pytest.raises(CheckpointError, match="hf download other/repo --include 'movq/\\*'"):
        resolve_source("hf:other/repo/movq")
    with pytest.raises(ConfigError, match="hf:ORG/REPO"):
        resolve_source("hf:justone")


def test_hf_names_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'tokkit\[peers\]'"):
        resolve_source("hf:org/repo/model.pt")


# ---- a converted diffusers folder through the CLI and tokkit.load --------------------------------------------------


@pytest.fixture
def vq_folder(tmp_path: Path) -> Path:
    pytest.importorskip("diffusers", reason="builds a diffusers VQModel folder (pip install diffusers)")
    from test_peers_diffusers import make_vqmodel

    folder = tmp_path / "amused-like"
    make_vqmodel("amused").save_pretrained(folder)
    return folder


def test_convert_cli_end_to_end(vq_folder: Path, tmp_path: Path) -> None:
    from tokkit.checkpoint import sha256_file
    from tokkit.peers.sources import read_source as read

    out = tmp_path / "converted"
    res = runner.invoke(app, ["convert", str(vq_folder), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    line = res.stdout.strip()
    assert "converted diffusers maskgit-vqgan-f2-k64" in line and "16x16 tokens at 32 px" in line and "64 codes" in line
    meta = json.loads((out / "config.json").read_text())
    prov = meta["extra"]["provenance"]
    weights = vq_folder / "diffusion_pytorch_model.safetensors"
    assert prov["sha256"] == sha256_file(weights) and prov["sha256"][:12] in line
    assert prov["peer"] == "diffusers" and prov["variant"] == "maskgit-vqgan-f2-k64"
    assert prov["source"] == str(vq_folder)
    assert prov["converted_by"] == f"tokkit {tokkit.__version__}" and prov["url"].startswith("https://github.com/")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no pickle

    # an existing --out is refused (and left as it is) unless --force
    again = runner.invoke(app, ["convert", str(vq_folder), "--out", str(out)])
    assert again.exit_code == 2 and "exists" in again.output and "--force" in again.output
    assert json.loads((out / "config.json").read_text()) == meta
    res = runner.invoke(app, ["convert", str(vq_folder), "--out", str(out), "--force", "-q", "--resolution", "64"])
    assert res.exit_code == 0 and "32x32 tokens at 64 px" in res.stdout
    bad = runner.invoke(app, ["convert", str(vq_folder), "--out", str(tmp_path / "o2"), "--resolution", "33"])
    assert bad.exit_code == 2 and "not divisible by the downsampling factor 2" in bad.output

    # tokkit info shows where it came from
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert f"provenance.sha256: {prov['sha256']}" in info.stdout and "provenance.peer: diffusers" in info.stdout

    # tokkit.load: the converted folder and the peer folder itself give the same tokenizer
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a, b = tokkit.load(out), tokkit.load(vq_folder)
    assert torch.equal(a.encode(x), b.encode(x))
    assert torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))
    with pytest.raises(OutputError, match="exists"):
        tokkit.convert(vq_folder, out=out)
    assert read(vq_folder).sha256 == prov["sha256"]


def test_converted_checkpoint_encodes_and_decodes(vq_folder: Path, tmp_path: Path) -> None:
    from helpers import make_folder

    out = tmp_path / "converted"
    tokkit.convert(vq_folder, out=out)
    images = make_folder(tmp_path / "images", n=4, size=(40, 36))
    shards = tmp_path / "shards"
    args = ["encode", str(out), str(images), "--out", str(shards), "--device", "cpu", "-q", "-j", "0"]
    enc = runner.invoke(app, args)
    assert enc.exit_code == 0, enc.output
    pngs = tmp_path / "pngs"
    dec = runner.invoke(app, ["decode", str(out), str(shards), "--out", str(pngs), "--device", "cpu", "-q"])
    assert dec.exit_code == 0, dec.output
    assert len(list(pngs.rglob("*.png"))) == 4


def test_convert_cli_one_line_errors(tmp_path: Path) -> None:
    assert runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "200"}).exit_code == 0
    res = runner.invoke(app, ["convert", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no such file or folder" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "neither a tokkit checkpoint nor a diffusers model" in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--family", "nope"])
    assert res.exit_code == 2 and "neither" in res.output  # the source is read first, then the family is looked up


def test_a_lightning_taming_ckpt_with_its_yaml_converts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path a real taming file takes: Lightning's {"state_dict", "callbacks": {ModelCheckpoint: ...}} read
    weights-only, loss keys dropped, yaml beside it (``configs/*-project.yaml``, as taming's logs lay it out)."""
    pytest.importorskip("taming.modules.diffusionmodules.model", reason="needs taming-transformers")
    yaml = pytest.importorskip("yaml", reason="taming's yaml needs pyyaml (pip install tokkit[peers])")
    from test_peers_taming import _small_peer, _state

    peer, params = _small_peer()
    name = "pytorch_lightning.callbacks.model_checkpoint"
    for mod in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    cls = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = cls
    run = tmp_path / "logs" / "2021-vqgan"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": _state(peer), "callbacks": {cls: {"best_model_score": None}}, "global_step": 7}, ckpt)
    for mod in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.delitem(sys.modules, mod)
    (run / "configs" / "2021-vqgan-project.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))

    res = convert_source(ckpt, out=tmp_path / "vqgan", device="cpu")
    assert res.family.name == "taming" and res.provenance["license"] == "MIT"
    assert set(res.provenance["files"]) == {"last.ckpt", "2021-vqgan-project.yaml"}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(res.tokenizer.encode(x), peer.encode(x)[1])
        assert torch.equal(tokkit.load(tmp_path / "vqgan").encode(x), peer.encode(x)[1])


def test_tokkit_load_of_an_hf_pipeline_repo_from_the_cache(
    vq_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf:ORG/REPO/vqvae (an aMUSEd-style pipeline repo) loads offline from a hand-made hub cache."""
    pytest.importorskip("huggingface_hub", reason="hf: names need huggingface_hub (pip install tokkit[peers])")
    files = {f"vqvae/{p.name}": p.read_bytes() for p in vq_folder.iterdir()}
    snap = _hub_cache(tmp_path / "hub", "org/amused-like", {**files, "model_index.json": b"{}"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tok = tokkit.load("hf:org/amused-like/vqvae")
    direct = tokkit.load(vq_folder)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), direct.encode(x))
    res = convert_source("hf:org/amused-like", out=tmp_path / "out")  # the repo root: its vqvae/ is found
    assert res.provenance["source"] == "hf:org/amused-like" and res.out is not None
    assert (snap / "vqvae" / "config.json").is_file()


def test_hf_online_falls_back_to_the_cache_or_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online: an unreachable hub falls back to the cache; a hub that answers "no such file" says so (fake hub)."""
    errors = types.SimpleNamespace(
        EntryNotFoundError=type("EntryNotFoundError", (Exception,), {}),
        LocalEntryNotFoundError=type("LocalEntryNotFoundError", (Exception,), {}),
    )
    cached = tmp_path / "cached.pt"
    cached.write_bytes(b"x")
    calls: list[bool] = []

    def hf_hub_download(repo, filename, *, cache_dir=None, local_files_only=False):
        calls.append(local_files_only)
        if not local_files_only:
            raise (ConnectionError("unreachable") if filename == "cached.pt" else errors.EntryNotFoundError(filename))
        if filename == "cached.pt":
            return str(cached)
        raise errors.LocalEntryNotFoundError(filename)

    hub = types.SimpleNamespace(errors=errors, hf_hub_download=hf_hub_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_source("hf:org/repo/cached.pt") == cached and calls == [False, True]
    with pytest.raises(CheckpointError, match="hf:org/repo/typo.pt does not exist on the hub"):
        resolve_source("hf:org/repo/typo.pt")


def test_families_get_the_source_name_as_a_hint(tmp_path: Path) -> None:
    seen: list[dict] = []

    def detect(state, extra):
        seen.append(dict(extra))
        return "probe.weight" in state

    def convert(state, extra):
        raise ConfigError("stop here")

    register_family(PeerFamily("probe-test", "MIT", "https://example.org", detect, convert))
    try:
        torch.save({"probe.weight": torch.ones(1)}, tmp_path / "vq_ds16_c2i.pt")
        with pytest.raises(CheckpointError, match="probe-test conversion: stop here"):
            convert_source(tmp_path / "vq_ds16_c2i.pt")
        assert seen[-1] == {"source": str(tmp_path / "vq_ds16_c2i.pt")}
    finally:
        from tokkit import peers

        peers._FAMILIES.pop("probe-test")


def test_a_llamagen_training_checkpoint_converts_by_its_file_name(tmp_path: Path) -> None:
    """LlamaGen saves {"model", "optimizer", "steps", "args"}; the file name gives the variant, the CLI the size."""
    pytest.importorskip("peer_code.llamagen_vq", reason="LlamaGen's vq_model.py (vendored under tests/peer_code)")
    from test_peers_llamagen import _small_peer

    peer = _small_peer()
    ckpt = tmp_path / "vq_ds4_c2i.pt"
    torch.save({"model": peer.state_dict(), "optimizer": {"state": {}}, "steps": 10, "args": None}, ckpt)
    out = tmp_path / "llamagen"
    res = runner.invoke(app, ["convert", str(ckpt), "--out", str(out), "--resolution", "32", "-q"])
    assert res.exit_code == 0, res.output
    assert "converted llamagen vq_ds4_c2i" in res.stdout and "8x8 tokens at 32 px" in res.stdout
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        _, _, (_, _, ref) = peer.quantize(peer.quant_conv(peer.encoder(x)))
        assert torch.equal(tokkit.load(out).encode(x).flatten(), ref.flatten())
