"""The built-in example: two tiny specialists that merge into a model with both skills.

Everything is generated on the spot, offline, in seconds on a CPU:

* a character-level tokenizer (no download) and a tiny Llama (2 layers, ~70 k parameters);
* two rule-based skills on 4-letter words — ``shift`` (each letter to the next one, z -> a)
  and ``reverse`` (the word backwards) — plus ``copy``, the format every model learns first;
* a base model trained on ``copy``, and two specialists fine-tuned from it, one per skill, so
  they share an ancestor (as real fine-tunes do) but each fails the other's skill;
* lm-eval tasks (``generate_until`` + ``exact_match`` behind a ``strict-match`` filter, the
  same shape as GSM8k's) over local JSONL, a mergekit slerp config naming the two specialists,
  and an ``m2n2 evolve`` config that uses them as seeds.

The documents of each skill are split three ways by a fixed seed: ``train`` (fine-tuning only),
``fitness`` (what evolution sees) and ``heldout`` (reported, never optimised) — disjoint sets.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch

SKILLS = ("shift", "reverse")
WORD_LEN = 4
LETTERS = string.ascii_lowercase
# Every character the tasks use; the tokenizer is one token per character.
ALPHABET = LETTERS + string.digits + " \n:QA"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def apply_skill(skill: str, word: str) -> str:
    """The right answer for ``skill`` on ``word``."""
    if skill == "copy":
        return word
    if skill == "shift":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)
    if skill == "reverse":
        return word[::-1]
    raise ValueError(f"unknown skill {skill!r}")


def make_documents(skill: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct documents ``{"question": "<skill> <word>", "answer": ...}``."""
    rng = random.Random(f"{skill}:{seed}")
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(LETTERS) for _ in range(WORD_LEN)))
    return [{"question": f"{skill} {w}", "answer": apply_skill(skill, w)} for w in sorted(words)]


def split_documents(
    docs: list[dict[str, str]], n_fitness: int, n_heldout: int
) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / fitness / heldout splits (the first two come off the end)."""
    if n_fitness + n_heldout >= len(docs):
        raise ValueError("not enough documents for the requested fitness and held-out sets")
    return {
        "fitness": docs[:n_fitness],
        "heldout": docs[n_fitness : n_fitness + n_heldout],
        "train": docs[n_fitness + n_heldout :],
    }


def prompt(question: str) -> str:
    """The prompt format shared by training and the lm-eval tasks."""
    return f"Q: {question}\nA:"


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """A character-level fast tokenizer built in code (nothing is downloaded)."""
    from tokenizers import Tokenizer
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A tiny LlamaForCausalLM with a fixed initialisation."""
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model, tokenizer, docs: list[dict[str, str]], steps: int, seed: int, lr: float = 3e-3):
    """Plain next-token training on ``prompt + " " + answer + "\\n"`` strings."""
    texts = [f"{prompt(d['question'])} {d['answer']}\n" for d in docs]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(texts), (64,), generator=gen)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def greedy_accuracy(model, tokenizer, docs: list[dict[str, str]]) -> float:
    """Share of documents answered exactly by greedy decoding (a quick check, not lm-eval)."""
    tokenizer.padding_side = "left"
    enc = tokenizer([prompt(d["question"]) + " " for d in docs], return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=WORD_LEN + 1, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(t.strip() == d["answer"] for t, d in zip(texts, docs, strict=True)) / len(docs)


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

#: Documents per skill in the example's fitness and held-out sets.
N_FITNESS = 60
N_HELDOUT = 100


def build_example(folder: str | Path, n_trials: int = 60, quiet: bool = False) -> Path:
    """Train the example's seeds (once; cached in ``folder``) and write its configs.

    Returns the path of the ``m2n2 evolve`` config. Takes ~30-60 s on 2 CPU cores.
    """
    import copy

    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    folder = Path(folder).resolve()
    models = folder / "models"
    tasks = folder / "tasks"
    docs = {s: make_documents(s, 3000, seed=0) for s in ("copy", *SKILLS)}
    splits = {s: split_documents(d, N_FITNESS, N_HELDOUT) for s, d in docs.items()}
    for skill in SKILLS:
        # One task per skill; its documents are the fitness set followed by the held-out set.
        write_jsonl(tasks / f"{skill}.jsonl", splits[skill]["fitness"] + splits[skill]["heldout"])
        (tasks / f"{skill}.yaml").write_text(
            TASK_YAML.format(task=f"m2n2_example_{skill}", data=tasks / f"{skill}.jsonl")
        )
    names = {skill: f"{skill}-specialist" for skill in SKILLS}
    if not all((models / n / "model.safetensors").is_file() for n in names.values()):
        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        mix = splits["copy"]["train"][:500] + splits["shift"]["train"] + splits["reverse"]["train"]
        # A base that has seen the format and both skills but masters neither ...
        base = train(build_model(len(tokenizer), seed=0), tokenizer, mix, steps=400, seed=0)
        for i, skill in enumerate(SKILLS):
            # ... and two specialists fine-tuned from it, each on one skill only.
            spec = train(
                copy.deepcopy(base),
                tokenizer,
                splits[skill]["train"],
                steps=150,
                seed=i + 1,
                lr=1e-3,
            )
            spec.save_pretrained(models / names[skill], safe_serialization=True)
            tokenizer.save_pretrained(models / names[skill])
            if not quiet:
                acc = {s: greedy_accuracy(spec, tokenizer, splits[s]["fitness"]) for s in SKILLS}
                print(f"trained {names[skill]}: fitness accuracy {acc}")
    (folder / "seeds.yml").write_text(
        "# An ordinary mergekit config: its models become the M2N2 seeds.\n"
        "merge_method: slerp\n"
        f"base_model: models/{names['shift']}\n"
        "models:\n"
        f"  - model: models/{names['shift']}\n"
        f"  - model: models/{names['reverse']}\n"
        "parameters:\n  t: 0.5\n"
        "dtype: float32\n"
    )
    config = folder / "evolve.yml"
    config.write_text(
        "# m2n2 evolve config of the built-in example (see `m2n2 example --help`).\n"
        "mergekit_config: seeds.yml\n"
        "fitness:\n"
        "  include_path: tasks\n"
        f"  tasks: [m2n2_example_{SKILLS[0]}, m2n2_example_{SKILLS[1]}]\n"
        "  metric: exact_match\n"
        "  filter: strict-match\n"
        f"  fitness_docs: {N_FITNESS}\n"
        f"  heldout_docs: {N_HELDOUT}\n"
        "  batch_size: 64\n"
        "  num_threads: 1\n"
        "search:\n"
        f"  n_trials: {n_trials}\n"
        "  archive_size: 8\n"
        "  seed: 0\n"
        "output_dir: run\n"
    )
    return config
