"""Where a peer checkpoint comes from and how it is read: local paths and ``hf:`` names, pickles read without pickle.

``resolve_source`` turns a name into a local path:

- a local file or folder, as it is;
- ``hf:ORG/REPO/FILE`` (``FILE`` may sit in subfolders): ``huggingface_hub.hf_hub_download``;
- ``hf:ORG/REPO`` or ``hf:ORG/REPO/SUBFOLDER`` (no file suffix): ``snapshot_download`` of a diffusers folder.

Online the hub is asked (and its cache filled); offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) the file is
read from the hub cache (``HF_HUB_CACHE``); with nothing cached the error names the exact file and the command that
fetches it.

``read_source`` reads what the path holds into tensors only:

- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(map_location="cpu", weights_only=True)``. A file that needs
  any other class is refused with the class's name and is never unpickled. The one exception is a short list of
  PyTorch Lightning bookkeeping classes (``LIGHTNING_STANDINS``) that Lightning writes as dictionary keys beside the
  weights (taming's ``.ckpt`` files hold them): their names are bound to inert local stand-ins with no code, so
  nothing from the file runs;
- ``.safetensors``: ``safetensors.torch.load_file``;
- a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), also a pipeline
  repo's ``vqvae/`` or ``movq/`` subfolder.

Wrappers ``{"ema": ...}``, ``{"model": ...}``, ``{"state_dict": ...}`` are unwrapped (in that order, LlamaGen's),
a ``module.`` prefix on every key (DDP) is removed, and entries that are not tensors are dropped. A taming yaml beside
the file (or given as ``config``) is parsed with ``yaml.safe_load`` and its ``model.params`` becomes ``extra``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tokkit.errors import CheckpointError, ConfigError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_SUBFOLDERS = ("vqvae", "movq")  # aMUSEd / Kandinsky pipeline repos keep the VQModel there
WRAPPERS = ("ema", "model", "state_dict")
INSTALL_PEERS = "pip install 'tokkit[peers]'"


@dataclass
class PeerSource:
    """A peer checkpoint read into memory.

    Attributes:
        name: the source as the user gave it (path or ``hf:`` name).
        path: the local file or folder read.
        state: tensors only, wrappers removed.
        extra: the side config (a taming yaml's ``model.params``, a diffusers ``config.json``) or {}.
        files: sha256 of every file read, by file name (weights first).
    """

    name: str
    path: Path
    state: dict[str, Tensor]
    extra: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The weights file's sha256."""
        return next(iter(self.files.values()))


# ---- hf: names ------------------------------------------------------------------------------------------------------


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"hf: sources need huggingface_hub: {INSTALL_PEERS}") from None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def parse_hf(name: str) -> tuple[str, str | None, str | None]:
    """``hf:ORG/REPO[/PATH]`` -> (repo_id, file or None, subfolder or None): a PATH with a weights/yaml suffix is a
    file, otherwise a subfolder of a diffusers repo."""
    parts = [p for p in name[3:].strip("/").split("/") if p]
    if len(parts) < 2:
        raise ConfigError(f"{name!r}: write hf:ORG/REPO, hf:ORG/REPO/FILE or hf:ORG/REPO/SUBFOLDER")
    repo, rest = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if rest is not None and rest.lower().endswith((*WEIGHT_SUFFIXES, ".yaml", ".yml", ".json")):
        return repo, rest, None
    return repo, None, rest


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A local path for ``source``: the path itself, or the hub's cached copy of an ``hf:`` name.

    Args:
        source: a local file or folder, ``hf:ORG/REPO/FILE``, ``hf:ORG/REPO`` or ``hf:ORG/REPO/SUBFOLDER``.

    Returns:
        The local file or folder.

    Raises:
        CheckpointError: a missing local path; an ``hf:`` name neither downloadable nor cached (the message names
            the file and the command that fetches it).
        ConfigError: a malformed ``hf:`` name; huggingface_hub not installed.
    """
    text = os.fspath(source)
    if not text.startswith("hf:"):
        path = Path(text).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"no such file or folder: {path} (give a tokkit checkpoint folder, a peer checkpoint file or folder, "
                "or hf:ORG/REPO/FILE)"
            )
        return path
    repo, filename, subfolder = parse_hf(text)
    hub = _hub()
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it once, at import
    offline = _offline()
    errors = _hub_errors(hub)

    def fetch(local_only: bool) -> str:
        if filename is not None:
            return hub.hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_only)
        patterns = ["config.json", "diffusion_pytorch_model.*", "*/config.json", "*/diffusion_pytorch_model.*"]
        if subfolder:
            patterns = [f"{subfolder}/config.json", f"{subfolder}/diffusion_pytorch_model.*"]
        return hub.snapshot_download(repo, cache_dir=cache_dir, local_files_only=local_only, allow_patterns=patterns)

    try:
        local = fetch(local_only=offline)
    except errors as first:
        if offline:
            raise CheckpointError(_not_cached(repo, filename, subfolder, cache_dir)) from None
        try:
            local = fetch(local_only=True)  # the hub did not answer: the cache may still hold it
        except errors:
            missing = type(first).__name__ in ("EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError")
            if missing:  # the hub answered: no such repo or file
                what = f"{repo}/{filename}" if filename else repo
                hint = "or is private: log in with `hf auth login`"
                raise CheckpointError(f"hf:{what} does not exist on the hub ({hint})") from None
            raise CheckpointError(_not_cached(repo, filename, subfolder, cache_dir)) from None
    path = Path(local)
    if filename is None and subfolder:
        path = path / subfolder
        if not path.is_dir():
            raise CheckpointError(_not_cached(repo, filename, subfolder, cache_dir))
    return path


def _hub_errors(hub: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean "not fetched": offline, unreachable, not in the cache, no such repo or file."""
    names = ("LocalEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
             "HfHubHTTPError", "OfflineModeIsEnabled")  # fmt: skip
    found = [getattr(hub.errors, n) for n in names if hasattr(getattr(hub, "errors", None), n)]
    try:
        import httpx  # huggingface_hub >= 1.0 talks through httpx, whose connection errors are not OSErrors

        found.append(httpx.HTTPError)
    except ImportError:
        pass
    return (*found, OSError, ValueError)  # requests' connection errors are OSErrors; a malformed repo id a ValueError


