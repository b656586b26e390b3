"""The ``m2n2 evolve`` config: a mergekit config (the seeds), an lm-eval fitness, a search.

Validated like mergekit validates its own YAML (pydantic, unknown keys rejected), so a typo is
an error, not a silently ignored setting. Example::

    mergekit_config: seeds.yml        # an existing mergekit config, used as-is
    fitness:
      tasks: [gsm8k]
      metric: exact_match
      filter: strict-match
      fitness_docs: 200               # the first 200 documents of each task
      heldout_docs: 200               # the next 200, reported, never optimised
      weighting: per_task             # every task weighs the same in total (per_document: each
      task_weights: {gsm8k: 1.0}      #   document weighs its task's weight); default weight 1
      batch_size: 16
    search:
      n_trials: 500
      archive_size: 20
      seed: 0
      seed_config_merge: true         # the config's own merge is a seed too: refine it
      tracking: mlflow                # optional: log every trial to MLflow (or wandb)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated
from typing import Any
from typing import Literal

import yaml
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import ValidationInfo
from pydantic import field_validator

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.kernel import MAX_SPLIT_POINTS

DocSpec = int | list[int] | dict[str, list[int]]

#: Bounds past which a value is a typo, not a setting: every archive slot holds a whole model
#: on disk (the paper uses 20), and the sampler sizes its state by the archive before the first
#: trial, so ``archive_size: 1000000000`` would allocate gigabytes and hang.
MAX_ARCHIVE_SIZE = 1000
MAX_ALPHA = 10.0
MAX_THREADS = 1024
MAX_BATCH = 100_000
MAX_FEWSHOT = 1000
#: A task weight is relative to the others (1 by default); past this it is a typo.
MAX_TASK_WEIGHT = 1e6

TaskWeight = Annotated[float, Field(gt=0.0, le=MAX_TASK_WEIGHT, allow_inf_nan=False)]


class FitnessConfig(BaseModel):
    """Which lm-eval tasks, metric and documents give the per-document scores."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1)
    metric: str
    filter: str | None = None
    include_path: str | list[str] | None = None  # one folder or several
    include_defaults: bool | None = None
    fitness_docs: DocSpec
    heldout_docs: DocSpec | None = None
    # How much each fitness document counts in the archive's resource competition (the
    # sampler's capacity c_j; weights.py). ``per_task``: a task's weight is its total, shared by
    # its documents (c_j = w_task / n_docs(task)), so a task of 500 documents does not outweigh
    # one of 50 tenfold. ``per_document``: each document weighs its task's weight (all weights
    # 1: every document the same, the behaviour before these keys existed).
    weighting: Literal["per_task", "per_document"] = "per_task"
    task_weights: dict[str, TaskWeight] | None = None
    # lm-eval's own evaluation options, under lm-eval's names.
    num_fewshot: int | None = Field(default=None, ge=0, le=MAX_FEWSHOT)
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Literal["auto"] = 8
    device: str = "cpu"
    # torch CPU threads for this process; None keeps torch's default. 1 is fastest for tiny
    # models and when several workers share a machine (threads oversubscribe the cores).
    num_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    gen_kwargs: dict[str, Any] | str | None = None  # a mapping or lm-eval's "k=v,k=v"
    # HFLM options that act on an in-memory model (max_length, add_bos_token, ...), as a
    # mapping or lm-eval's "k=v,k=v"; others are refused by name (fitness.hflm_model_args).
    model_args: dict[str, Any] | str | None = None
    # lm-eval's flag for tasks that run the model's generated code (humaneval, mbpp...).
    confirm_run_unsafe_code: bool = False
    apply_chat_template: bool | str = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("task_weights")
    @classmethod
    def _known_tasks(
        cls, v: dict[str, float] | None, info: ValidationInfo
    ) -> dict[str, float] | None:
        tasks = info.data.get("tasks")
        if v is not None and tasks is not None:
            unknown = [task for task in v if task not in tasks]
            if unknown:
                known = ", ".join(tasks)
                raise ValueError(
                    f"names task {unknown[0]!r}, which is not in fitness.tasks ({known})"
                )
        return v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        from m2n2_plugin.search.devices import check_device_name

        return check_device_name(v)

    @field_validator("fitness_docs")
    @classmethod
    def _some_docs(cls, v: DocSpec) -> DocSpec:
        if (isinstance(v, int) and v < 1) or (not isinstance(v, int) and len(v) == 0):
            raise ValueError("the fitness set is empty")
        return v


