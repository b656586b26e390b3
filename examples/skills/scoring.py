"""One resident model scored by an evolve config's lm-eval fitness, for any model folder.

run.py (baselines), cma_baseline.py (every CMA-ES trial) and h2h.py (each run's best model on
the held-out documents) score with this, so every number of the example comes from the same
lm-eval code on the same documents as ``m2n2 evolve``'s own fitness.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Scorer:
    """``config``'s fitness on one resident model built from ``base``'s config (weights are
    loaded per call). ``cache``: a JSON file of scores already computed, keyed by the model
    files' paths and modification times (None: no cache; one process per cache file)."""

    def __init__(self, config: Path, base: Path, cache: Path | None = None) -> None:
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig
        from transformers import AutoModelForCausalLM
        from transformers import AutoTokenizer

        from m2n2_plugin.search.config import load_config
        from m2n2_plugin.search.fitness import load_fitness

        cfg = load_config(config)
        fc = cfg.fitness
        torch.set_num_threads(fc.num_threads or os.cpu_count() or 1)
        self.fitness, fitness_docs, heldout_docs = load_fitness(cfg)
        self.docs = {"fitness": fitness_docs, "heldout": heldout_docs}
        self.cache = cache
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        self.lm = HFLM(pretrained=self.model, tokenizer=tokenizer, batch_size=fc.batch_size)

    def __call__(self, folder: Path, which: str = "heldout") -> dict[str, float]:
        """Mean score per task and overall of the model in ``folder``."""
        return self.scores(folder, which)["means"]

    def scores(self, folder: Path, which: str = "heldout") -> dict[str, Any]:
        """``{"means": ..., "docs": [one score per document]}``."""
        from m2n2_plugin.merge.checkpoint import tensor_files
        from m2n2_plugin.merge.resident_model import load_checkpoint_into_model

        docs = self.docs[which]
        key, cache = None, {}
        if self.cache is not None:
            stamp = [(str(f.resolve()), f.stat().st_mtime_ns) for f in tensor_files(folder)]
            span = {t: [ids[0], ids[-1], len(ids)] for t, ids in docs.ids.items() if ids}
            key = json.dumps([which, span, stamp])
            cache = json.loads(self.cache.read_text()) if self.cache.is_file() else {}
            if "docs" in cache.get(key, {}):
                return cache[key]
        load_checkpoint_into_model(self.model, folder)
        per_doc = self.fitness.score(self.lm, docs)
        out = {"means": docs.task_means(per_doc), "docs": per_doc.tolist()}
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            self.cache.write_text(json.dumps({**cache, key: out}))
        return out