def _not_cached(repo: str, filename: str | None, subfolder: str | None, cache_dir: str | None) -> str:
    what = filename or (f"{subfolder}/ (config.json + diffusion_pytorch_model.*)" if subfolder else "the folder")
    cmd = f"hf download {repo} {filename}" if filename else f"hf download {repo}"
    if subfolder and not filename:
        cmd += f" --include '{subfolder}/*'"
    where = cache_dir or "~/.cache/huggingface/hub (or $HF_HUB_CACHE)"
    return (
        f"hf:{repo}: {what} is not in the Hugging Face cache and the hub is unreachable: on a machine with internet "
        f"run `{cmd}` (older huggingface_hub: huggingface-cli download) and copy the cache to {where}, or download the "
        "file and pass its local path"
    )


# ---- reading --------------------------------------------------------------------------------------------------------


class _Inert:
    """Stands in for a bookkeeping class named in a checkpoint; it has no code and keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _InertDict(dict):
    """Stands in for a dict subclass (Lightning's ``AttributeDict`` hyper-parameters)."""


# Lightning writes ``{ModelCheckpoint: state}`` into ``callbacks`` and hyper-parameters as ``AttributeDict``: names
# only, bound here to inert stand-ins (nothing of Lightning, nothing from the file, is imported or run).
LIGHTNING_STANDINS: dict[str, type] = {
    f"{root}.{name}": standin
    for root in ("pytorch_lightning", "lightning.pytorch")
    for name, standin in (
        ("callbacks.model_checkpoint.ModelCheckpoint", _Inert),
        ("callbacks.early_stopping.EarlyStopping", _Inert),
        ("callbacks.lr_monitor.LearningRateMonitor", _Inert),
        ("utilities.parsing.AttributeDict", _InertDict),
    )
}


def load_pickle_weights(path: Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with Lightning's bookkeeping names bound to inert
    stand-ins; any other class is refused in one line naming it.

    Raises:
        CheckpointError: the file needs a class the weights-only reader refuses, or is not a torch file.
    """
    standins = [(cls, name) for name, cls in LIGHTNING_STANDINS.items()]
    try:
        with torch.serialization.safe_globals(standins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", text)
        if m is None:  # not a class: a damaged or foreign file ("Unsupported operand 110")
            why = re.search(r"(Unsupported operand \w+|invalid load key[^\n]*)", text)
            detail = why.group(1) if why else "unpickling failed"
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({detail})") from None
        what = m.group(1) or m.group(2)
        raise CheckpointError(
            f"{path}: refused: it needs {what}, which a weights-only read does not allow (tokkit never unpickles "
            "code); re-save its state_dict with torch.save or as .safetensors in the peer's own environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first})") from None


def unwrap(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors of a checkpoint: ``ema`` / ``model`` / ``state_dict`` wrappers removed, ``module.`` prefixes stripped,
    non-tensor entries dropped.

    Raises:
        CheckpointError: no tensors found.
    """
    for _ in range(4):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping) and _has_tensors(obj[k])), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(map(str, list(obj)[:6]))
        raise CheckpointError(f"{where} holds no tensors (top-level keys: {keys or 'none'})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _has_tensors(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, Tensor) or (isinstance(v, Mapping) and _has_tensors(v)) for v in obj.values())


def read_weights(path: Path) -> dict[str, Tensor]:
    """Tensors of one weights file (``.safetensors`` or a torch pickle read weights-only), unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return unwrap(load_file(str(path)), str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if path.suffix in PICKLE_SUFFIXES:
        return unwrap(load_pickle_weights(path), str(path))
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (use {', '.join(WEIGHT_SUFFIXES)})")


def diffusers_folder(path: Path) -> Path | None:
    """The folder holding a diffusers model's ``config.json`` + weights: ``path`` or its vqvae/ or movq/ subfolder."""
    for d in (path, *(path / s for s in DIFFUSERS_SUBFOLDERS)):
        if (d / "config.json").is_file() and any((d / w).is_file() for w in DIFFUSERS_WEIGHTS):
            return d
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    """A taming config's ``model.params`` (``ddconfig``, ``n_embed``, ``embed_dim`` ...), read with ``safe_load``.

    Raises:
        ConfigError: unreadable yaml, or no ``model.params`` / ``ddconfig`` in it; pyyaml missing.
    """
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"reading {path} needs pyyaml: {INSTALL_PEERS}") from None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a readable yaml file ({first})") from None
    params = data.get("model", {}).get("params") if isinstance(data, dict) else None
    if isinstance(data, dict) and params is None and "ddconfig" in data:
        params = data
    if not isinstance(params, dict):
        raise ConfigError(f"{path} has no model.params: not a taming-transformers config")
    return params


