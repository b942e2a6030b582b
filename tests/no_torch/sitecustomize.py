"""Put this folder on PYTHONPATH to run a process as if torch were not installed.

The worker tests start `clickscore worker` this way: serving must import and run
without torch (it is only in the `train` extra).
"""
import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: serving must not need torch)")
        return None


sys.meta_path.insert(0, _NoTorch())
