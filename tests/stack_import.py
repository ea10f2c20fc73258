"""Importing a training stack in its tests: skipped where the stack is not installed, except under
``MOEWATCH_REQUIRE_STACKS=1`` (set by scripts/test.sh in CI, which installs the stacks), where a missing stack fails
the test module instead of letting its tests skip silently."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

INSTALL = "bash scripts/test.sh installs the tested versions (see its 'Training stacks' step)"


def import_stack(module: str, name: str) -> ModuleType:
    if os.environ.get("MOEWATCH_REQUIRE_STACKS"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{name} is not installed ({INSTALL})")
