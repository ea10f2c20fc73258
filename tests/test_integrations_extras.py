"""Each optional integration, imported without its library, fails with an ImportError that names the extra to install
(`pip install 'moewatch[<extra>]'`), whether or not the library is installed here."""

from __future__ import annotations

import importlib
import sys

import pytest

# (the library the integration imports, moewatch.integrations.<module>, the extra that installs it)
EXTRAS = [("transformers", "hf", "hf"), ("lightning.pytorch", "lightning", "lightning"), ("mlflow", "mlflow", "mlflow"),
          ("tensorboard", "tensorboard", "tensorboard"), ("trackio", "trackio", "trackio"), ("wandb", "wandb", "wandb")]


@pytest.mark.parametrize(("library", "module", "extra"), EXTRAS)
def test_a_missing_library_names_its_extra(monkeypatch, library: str, module: str, extra: str):
    monkeypatch.setitem(sys.modules, library, None)  # makes `import <library>` raise ImportError
    monkeypatch.delitem(sys.modules, f"moewatch.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'moewatch\[{extra}\]'"):
        importlib.import_module(f"moewatch.integrations.{module}")
