"""Loading base models: a local Hugging Face folder, or the bundled tiny MoE named ``tiny``."""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from flexmoe.errors import FlexMoEError

TINY = "tiny"
FINGERPRINT_SAMPLE = 1024  # values hashed per parameter
FINGERPRINT_VERSION = 2  # 1: names, shapes, routers and embeddings only


def quiet_transformers() -> None:
    """Our own progress bars speak for long work; transformers' per-load bars are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def tiny_model_path() -> Path:
    """The folder of the pretrained tiny MoE shipped inside the package."""
    return Path(str(resources.files("flexmoe") / "assets" / "tiny"))


def resolve_model_path(name_or_path: str | Path) -> Path:
    """``tiny`` or a local folder holding a Hugging Face model; anything else is refused."""
    path = tiny_model_path() if str(name_or_path) == TINY else Path(name_or_path).expanduser()
    if not path.exists():
        raise FlexMoEError(
            f"model path {str(path)!r} does not exist; give a local Hugging Face model folder "
            f"or {TINY!r} for the bundled model (nothing is downloaded from a hub)"
        )
    if not (path / "config.json").is_file():
        raise FlexMoEError(
            f"{str(path)!r} is not a model folder: it has no config.json; give a folder written "
            "by save_pretrained"
        )
    return path


def load_model(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder, in evaluation mode."""
    path = resolve_model_path(name_or_path)
    with _loading(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
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
    any device, has the same fingerprint.
    """
    digest = hashlib.sha256(getattr(model.config, "model_type", "").encode())
    for name, parameter in model.named_parameters():
        flat = parameter.detach().flatten()
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLE)][:FINGERPRINT_SAMPLE]
        digest.update(f"{name}:{tuple(parameter.shape)}".encode())
        digest.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
