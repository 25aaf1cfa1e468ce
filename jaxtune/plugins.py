"""Plug-in discovery shared by the registries (objectives, PEFT methods).

A registry is filled by importing every module of its package, each of which registers what it
defines; adding an objective or a PEFT method is then one new file, with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

_started: set[str] = set()


def import_submodules(package: str) -> None:
    """Imports every module of `package` once (a module importing the registry back is fine)."""
    if package in _started:
        return
    _started.add(package)
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(f"{package}.{info.name}")