class SearchConfig(BaseModel):
    """The M2N2 search and where the Optuna study lives."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int = Field(default=100, ge=1)
    archive_size: int = Field(default=20, ge=2, le=MAX_ARCHIVE_SIZE)
    # 1 is M2N2, 0 a plain GA by raw score; early rejection is exact for alpha in [0, 1].
    alpha: float = Field(default=1.0, ge=0.0, le=MAX_ALPHA, allow_inf_nan=False)
    seed: int | None = 0
    use_attraction: bool = True
    use_split_point: bool = True
    granularity: Literal["element", "layer"] = "element"
    # Where the split point is drawn: over every parameter (all, the paper), or only over the
    # tensors in which the seeds differ (differing: a split inside a tensor every seed shares,
    # e.g. a frozen embedding, changes nothing there). merge.layout.SplitSpace.
    split_over: Literal["all", "differing"] = "all"
    # Split points per child: 1 is the paper; k > 1 alternates the ratio between them, so one
    # crossover changes up to k + 1 regions of the model.
    split_points: int = Field(default=1, ge=1, le=MAX_SPLIT_POINTS)
    # Stop scoring a child once it provably cannot enter the archive (exact: the archive is
    # the same as without it). Documents are scored in chunks of this many, hardest first.
    early_rejection: bool = True
    rejection_chunk: int | None = Field(default=None, ge=1)
    # Refine the merge you already have: the mergekit config's own merge (merged once by
    # mergekit into <output_dir>/config_merge) is one more seed, after the config's models.
    seed_config_merge: bool = False
    # The mergekit config's base_model is one more seed (after its models): children can move
    # a region back towards it, e.g. task-vector weights that sum below 1.
    seed_base_model: bool = False
    storage: str | None = None
    study_name: str = "m2n2"
    heartbeat_interval: int | None = Field(default=60, ge=1)
    # Experiment tracking (tracking.py): every trial logged to MLflow or W&B through
    # optuna-integration's callbacks. The package must be installed (checked before the run).
    tracking: Literal["mlflow", "wandb"] | None = None
    # MLflow's tracking URI; unset: $MLFLOW_TRACKING_URI, else MLflow's own default. A plain
    # path is relative to the config file's folder.
    tracking_uri: str | None = Field(default=None, min_length=1)
    # Archive members in an Optuna artifact store (archive_store.py), for workers on several
    # machines without a shared folder: a folder (relative to the config file's folder),
    # s3://bucket/prefix or gs://bucket/prefix. Unset: members are files in output_dir.
    archive_store: str | None = Field(default=None, min_length=1)
    # With archive_store: how many members this worker keeps on its own disk (least recently
    # used evicted); unset: archive_size, the disk an output folder needs without a store.
    cache_size: int | None = Field(default=None, ge=2, le=MAX_ARCHIVE_SIZE)
    # With archive_store: save and upload each child while it is scored, instead of after
    # (a child not kept is then uploaded for nothing and removed); see archive_store.py.
    upload_while_scoring: bool = False

    @field_validator("cache_size", "upload_while_scoring")
    @classmethod
    def _cache_needs_store(cls, v: Any, info: ValidationInfo) -> Any:
        if v not in (None, False) and info.data.get("archive_store") is None:
            raise ValueError("is only used with archive_store")
        return v

    @field_validator("split_points")
    @classmethod
    def _splits_need_split_point(cls, v: int, info: ValidationInfo) -> int:
        if v > 1 and info.data.get("use_split_point") is False:
            raise ValueError("more than one split point needs use_split_point: true")
        return v

    @field_validator("tracking_uri")
    @classmethod
    def _uri_needs_mlflow(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("tracking") != "mlflow":
            raise ValueError("is only used with tracking: mlflow")
        return v


class EvolveConfig(BaseModel):
    """The whole ``m2n2 evolve`` config file."""

    model_config = ConfigDict(extra="forbid")

    mergekit_config: str | dict[str, Any]
    fitness: FitnessConfig
    search: SearchConfig = SearchConfig()
    output_dir: str | None = None

    # Where relative paths in this config are resolved from (the config file's folder).
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def tracking_uri(self) -> str | None:
        """``search.tracking_uri`` for MLflow: a URI as given, a plain path relative to the
        config file; None when unset (MLflow then reads ``MLFLOW_TRACKING_URI`` itself, else
        uses its own default)."""
        uri = self.search.tracking_uri
        if uri is None or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
            return uri
        return str(self.resolve(uri))


_SECTIONS: dict[str, type[BaseModel]] = {"fitness": FitnessConfig, "search": SearchConfig}


_TYPE_TAGS = {"constrained-int", "int", "str", "float", "bool", "list", "dict"}


def _first_error(exc: ValidationError) -> str:
    # A misspelt key also makes the real key "missing": report the misspelling first.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    # Union members add type tags to the location (``batch_size.constrained-int``): drop them.
    where = ".".join(str(p) for p in err["loc"] if str(p) not in _TYPE_TAGS) or "config"
    if err["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(err["loc"][0])) if len(err["loc"]) > 1 else EvolveConfig
        known = sorted(k for k in (section or EvolveConfig).model_fields if k != "base_dir")
        return f"unknown key {where!r} (accepted: {', '.join(known)})"
    return f"{where}: {err['msg']}"


def load_yaml(path: Path, what: str) -> Any:
    """Read YAML safely (no Python tags), with one-line errors."""
    if not path.is_file():
        raise M2N2Error(f"{what} {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise M2N2Error(f"{what} {str(path)!r} is not valid YAML{where}") from exc


def parse_config(data: Any, base_dir: Path, source: str = "config") -> EvolveConfig:
    """Validate a config mapping; paths inside are resolved against ``base_dir``."""
    if not isinstance(data, dict):
        raise M2N2Error(f"{source} must be a YAML mapping with mergekit_config, fitness, search")
    try:
        cfg = EvolveConfig.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        raise M2N2Error(f"{source}: {_first_error(exc)}") from exc
    return cfg


def load_config(path: str | Path) -> EvolveConfig:
    """Read and validate an ``m2n2 evolve`` config file."""
    p = Path(path)
    data = load_yaml(p, "config file")
    if isinstance(data, dict) and "base_dir" in data:
        raise M2N2Error(f"{p}: unknown key 'base_dir'")
    return parse_config(data, p.resolve().parent, source=str(p))


def with_device(cfg: EvolveConfig, device: str) -> EvolveConfig:
    """``cfg`` with ``fitness.device`` replaced (spelling checked as the config checks it)."""
    from m2n2_plugin.search.devices import check_device_name

    try:
        check_device_name(device)
    except ValueError as exc:
        raise M2N2Error(f"--device: {exc}") from exc
    fitness = cfg.fitness.model_copy(update={"device": device})
    return cfg.model_copy(update={"fitness": fitness})
