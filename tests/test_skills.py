"""The skill-fusion example's data generators and lm-eval task YAMLs (examples/skills/tasks).

Fast and offline: no model is loaded. The task YAMLs are loaded by lm-eval through the same
``LmEvalFitness`` that ``m2n2 evolve`` uses, and scored with a scripted LM, so a wrong prompt,
filter or metric in a YAML fails here rather than an hour into a run.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_eval.api.model import LM

TASKS = Path(__file__).resolve().parents[1] / "examples" / "skills" / "tasks"


@pytest.fixture(scope="module")
def skills():
    sys.path.insert(0, str(TASKS))
    try:
        yield importlib.import_module("skills")
    finally:
        sys.path.remove(str(TASKS))


def solve(skill: str, question: str) -> str:
    """An independent solver that parses the question text."""
    if skill in ("arith", "sub"):
        m = re.fullmatch(r"What is (\d{3}) ([+-]) (\d{3})\?", question)
        assert m and m[2] == {"arith": "+", "sub": "-"}[skill], question
        a, b = int(m[1]), int(m[3])
        if skill == "sub":
            assert a > b, question
        return str(a + b if skill == "arith" else a - b)
    if skill == "digits":
        m = re.fullmatch(r"Reverse the digits of ([1-9]\d{3,5}[1-9])", question)
        assert m, question
        return m[1][::-1]
    m = re.fullmatch(r"Reverse the order of these words: ([a-z ]+)", question)
    assert m, question
    return " ".join(m[1].split()[::-1])


@pytest.mark.parametrize("skill", ["arith", "reverse", "sub", "digits"])
def test_targets_are_right_and_splits_disjoint(skills, skill: str) -> None:
    docs = skills.eval_documents(skill)
    assert len(docs) == skills.N_EVAL
    assert docs == skills.eval_documents(skill)  # deterministic
    questions = [d["question"] for d in docs]
    assert len(set(questions)) == len(questions)
    train = list(itertools.islice(skills.train_documents(skill, seed=0), 5000))
    assert not {d["question"] for d in train} & set(questions)
    assert train[:50] == list(itertools.islice(skills.train_documents(skill, seed=0), 50))
    assert train[:50] != list(itertools.islice(skills.train_documents(skill, seed=1), 50))
    for doc in docs + train:
        assert doc["answer"] == solve(skill, doc["question"])
    if skill == "digits":
        assert {len(d["answer"]) for d in docs} == {5, 6, 7}
    if skill == "reverse":
        lengths = {len(d["answer"].split()) for d in docs}
        assert lengths == {3, 4, 5}
        for d in docs:
            words = d["answer"].split()
            assert len(set(words)) == len(words) and set(words) <= set(skills.WORDS)


class ScriptedLM(LM):
    """Answers every prompt from a lookup table (right for some documents, wrong for others)."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__()
        self.replies = replies
        self.requests: list[tuple[str, dict]] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            self.requests.append((context, gen_kwargs))
            out.append(self.replies[context])
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_task_yamls_load_and_score_through_lm_eval(skills) -> None:
    from m2n2_plugin.search.documents import DocSet
    from m2n2_plugin.search.fitness import LmEvalFitness

    tasks = ["skill_arith", "skill_reverse", "skill_sub", "skill_digits"]
    fitness = LmEvalFitness(tasks, metric="exact_match", filter="strip", include_path=str(TASKS))
    assert fitness.sizes == {t: skills.N_EVAL for t in tasks}
    ids = {
        "skill_arith": [0, 1, 2, 3, 399],
        "skill_reverse": [5, 6, 7],
        "skill_sub": [9, 10],
        "skill_digits": [4],
    }
    # Right answers (with the leading space and trailing text a model produces) score 1,
    # a wrong digit or word order scores 0.
    replies, expected = {}, []
    for task, wanted in ids.items():
        docs = skills.eval_documents(task.removeprefix("skill_"))
        for n, i in enumerate(wanted):
            doc = docs[i]
            right = n % 2 == 0
            answer = doc["answer"] if right else doc["answer"][::-1] + "x"
            replies[skills.prompt(doc)] = " " + answer + "  "
            expected.append(1.0 if right else 0.0)
    lm = ScriptedLM(replies)
    scores = fitness.score(lm, DocSet(ids))
    np.testing.assert_array_equal(scores, expected)
    assert len(lm.requests) == 11
    for context, gen_kwargs in lm.requests:
        assert context.startswith("Question: ") and context.endswith("\nAnswer:")
        assert gen_kwargs["until"] == ["\n"] and gen_kwargs["do_sample"] is False


def test_paired_interval_of_run_py():
    """run.py's paired difference equals the textbook one (mean of the per-document
    differences, 1.96 sample standard deviations over sqrt(n)), computed here by hand."""
    import math
    import statistics

    # By path, under its own name: other examples have a run.py too.
    spec = importlib.util.spec_from_file_location("skills_run", TASKS.parent / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.7).astype(float).tolist()
    b = (rng.random(400) < 0.6).astype(float).tolist()
    d = [x - y for x, y in zip(a, b, strict=True)]
    got = run.paired(a, b)
    assert got["n"] == 400
    assert got["diff"] == pytest.approx(sum(d) / 400)
    assert got["ci95"] == pytest.approx(1.96 * statistics.stdev(d) / math.sqrt(400))
    # The same documents scored twice: no difference, no width.
    assert run.paired(a, a) == {"diff": 0.0, "ci95": 0.0, "n": 400}
