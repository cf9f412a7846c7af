import importlib
import pkgutil

import tether


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(tether.__path__, "tether.")]
    assert "tether.sft" in names and "tether.losses.sft" in names
    for name in names:
        importlib.import_module(name)
