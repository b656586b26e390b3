"""Two rule-based skills SmolLM2-135M-Instruct lacks, generated deterministically.

- ``arith``: add two 3-digit numbers (``What is 347 + 586?`` -> ``933``).
- ``reverse``: reverse 3-5 common words (``... these words: red fish blue`` -> ``blue fish red``).
- ``sub``: subtract a smaller 3-digit number from a larger one (``What is 586 - 347?`` -> ``239``),
  the same format as ``arith`` with another operator: a pair whose fine-tunes must share the
  digit machinery (``run.py --pair arith sub``).
- ``digits``: reverse the digits of a 5-7 digit number (``... digits of 30521`` -> ``12503``):
  digits in and out like ``arith``, but copying rather than arithmetic.

Each skill has one fixed list of evaluation documents (the lm-eval task's ``test`` split; the
first ``fitness_docs`` drive the search, the next ``heldout_docs`` are only reported, see
``evolve.yml``) and an endless stream of training documents that never repeats an evaluation
question. Everything comes from seeded ``random.Random`` streams, so every machine builds the
same documents. The task YAMLs beside this file load the evaluation documents through lm-eval's
``custom_dataset`` hook (no data files, nothing downloaded).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

SKILLS = ("arith", "reverse", "sub", "digits")
N_EVAL = 400  # evaluation documents per skill (fitness + held-out come from these)
EVAL_SEED = {"arith": 1001, "reverse": 1002, "sub": 1003, "digits": 1004}

# Common English words that SmolLM2's tokenizer keeps as one token after a space.
WORDS = (
    "apple river stone cloud green house tiger lamp bread chair music ocean paper window "
    "garden silver horse table water light forest summer winter market doctor yellow "
    "orange mountain bottle pencil rabbit sugar engine camera island planet rocket violin "
    "jacket candle button dragon mirror castle wallet hammer ladder basket"
).split()


def arith_problem(rng: random.Random) -> dict[str, str]:
    """Two 3-digit numbers; the answer is their sum in digits."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return {"question": f"What is {a} + {b}?", "answer": str(a + b)}


def reverse_problem(rng: random.Random) -> dict[str, str]:
    """3-5 distinct words; the answer is the same words in reverse order."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "question": f"Reverse the order of these words: {' '.join(words)}",
        "answer": " ".join(reversed(words)),
    }


def sub_problem(rng: random.Random) -> dict[str, str]:
    """Two different 3-digit numbers, the larger first; the answer is their difference."""
    a, b = rng.sample(range(100, 1000), 2)
    a, b = max(a, b), min(a, b)
    return {"question": f"What is {a} - {b}?", "answer": str(a - b)}


def digits_problem(rng: random.Random) -> dict[str, str]:
    """A 5-7 digit number with no zero at either end; the answer is its digits reversed."""
    n = rng.randint(5, 7)
    digits = [rng.choice("123456789")] + rng.choices("0123456789", k=n - 2)
    digits.append(rng.choice("123456789"))
    return {
        "question": f"Reverse the digits of {''.join(digits)}",
        "answer": "".join(digits[::-1]),
    }


PROBLEMS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "arith": arith_problem,
    "reverse": reverse_problem,
    "sub": sub_problem,
    "digits": digits_problem,
}


def prompt(doc: dict[str, str]) -> str:
    """The prompt the task YAMLs and the fine-tuning use (the target follows after a space)."""
    return f"Question: {doc['question']}\nAnswer:"


def eval_documents(skill: str, n: int = N_EVAL) -> list[dict[str, str]]:
    """The skill's evaluation documents: ``n`` distinct questions from a fixed seed."""
    rng = random.Random(EVAL_SEED[skill])
    docs: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(docs) < n:
        doc = PROBLEMS[skill](rng)
        if doc["question"] not in seen:
            seen.add(doc["question"])
            docs.append(doc)
    return docs


def train_documents(skill: str, seed: int = 0) -> Iterator[dict[str, str]]:
    """An endless stream of training documents, none of them an evaluation question."""
    held = {d["question"] for d in eval_documents(skill)}
    rng = random.Random(f"train-{skill}-{seed}")
    while True:
        doc = PROBLEMS[skill](rng)
        if doc["question"] not in held:
            yield doc


def _dataset(skill: str) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(eval_documents(skill))})


def arith_dataset(**_: Any) -> Any:
    """lm-eval ``custom_dataset`` hook for ``skill_arith``."""
    return _dataset("arith")


def reverse_dataset(**_: Any) -> Any:
    """lm-eval ``custom_dataset`` hook for ``skill_reverse``."""
    return _dataset("reverse")


def sub_dataset(**_: Any) -> Any:
    """lm-eval ``custom_dataset`` hook for ``skill_sub``."""
    return _dataset("sub")


def digits_dataset(**_: Any) -> Any:
    """lm-eval ``custom_dataset`` hook for ``skill_digits``."""
    return _dataset("digits")
