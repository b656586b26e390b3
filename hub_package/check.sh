#!/usr/bin/env bash
# The Optuna Hub registry's own checks on the m2n2 package, at the registry's pinned versions, so
# that "passes here" means "passes there"; then the repo's own (ruff config, mypy --strict).
# Run from anywhere: hub_package/check.sh
#
# Mirrored from optuna/optunahub-registry at commit REGISTRY_COMMIT below:
#   .pre-commit-config.yaml  ruff-pre-commit v0.15.21 (hooks ruff, ruff-format), mirrors-mypy
#                            v2.3.0 (+ types-PyYAML), mdformat 1.0.0 (+ mdformat-myst);
#   pyproject.toml           copied verbatim into REGISTRY_PYPROJECT (ruff reads its [tool.ruff] and
#                            takes its target version from requires-python; mypy its [tool.mypy]);
#   .github/workflows/checks.yaml  pre-commit runs on Python 3.10: mypy gets --python-version 3.10;
#   optunahub-registry/header_confirm.py (its header-confirm workflow), in HEADER_CONFIRM;
#   the hooks' entries: `ruff check --force-exclude`, `ruff format --force-exclude`,
#   `mypy --ignore-missing-imports --scripts-are-modules`, `mdformat`.
# pre-commit would fetch the hook repositories from GitHub; only PyPI is reachable where this
# runs, so the same tools at the same versions are installed from PyPI into a cached venv that
# holds only what each hook's environment holds (no numpy or optuna: mypy sees them as missing,
# as in the registry's hook). The package is copied to package/samplers/m2n2 under a scratch
# registry root with that pyproject.toml, and each tool runs there on the files pre-commit
# would pass. Deviations, all with the same pass/fail: ruff check runs without the hook's
# `--fix --exit-non-zero-on-fix` and ruff format / mdformat with `--check`, so nothing is
# rewritten. Unpinned there (types-PyYAML, mdformat-myst) is unpinned here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pkg="$here/samplers/m2n2"

REGISTRY_COMMIT=ee680199100edbd95e0000eb20696c3ec5505973  # optunahub-registry, 2026-08-21
HOOK_TOOLS=(ruff==0.15.21 mypy==2.3.0 types-PyYAML mdformat==1.0.0 mdformat-myst
  python-frontmatter)

# ---------------------------------------------------------------- the hook tools, cached
python="${PYTHON:-python3}"
key="$(printf '%s\n' "$REGISTRY_COMMIT" "${HOOK_TOOLS[@]}" "$("$python" -V 2>&1)" \
  | sha256sum | cut -c1-16)"
venv="${M2N2_HUB_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/m2n2-hub-check}/$key"
if [[ ! -x "$venv/bin/mdformat" ]]; then
  echo "installing the registry's hook tools into $venv: ${HOOK_TOOLS[*]}"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "${HOOK_TOOLS[@]}" \
    >"$venv.log" 2>&1; then
    cat "$venv.log" >&2
    rm -rf "$venv"
    exit 1
  fi
  "$venv/bin/python" -m pip freeze >"$venv/versions.txt"
fi

# ---------------------------------------------------------------- a scratch registry root
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/package/samplers"
cp -r "$pkg" "$root/package/samplers/m2n2"
find "$root" \( -name __pycache__ -o -name '.*_cache' \) -prune -exec rm -rf {} +
cat >"$root/pyproject.toml" <<'REGISTRY_PYPROJECT'
[build-system]
requires = ["setuptools >= 61.1.0", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "optunahub-registry"
description = "Registry for OptunaHub"
readme = "README.md"
license = {file = "LICENSE"}
authors = [
  {name = "Optuna team"}
]
requires-python = ">=3.8"
dependencies = [
  "mdutils",
  "python-frontmatter",
]
dynamic = ["version"]

[project.optional-dependencies]
checking = [
  "pre-commit",
]

[project.urls]
homepage = "https://hub.optuna.org/"
repository = "https://github.com/optuna/optunahub-registry"
documentation = "https://optuna.github.io/optunahub/"
bugtracker = "https://github.com/optuna/optunahub-registry/issues"

[tool.setuptools.packages.find]
include = ["package*"]

[tool.setuptools.dynamic]
version = {attr = "version.__version__"}

[tool.ruff]
line-length = 99

[tool.ruff.lint]
extend-select = [
    "I",
]

[tool.ruff.lint.isort]
known-third-party = ['optuna']
lines-after-imports = 2
force-single-line = true
force-sort-within-sections = true
order-by-type = false

[tool.mypy]
# Options configure mypy's strict mode.
warn_unused_configs = true
disallow_untyped_calls = true
disallow_untyped_defs = true
disallow_incomplete_defs = true
check_untyped_defs = true
no_implicit_optional = true
warn_redundant_casts = true
strict_equality = true
extra_checks = true
no_implicit_reexport = true
ignore_missing_imports = true
explicit_package_bases = true
exclude = [
    ".venv",
    "venv",
    "build",
    "work",
    ".*/.ipynb_checkpoints/.*",
]
REGISTRY_PYPROJECT
cd "$root"
mapfile -t py_files < <(find package -name '*.py' -o -name '*.pyi' | sort)
mapfile -t md_files < <(find package -name '*.md' | sort)
bin="$venv/bin"

echo "registry hook: ruff (check)";  "$bin/ruff" check --force-exclude "${py_files[@]}"
echo "registry hook: ruff-format";   "$bin/ruff" format --force-exclude --check "${py_files[@]}"
echo "registry hook: mypy"
"$bin/mypy" --python-version 3.10 --ignore-missing-imports --scripts-are-modules "${py_files[@]}"
echo "registry hook: mdformat";      "$bin/mdformat" --check "${md_files[@]}"

echo "registry workflow: header-confirm"
"$bin/python" - package/samplers/m2n2/README.md <<'HEADER_CONFIRM'
import os
import sys

import frontmatter


def header_confirm(path: str) -> None:  # optunahub-registry/header_confirm.py, verbatim
    post = frontmatter.load(path)

    assert "author" in post.keys(), f"author is not found in {path}"
    assert "title" in post.keys(), f"title is not found in {path}"
    assert "description" in post.keys(), f"description is not found in {path}"
    assert "tags" in post.keys(), f"tags is not found in {path}"
    assert "optuna_versions" in post.keys(), f"optuna_versions is not found in {path}"
    assert "license" in post.keys(), f"license is not found in {path}"
    assert post["author"] != "" and post["author"] is not None, f"author is empty in {path}"
    assert post["title"] != "" and post["title"] is not None, f"title is empty in {path}"
    assert (
        post["description"] != "" and post["description"] is not None
    ), f"description is empty in {path}"
    assert post["tags"] != "" and post["tags"] is not None, f"tags is empty in {path}"
    assert (
        post["optuna_versions"] != "" and post["optuna_versions"] is not None
    ), f"optuna_versions is empty in {path}"
    assert post["license"] != "" and post["license"] is not None, f"license is empty in {path}"


header_confirm(sys.argv[1])

# What the registry's template and review ask beyond that script.
post = frontmatter.load(sys.argv[1])
for key in ("author", "title", "description", "license"):
    assert isinstance(post[key], str), f"{key} must be a string"
for key in ("tags", "optuna_versions"):
    assert isinstance(post[key], list) and all(isinstance(v, str) for v in post[key]), key
assert "sampler" in post["tags"], "a package under samplers/ must have the tag 'sampler'"
assert post["license"] == "MIT License", "the registry accepts only 'MIT License'"
description = post["description"].strip()
assert description.count(". ") == 0 and description.endswith("."), (
    f"description must be one sentence: {description!r}"
)
import re  # noqa: E402

html = re.search(r"<[A-Za-z!/][^>]*>", re.sub(r"`[^`]*`", "", post.content))
assert html is None, f"no HTML in README.md (the registry strips it): {html}"
images = re.findall(r"\]\((images/[^)\s]+)\)", post.content)
assert images, "README.md shows no picture from images/ (the package page's thumbnail)"
for image in images:
    assert os.path.isfile(os.path.join(os.path.dirname(sys.argv[1]), image)), image
HEADER_CONFIRM

# ---------------------------------------------------------------- the repo's own checks
cd "$here/.."
echo "ruff (repo config)";  ruff check hub_package/samplers/m2n2 benchmarks/bench_sampler.py
echo "ruff format (repo)";  ruff format --check hub_package/samplers/m2n2 benchmarks/bench_sampler.py
echo "mypy --strict (with numpy and optuna installed)"
mypy --strict --ignore-missing-imports --explicit-package-bases --no-incremental "$pkg"
echo "all checks passed"
