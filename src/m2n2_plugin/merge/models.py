"""Seed models from a mergekit config, and reading/writing model tensors on disk.

The seeds are the models an existing mergekit config names; we resolve them the way a user
expects (a local folder, relative to the mergekit config or to the working directory, else a
Hugging Face repo id fetched by ``huggingface_hub`` when the hub is reachable) and check up
front that they can be merged at all: same architecture, same tensor names and shapes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save_file

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.checkpoint import Checkpoint
from m2n2_plugin.merge.checkpoint import checkpoint_shapes
from m2n2_plugin.merge.checkpoint import tensor_files

# Keys of a mergekit config that carry into every m2n2 merge of the lineage.
CARRIED_KEYS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")


@dataclass(frozen=True)
class Seed:
    """One initial archive member: the name the mergekit config uses and its local folder.

    ``name`` is exactly what the user wrote (``org/model@revision`` included); ``source`` is
    how a lineage names it so that it rebuilds elsewhere: the hub reference for a model from
    the Hugging Face hub, the absolute folder for a local one.
    """

    name: str
    path: Path
    source: str = ""
    #: ``search.seed_config_merge``: the mergekit config (model paths resolved) whose merge
    #: this seed is; it lives in the run's output folder and a lineage rebuilds it from this.
    recipe: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def reference(self) -> str:
        return self.source or str(self.path)

    @property
    def identity(self) -> str:
        """What a resumed run must find again: the folder, and for a merge its recipe too
        (the folder's name never changes when the mergekit config does)."""
        if self.recipe is None:
            return str(self.path)
        digest = hashlib.sha1(json.dumps(self.recipe, sort_keys=True).encode()).hexdigest()
        return f"{self.path} (merge {digest})"


def _resolve_model(name: str, base_dirs: list[Path], revision: str | None = None) -> Path:
    """A local folder, else a Hugging Face repo id (at ``revision``), as mergekit accepts."""
    for base in base_dirs:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            if revision is not None:
                raise M2N2Error(
                    f"model {name}@{revision}: {name!r} is a local folder, which has no "
                    "revisions; name the folder without @revision (or check out that revision)"
                )
            return p.resolve()
    if Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise M2N2Error(f"model {name!r} not found (no such folder)")
    try:  # a Hugging Face repo id, as mergekit accepts
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
            )
        )
    except Exception as exc:  # offline, unknown repo, auth...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        shown = f"{name}@{revision}" if revision else name
        raise M2N2Error(
            f"model {shown!r} not found: not a local folder, and the Hugging Face hub "
            f"could not provide it ({msg})"
        ) from exc


