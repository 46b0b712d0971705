"""J1 of m2megatron.compat: Megatron-Core's `jit_fuser` calls torch.compile at a function's first call, not at import.

`megatron.core.jit` sets `jit_fuser = torch.compile`, and about twenty fusion functions (GeGLU, SwiGLU,
bias-GeLU, bias-dropout-add, ...) are decorated with it while `megatron.core` imports. In torch 2.13
the first decoration imports Dynamo and Inductor: 3.5 s of the 8 s that `import megatron.core` costs on
one core, paid by every rank of every job and by every eval command, although torch.compile does its
work only when a decorated function is first called, and M2's layers call none of them (our Megatron
config turns the bias fusions off: models/transformer_config.py).

`install()` (run by `import m2megatron`, before any Megatron import) adds an import hook that lets
`megatron.core.jit` execute as written and then wraps its `jit_fuser`, so that the real torch.compile
is applied at each function's first call. A function that is called is compiled exactly as before.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_MODULE = "megatron.core.jit"


def _defer(compile_fn):
    """`compile_fn` (torch.compile) as a decorator that compiles at the decorated function's first call."""

    def decorate(fn):
        compiled = None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(fn)
            return compiled(*args, **kwargs)

        return call

    decorate.deferred = compile_fn
    return decorate


class _JitModuleLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        import torch

        if module.jit_fuser is torch.compile:  # not when Megatron chose torch.jit.script or a no-op
            module.jit_fuser = _defer(torch.compile)


class _JitModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _JitModuleLoader(spec.loader)
        return spec


def install() -> None:
    """Add the hook once; a no-op when Megatron-Core was imported already (then there is nothing to save)."""
    if _MODULE in sys.modules or any(isinstance(f, _JitModuleFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitModuleFinder())
