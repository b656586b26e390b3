"""Build two tiny Llama parents and an ``m2n2`` mergekit config, offline, in a few seconds.

    python examples/tiny_merge/make_parents.py /tmp/tiny-merge
    mergekit-yaml /tmp/tiny-merge/m2n2.yml /tmp/tiny-merge/merged

The parents are random (two seeds) 2-layer Llamas with a word-level tokenizer built in code,
saved with ``save_pretrained``; nothing is downloaded. The config merges them with
``merge_method: m2n2``: the first 40 % of the parameters (in the architecture's order) take
30 % of parent B, the rest 70 %. ``--check DIR`` loads a merged model, prints a greedy
continuation (it is an ordinary transformers model) and a verdict: whether its tensors are
exactly the ``m2n2`` merge of the parents its ``mergekit_config.yml`` names, recomputed in
memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = [*"abcdefghijklmnopqrstuvwxyz", *"0123456789"]


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIAL + WORDS)}, "<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_parent(path: Path, seed: int) -> None:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def check(merged: Path) -> bool:
    """Load ``merged``, show a continuation, and say whether it is the m2n2 merge (True)."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from m2n2_plugin.merge.method import m2n2_merge_state_dicts
    from m2n2_plugin.merge.models import read_tensors

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    inputs = tokenizer("a b c", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print(f"{sum(p.numel() for p in model.parameters())} parameters; greedy continuation of")
    print(f"'a b c': {tokenizer.decode(out[0][inputs['input_ids'].shape[1] :])!r}")

    # mergekit-yaml writes the config it ran beside the model.
    recipe = yaml.safe_load((merged / "mergekit_config.yml").read_text())
    a, b = (Path(m["model"]) for m in recipe["models"])
    params = recipe["parameters"]
    expected = m2n2_merge_state_dicts(
        read_tensors(a),
        read_tensors(b),
        mix_ratio=params["mix_ratio"],
        split_point=params["split_point"],
        config=model.config,
    )
    written = read_tensors(merged)
    differ = sorted(n for n in expected if not torch.equal(written.get(n), expected[n]))
    what = f"m2n2({a.name}, {b.name}, mix_ratio={params['mix_ratio']}, split_point="
    what += f"{params['split_point']})"
    if differ or set(written) != set(expected):
        print(f"verdict: NOT the merge {what}: {len(differ)} tensors differ (first: {differ[:1]})")
        return False
    print(f"verdict: ok, all {len(written)} tensors are exactly {what}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("tiny-merge"))
    parser.add_argument("--check", type=Path, metavar="DIR", help="load a merged model")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check(args.check) else 1)
    out = args.out.resolve()
    build_parent(out / "parent_a", seed=1)
    build_parent(out / "parent_b", seed=2)
    config = {
        "merge_method": "m2n2",
        "base_model": str(out / "parent_a"),
        "models": [{"model": str(out / "parent_a")}, {"model": str(out / "parent_b")}],
        "parameters": {"mix_ratio": 0.3, "split_point": 0.4},
        "dtype": "float32",
    }
    (out / "m2n2.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {out / 'parent_a'}, {out / 'parent_b'} and {out / 'm2n2.yml'}; now run")
    print(f"  mergekit-yaml {out / 'm2n2.yml'} {out / 'merged'}")
    print(f"  python {Path(__file__).as_posix()} --check {out / 'merged'}")


if __name__ == "__main__":
    main()