def seeds_from_mergekit(data: dict[str, Any], base_dir: Path) -> tuple[list[Seed], dict[str, Any]]:
    """The seed models of a mergekit config (in order, each once) and the carried settings."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        mc = MergeConfiguration.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise M2N2Error(
            f"mergekit_config is not a valid mergekit config: {where}: {err['msg']}"
        ) from exc
    except (ValueError, RuntimeError) as exc:  # mergekit's own checks, e.g. no `models:`
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise M2N2Error(f"mergekit_config is not a valid mergekit config: {msg}") from exc
    refs = []
    if mc.models:
        refs = [m.model for m in mc.models]
    elif mc.slices:
        refs = [s.model for sl in mc.slices for s in sl.sources]
    refs = list(dict.fromkeys(refs))
    if not refs:
        raise M2N2Error("mergekit_config names no models (need `models:` or `slices:`)")
    dirs = [base_dir, Path.cwd()]
    seeds = []
    for ref in refs:
        if ref.lora is not None:
            # Never dropped: a seed with its LoRA left off would be another model.
            raise M2N2Error(
                f"seed {str(ref)!r}: a LoRA applied on top (model+lora) is not supported by "
                "m2n2 evolve; merge the adapter into the model first (peft's "
                "merge_and_unload, then save_pretrained) and name that folder"
            )
        path = _resolve_model(ref.model.path, dirs, ref.model.revision)
        local = any((d / Path(ref.model.path).expanduser()).is_dir() for d in dirs)
        seeds.append(Seed(str(ref), path, source="" if local else str(ref.model)))
    carried = {k: data[k] for k in CARRIED_KEYS if data.get(k) is not None}
    if "tokenizer_source" in carried:
        carried["tokenizer_source"] = _resolved_reference(
            carried["tokenizer_source"], dirs, "tokenizer_source"
        )
    if mc.base_model is not None:
        carried["base_model"] = _resolved_reference(str(mc.base_model), dirs, "base_model")
    return seeds, carried


#: ``search.seed_config_merge``: the output folder's subfolder holding the config's merge, and
#: that merge's stage name in a ``lineage.yml`` (mergekit-multi).
CONFIG_MERGE = "config_merge"
#: Written into that folder once the merge is complete: the recipe it was made from.
RECIPE_STAMP = "m2n2_recipe.txt"


def _resolved_reference(value: Any, dirs: list[Path], what: str) -> Any:
    """A model reference of a mergekit config (``model@revision`` included) as an absolute
    folder; ``base`` / ``union`` and non-strings are left as they are. ``what`` names the key in
    the error. A ``model+lora`` is refused: dropping the adapter would merge another model."""
    if not isinstance(value, str) or value in ("base", "union"):
        return value
    from mergekit.common import ModelReference

    ref = ModelReference.parse(value)
    if ref.lora is not None:
        raise M2N2Error(
            f"{what} {value!r} applies a LoRA (model+lora), which m2n2 evolve does not "
            "support; merge the adapter into the model first (peft's merge_and_unload, then "
            "save_pretrained) and name that folder"
        )
    return str(_resolve_model(ref.model.path, dirs, ref.model.revision))


def config_merge_seed(data: dict[str, Any], base_dir: Path, out: Path) -> Seed:
    """The seed that ``search.seed_config_merge`` adds: the mergekit config's own merge.

    Its recipe is the config with every model reference resolved as the seeds are (relative to
    the config's folder, then the working directory; hub ids to their local snapshot), so the
    merge is the same wherever it runs from. Nothing is merged here (:func:`write_config_merge`).
    """
    dirs, where = [base_dir, Path.cwd()], "search.seed_config_merge"
    recipe = copy.deepcopy(data)
    for key in ("base_model", "tokenizer_source"):
        if key in recipe:
            recipe[key] = _resolved_reference(recipe[key], dirs, f"{where}: {key}")
    if isinstance(recipe.get("tokenizer"), dict) and "source" in recipe["tokenizer"]:
        tokenizer = recipe["tokenizer"]
        tokenizer["source"] = _resolved_reference(
            tokenizer["source"], dirs, f"{where}: tokenizer.source"
        )
    entries = list(recipe.get("models") or [])
    entries += [s for sl in recipe.get("slices") or [] for s in sl.get("sources") or []]
    for entry in entries:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = _resolved_reference(entry["model"], dirs, f"{where}: model")
    method = recipe.get("merge_method", "merge")
    return Seed(f"mergekit_config merge ({method})", out / CONFIG_MERGE, recipe=recipe)


def write_config_merge(seed: Seed, device: str = "cpu") -> None:
    """Merge ``seed.recipe`` with mergekit into ``seed.path``, unless it already holds it.

    mergekit's ``run_merge`` with its default options, as ``mergekit-yaml`` runs it, on the
    evaluation device. Written beside the folder and renamed into place, stamped with the
    recipe: a killed merge leaves no folder a rerun would trust, and workers that start
    together each merge and keep the first complete one (the merges are identical). A folder
    holding another config's merge is never replaced: the archive may be built on it.
    """
    stamp = seed.path / RECIPE_STAMP

    def holds_it() -> bool:
        if not seed.path.exists():
            return False
        if stamp.is_file() and stamp.read_text() == seed.identity:
            return True
        raise M2N2Error(
            f"{seed.path} holds the merge of another mergekit config (search.seed_config_merge); "
            "use another output_dir, or the config this run started with (delete that folder "
            "only if no study in this output folder has trials yet)"
        )

    if holds_it():
        return
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    tmp = Path(tempfile.mkdtemp(prefix=f".{CONFIG_MERGE}-tmp-", dir=seed.path.parent))
    try:
        try:
            config = MergeConfiguration.model_validate(seed.recipe)
            source = json.dumps(seed.recipe)
            run_merge(config, str(tmp), MergeOptions(device=device), config_source=source)
        except (OSError, M2N2Error):
            raise
        except Exception as exc:  # mergekit's own errors: one line, naming the setting
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise M2N2Error(
                f"search.seed_config_merge: mergekit cannot merge the config ({msg})"
            ) from exc
        (tmp / RECIPE_STAMP).write_text(seed.identity)
        try:
            os.rename(tmp, seed.path)  # fails if the folder exists: another worker's merge
        except OSError:
            if not holds_it():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder or of one safetensors file."""
    out: dict[str, torch.Tensor] = {}
    for f in tensor_files(path) if path.is_dir() else [path]:
        out.update(load_file(str(f)))
    return out


def shared_tensors(paths: list[Path]) -> set[str]:
    """Keys of the tensors that are bit-identical in every model of ``paths``.

    Read once per run (``search.split_over: differing``), one tensor at a time per model:
    fine-tunes often freeze their embeddings, and such a tensor stays the same in every child.
    """
    with contextlib.ExitStack() as stack:
        models = [stack.enter_context(Checkpoint(p)) for p in paths]
        first, rest = models[0], models[1:]
        shared = set()
        for key, entry in first.entries.items():
            same = (key in m.entries and m.entries[key].shape == entry.shape for m in rest)
            if not all(same) or any(m.entries[key].dtype != entry.dtype for m in rest):
                continue
            value = first.get(key)
            if all(torch.equal(value, m.get(key, reuse=True)) for m in rest):
                shared.add(key)
    return shared


def check_compatible(seeds: list[Seed]) -> dict[str, tuple[int, ...]]:
    """Fail with one line unless every seed has the same architecture, tensors and shapes."""
    first = seeds[0]
    archs = {}
    shapes_of = {}
    for s in seeds:
        cfg = s.path / "config.json"
        if not cfg.is_file():
            raise M2N2Error(f"model {s.name!r} has no config.json")
        try:
            hf_config = json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise M2N2Error(f"model {s.name!r}: {cfg} is not valid JSON ({exc})") from exc
        if not isinstance(hf_config, dict):
            raise M2N2Error(f"model {s.name!r}: {cfg} is not a JSON object")
        archs[s.name] = hf_config.get("architectures")
        try:
            shapes_of[s.name] = checkpoint_shapes(s.path)
        except M2N2Error as exc:
            raise M2N2Error(f"model {s.name!r}: {exc}") from exc
    shapes0 = shapes_of[first.name]
    for s in seeds[1:]:
        if archs[s.name] != archs[first.name]:
            raise M2N2Error(
                f"models {first.name!r} and {s.name!r} have different architectures "
                f"({archs[first.name]} vs {archs[s.name]})"
            )
        shapes = shapes_of[s.name]
        missing = sorted(set(shapes0) ^ set(shapes))
        if missing:
            raise M2N2Error(
                f"models {first.name!r} and {s.name!r} have different tensors "
                f"(e.g. {missing[0]!r} is in only one)"
            )
        for k, shape in shapes0.items():
            if shapes[k] != shape:
                raise M2N2Error(
                    f"models {first.name!r} and {s.name!r} have different shapes for {k!r}: "
                    f"{shape} vs {shapes[k]}"
                )
    return shapes0


#: Files that hold a Hugging Face tokenizer (any one of them means the folder has one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizers(seeds: list[Seed]) -> None:
    """Fail with one line unless every seed that ships a tokenizer has the same vocabulary.

    ``m2n2 evolve`` merges tensors position by position and scores every child with one
    tokenizer, so embedding row ``i`` must mean the same token in every seed. A vocabulary of
    the same size in another order passes the shape check and would silently merge unrelated
    tokens; mergekit's ``tokenizer_source`` alignment is not applied inside the evolve loop.
    """
    from transformers import AutoTokenizer

    first: tuple[str, dict[str, int]] | None = None
    for s in seeds:
        if not any((s.path / f).is_file() for f in TOKENIZER_FILES):
            continue
        try:
            vocab = AutoTokenizer.from_pretrained(str(s.path)).get_vocab()
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise M2N2Error(f"the tokenizer of model {s.name!r} cannot be loaded ({msg})") from exc
        if first is None:
            first = (s.name, vocab)
            continue
        name0, vocab0 = first
        if vocab != vocab0:
            token = min(set(vocab0.items()) ^ set(vocab.items()), key=lambda kv: (kv[1], kv[0]))[0]
            ids = (vocab0.get(token), vocab.get(token))
            raise M2N2Error(
                f"models {name0!r} and {s.name!r} have different tokenizers (token {token!r} is "
                f"id {ids[0]} vs {ids[1]}); evolving merges embedding rows position by "
                "position, so every seed must use the same vocabulary"
            )


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file so that a crash never leaves a partial file at ``path``.

    CPU tensors go through ``safetensors`` (straight from their memory); if any tensor lives on
    another device (a resident model on a GPU) the file is streamed one tensor at a time
    (:func:`m2n2_plugin.checkpoint.write_safetensors`), so host memory holds one tensor, not
    a copy of the model.
    """
    from m2n2_plugin.merge.checkpoint import write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name carries the target's (".tmp-trial_000012-...") so that a cleaner can tell
    # whose write a left-over temp file was (RunState.sync_files).
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".safetensors", dir=path.parent)
    on_cpu = all(v.device.type == "cpu" for v in tensors.values())
    if on_cpu:
        os.close(fd)
    try:
        if on_cpu:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        else:
            try:
                write_safetensors(tensors, fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # safetensors reports a failed write (a full disk) as its own error type with the OS
        # error's number in the text: give callers the OSError they can handle.
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and not isinstance(exc, OSError):
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise
