"""Build hook: put ``m2n2_plugin_autoload.pth`` at the root of site-packages.

Everything else about the distribution is in pyproject.toml. mergekit has no plugin discovery,
so ``mergekit-yaml`` only knows ``merge_method: m2n2`` if something registered it first. The
``.pth`` file does that at interpreter start-up at almost no cost: it imports the light
``m2n2_plugin`` package, which installs an import hook that registers the method when mergekit's
method registry is imported (see src/m2n2_plugin/_autoload.py).

A ``.pth`` file only works at the top of site-packages, outside any package, which package data
cannot express, so ``build_py`` writes it there:

* ``pip install .`` (a regular wheel): the wheel is made from ``build_lib``, so the file goes
  to the root of ``build_lib``;
* ``pip install -e .`` (an editable wheel, setuptools >= 64): ``build_lib`` is thrown away and
  the wheel is assembled from a temporary unpacked-wheel folder, which setuptools gives to the
  ``install`` command as ``install_lib``; the file goes there.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "m2n2_plugin_autoload.pth"
HERE = os.path.dirname(os.path.abspath(__file__))
PTH_SOURCE = os.path.join(HERE, "src", "m2n2_plugin", PTH_NAME)


class BuildPyWithPth(build_py):
    """``build_py`` that also places the start-up ``.pth`` file at the wheel's root."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        self.mkpath(target_dir)
        self.copy_file(PTH_SOURCE, os.path.join(target_dir, PTH_NAME), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