def _yaml_beside(path: Path) -> Path | None:
    """taming's yaml for a ``.ckpt``: ``STEM.yaml`` beside it, the only yaml beside it, or ``../configs/*-project``."""
    own = [path.with_suffix(s) for s in (".yaml", ".yml")]
    for p in own:
        if p.is_file():
            return p
    beside = sorted([*path.parent.glob("*.yaml"), *path.parent.glob("*.yml")])
    if len(beside) == 1:
        return beside[0]
    project = sorted((path.parent.parent / "configs").glob("*-project.yaml"))
    return project[0] if len(project) == 1 else None


def read_source(source: str | os.PathLike[str], config: str | os.PathLike[str] | None = None) -> PeerSource:
    """Resolve and read a peer checkpoint: tensors, side config and file hashes.

    Args:
        source: local file / folder or ``hf:`` name (see ``resolve_source``).
        config: a taming yaml (local or ``hf:``); default: the yaml beside a checkpoint file, if one is there.

    Returns:
        The ``PeerSource``.

    Raises:
        CheckpointError: missing, refused or unreadable files.
        ConfigError: a bad ``config``.
    """
    from tokkit.checkpoint import sha256_file

    name = os.fspath(source)
    path = resolve_source(source)
    files: dict[str, Path] = {}
    if path.is_dir():
        folder = diffusers_folder(path)
        if folder is None:
            raise CheckpointError(
                f"{path} is a folder but neither a tokkit checkpoint nor a diffusers model (config.json + "
                f"{' or '.join(DIFFUSERS_WEIGHTS)}, or a vqvae/ subfolder): pass the checkpoint file itself"
            )
        weights = next(folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file())
        state = read_weights(weights)
        try:
            extra = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({e})") from None
        if not isinstance(extra, dict):
            raise CheckpointError(f"{folder / 'config.json'} is not a JSON object")
        files = {weights.name: weights, "config.json": folder / "config.json"}
        path = folder
    else:
        state = read_weights(path)
        files = {path.name: path}
        extra = {}
        yaml_path = resolve_source(config) if config is not None else _yaml_beside(path)
        if yaml_path is not None:
            try:
                extra = read_yaml(yaml_path)
                files[yaml_path.name] = yaml_path
            except ConfigError:
                if config is not None:
                    raise
    if config is not None and path.is_dir():
        raise ConfigError("--config is for a taming .ckpt; a diffusers folder carries its own config.json")
    return PeerSource(name, path, state, extra, {k: sha256_file(p) for k, p in files.items()})


__all__ = [
    "LIGHTNING_STANDINS",
    "PeerSource",
    "diffusers_folder",
    "load_pickle_weights",
    "parse_hf",
    "read_source",
    "read_weights",
    "read_yaml",
    "resolve_source",
    "unwrap",
]
