"""Module hooks that the model does not know about.

A hook sees every call of one module: ``pre_forward`` may rewrite the arguments or answer the call itself
(``Skip(output)``: the module does not run), ``post_forward`` may rewrite the output, ``reset_state`` drops what the
hook holds. Hooks are registered by name on a module's ``HookRegistry``; the names are module constants of the
strategy that owns them, so two strategies never collide and ``remove`` is exact.

How a call is intercepted: the first hook swaps the instance's class for a subclass (one per class, same name)
whose ``__call__`` runs the hooks around the original ``__call__``; removing the last hook swaps it back. The
original ``__call__`` is the whole ``nn.Module`` call (torch's own hooks, a ``torch.compile``d forward from
regional compilation, sequence-parallel split/gather hooks), so FlexCache hooks are always the outermost layer: a
hit skips the compiled forward and its collectives alike, and a miss runs them unchanged. Nothing is traced into
a compiled graph (compiled code sees the subclass once, as one extra guard entry per block class).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

REGISTRY_ATTR = "_flexcache_hooks"
"""Instance attribute holding a module's ``HookRegistry``."""
BASE_CLASS_ATTR = "_flexcache_base_class"
"""Class attribute of a hooked subclass naming the class it wraps."""


@dataclass
class Skip:
    """Returned by ``pre_forward`` to answer the call without running the module."""

    output: Any


class ModelHook:
    """Base class of FlexCache hooks (defaults: pass everything through)."""

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | Skip:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        return output

    def reset_state(self) -> None:
        """Drop anything the hook holds (called when it is removed)."""


class HookRegistry:
    """The named hooks of one module, run in registration order."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.hooks: dict[str, ModelHook] = {}

    @classmethod
    def of(cls, module: torch.nn.Module) -> HookRegistry | None:
        return module.__dict__.get(REGISTRY_ATTR)

    def call(self, base_call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        entered: list[ModelHook] = []
        output: Any = None
        skipped = False
        for hook in list(self.hooks.values()):
            entered.append(hook)
            result = hook.pre_forward(self.module, args, kwargs)
            if isinstance(result, Skip):
                output, skipped = result.output, True
                break
            args, kwargs = result
        if not skipped:
            output = base_call(self.module, *args, **kwargs)
        for hook in reversed(entered):
            output = hook.post_forward(self.module, args, kwargs, output)
        return output


@functools.cache
def hooked_class(cls: type) -> type:
    """The subclass of ``cls`` whose calls go through the instance's hooks (one per class, same name)."""
    base_call = cls.__call__

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        registry = self.__dict__.get(REGISTRY_ATTR)
        if registry is None or not registry.hooks:
            return base_call(self, *args, **kwargs)
        return registry.call(base_call, args, kwargs)

    # Never traced: called from inside a compiled region (an attention module in a regionally compiled block), the
    # hooks and the module run eagerly behind a graph break; called from eager code (a block), the module's own
    # torch.compile'd forward still runs compiled (a compiled function re-enables compilation for itself).
    __call__ = torch.compiler.disable(__call__)
    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, BASE_CLASS_ATTR: cls})


def register_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> None:
    """Add ``hook`` to ``module`` under ``name`` (a module constant of the owning strategy)."""
    registry = HookRegistry.of(module)
    if registry is None:
        registry = HookRegistry(module)
        module.__dict__[REGISTRY_ATTR] = registry
        if BASE_CLASS_ATTR not in type(module).__dict__:
            module.__class__ = hooked_class(type(module))
    if name in registry.hooks:
        raise ValueError(f"{type(module).__name__} already has a hook named {name!r}")
    registry.hooks[name] = hook


def remove_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """Remove the hook ``name`` (its state reset); the module is back to its own class once no hook is left."""
    registry = HookRegistry.of(module)
    if registry is None:
        return None
    hook = registry.hooks.pop(name, None)
    if hook is not None:
        hook.reset_state()
    if not registry.hooks:
        del module.__dict__[REGISTRY_ATTR]
        base = type(module).__dict__.get(BASE_CLASS_ATTR)
        if base is not None:
            module.__class__ = base
    return hook


def remove_hooks(modules: Iterable[torch.nn.Module], names: Iterable[str]) -> None:
    """Remove every hook of ``names`` from every module of ``modules`` (absent ones are ignored)."""
    names = tuple(names)
    for module in modules:
        for name in names:
            remove_hook(module, name)


def hook_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the hooks on ``module`` (empty when it carries none)."""
    registry = HookRegistry.of(module)
    return tuple(registry.hooks) if registry is not None else ()
