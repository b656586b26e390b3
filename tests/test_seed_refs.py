"""Seeds written with mergekit's own syntax: ``model+lora`` and ``model@revision``.

Neither is dropped silently: a LoRA seed is refused in one line naming it (m2n2 merges whole
checkpoints; the adapter must be merged first), a revision of a local folder is refused, a
revision of a hub model is asked of the hub. Names are kept as the user wrote them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evolve_workspace import build_workspace
from evolve_workspace import write_config

from m2n2_plugin.errors import M2N2Error
from m2n2_plugin.merge.models import seeds_from_mergekit


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = build_workspace(tmp_path_factory.mktemp("refs"))
    base = AutoModelForCausalLM.from_pretrained(root / "m0")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(root / "lora")  # a real tiny adapter, as peft writes it
    assert (root / "lora" / "adapter_config.json").is_file()
    return root


def mergekit(*models: str) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": models[0].split("+")[0].split("@")[0],
        "models": [{"model": m} for m in models],
        "parameters": {"t": 0.5},
    }


def test_lora_seed_is_refused_by_name(workspace: Path) -> None:
    with pytest.raises(M2N2Error) as err:
        seeds_from_mergekit(mergekit("m0+lora", "m1"), workspace)
    message = str(err.value)
    assert message.startswith("seed 'm0+lora': a LoRA applied on top (model+lora)")
    assert "merge_and_unload" in message and "\n" not in message


def test_lora_seed_cli_one_line_nothing_written(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from m2n2_plugin.cli import main

    (workspace / "lora-seeds.yml").write_text(yaml.safe_dump(mergekit("m0", "m1+lora")))
    config = write_config(workspace, "lora", mergekit_config="lora-seeds.yml")
    assert main(["evolve", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2n2: error: seed 'm1+lora': a LoRA"), err
    assert not (workspace / "out-lora").exists()


def test_revision_of_a_local_folder_is_refused(workspace: Path) -> None:
    with pytest.raises(M2N2Error, match=r"model m1@v2: 'm1' is a local folder, which has no"):
        seeds_from_mergekit(mergekit("m0", "m1@v2"), workspace)


def test_revision_of_a_hub_model_is_asked_of_the_hub(workspace: Path) -> None:
    """Offline, the hub cannot answer: the error names the model with its revision."""
    with pytest.raises(M2N2Error, match=r"model 'someorg/somemodel@abc123' not found"):
        seeds_from_mergekit(mergekit("m0", "someorg/somemodel@abc123"), workspace)


def test_names_are_kept_as_written(workspace: Path) -> None:
    seeds, _ = seeds_from_mergekit(mergekit("m0", str(workspace / "m1")), workspace)
    assert [s.name for s in seeds] == ["m0", str(workspace / "m1")]
    # Local seeds rebuild from their folder (lineage.yml); a hub seed would keep its id@rev.
    assert [s.reference for s in seeds] == [str(workspace / "m0"), str(workspace / "m1")]


def test_lora_base_model_is_refused_not_dropped(workspace: Path) -> None:
    """A base model with an adapter on top is another model: it is refused, never merged bare."""
    config = mergekit("m0", "m1")
    config["base_model"] = "m0+lora"
    with pytest.raises(M2N2Error) as err:
        seeds_from_mergekit(config, workspace)
    message = str(err.value)
    assert message.startswith("base_model 'm0+lora' applies a LoRA (model+lora)"), message
    assert "merge_and_unload" in message and "\n" not in message


def test_tokenizer_source_revision_is_asked_of_the_hub(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tokenizer_source`` is resolved as the seeds are: ``id@revision`` is that revision of
    that repo (here from a real Hugging Face cache holding it, offline), not a repo id."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--sometok"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    config = mergekit("m0", "m1")
    config["tokenizer_source"] = f"someorg/sometok@{commit}"
    _, carried = seeds_from_mergekit(config, workspace)
    assert carried["tokenizer_source"] == str(repo / "snapshots" / commit)
    config["tokenizer_source"] = "someorg/sometok@abc123"  # a revision the cache lacks
    with pytest.raises(M2N2Error, match=r"model 'someorg/sometok@abc123' not found"):
        seeds_from_mergekit(config, workspace)
    config["tokenizer_source"] = "m1"
    _, carried = seeds_from_mergekit(config, workspace)
    assert carried["tokenizer_source"] == str((workspace / "m1").resolve())
    assert carried["base_model"] == str((workspace / "m0").resolve())
