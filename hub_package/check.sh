#!/usr/bin/env bash
# The OptunaHub registry's checks on the m2n2 package (its pre-commit: ruff, ruff-format, mypy,
# mdformat with front matter; its CI also asserts the README's front matter), plus the repo's
# own ruff config. Run from anywhere: hub_package/check.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pkg="$here/samplers/m2n2"
cd "$here"

# The registry's ruff settings (optunahub-registry pyproject.toml), ignoring ours.
registry_ruff=(
  --isolated --line-length 99
  --config 'lint.extend-select = ["I"]'
  --config 'lint.isort.known-third-party = ["optuna"]'
  --config 'lint.isort.lines-after-imports = 2'
  --config 'lint.isort.force-single-line = true'
  --config 'lint.isort.force-sort-within-sections = true'
  --config 'lint.isort.order-by-type = false'
)
echo "ruff (registry config)";  ruff check "${registry_ruff[@]}" samplers/m2n2
echo "ruff format (registry)";  ruff format --check --isolated --line-length 99 samplers/m2n2
echo "ruff (repo config)";      (cd "$here/.." && ruff check hub_package/samplers/m2n2 benchmarks/bench_sampler.py)
echo "ruff format (repo)";      (cd "$here/.." && ruff format --check hub_package/samplers/m2n2 benchmarks/bench_sampler.py)

# mypy: --strict is a superset of the registry's options (its pyproject.toml [tool.mypy]).
echo "mypy"
mypy --strict --ignore-missing-imports --explicit-package-bases --no-incremental "$pkg"

echo "mdformat"; mdformat --check "$pkg/README.md"

echo "front matter"
python3 - "$pkg/README.md" <<'PY'
import sys

import yaml

text = open(sys.argv[1], encoding="utf-8").read()
assert text.startswith("---\n"), "README.md must start with front matter"
meta = yaml.safe_load(text.split("---\n", 2)[1])
for key in ("author", "title", "description", "license"):
    assert isinstance(meta.get(key), str), f"{key} must be a string"
for key in ("tags", "optuna_versions"):
    value = meta.get(key)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), key
assert "sampler" in meta["tags"], "tags must include 'sampler'"
assert meta["license"] == "MIT License", "license must be 'MIT License'"
PY
echo "all checks passed"
