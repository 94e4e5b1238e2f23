"""Probes: context managers over forward hooks that capture, replace or zero a named site.

Hooks are always removed when the ``with`` block ends, also on error (baukit's ``nethook``
discipline). A site function receives the site's tensor and returns a replacement or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from quantdiag.model.arch import Adapter

SiteFn = Callable[[torch.Tensor], torch.Tensor | None]


@contextmanager
def hook_sites(adapter: Adapter, fns: Mapping[str, SiteFn]) -> Iterator[None]:
    """Run ``fns[site](tensor)`` at each site during forwards inside the block."""
    handles = []
    try:
        for name, fn in fns.items():
            where = adapter.site(name)

            def output_hook(_module, _args, output, fn=fn, where=where):
                new = fn(where.read(output))
                return None if new is None else where.write(output, new)

            def input_hook(_module, args, fn=fn, where=where):
                new = fn(where.read(args))
                return None if new is None else where.write(args, new)

            if where.is_input:
                handles.append(where.module.register_forward_pre_hook(input_hook))
            else:
                handles.append(where.module.register_forward_hook(output_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    adapter: Adapter,
    sites: list[str],
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``select(tensor)`` at each site (detached); the dict fills as forwards run."""
    store: dict[str, torch.Tensor] = {}

    def recorder(name: str) -> SiteFn:
        def record(tensor: torch.Tensor) -> None:
            store[name] = select(tensor).detach()

        return record

    with hook_sites(adapter, {name: recorder(name) for name in sites}):
        yield store


@contextmanager
def replace(adapter: Adapter, values: Mapping[str, torch.Tensor | SiteFn]) -> Iterator[None]:
    """Substitute each site's tensor: a tensor of the same shape, or a function of the old one."""

    def replacer(value) -> SiteFn:
        if callable(value):
            return value
        return lambda old: value.to(dtype=old.dtype, device=old.device).expand_as(old)

    with hook_sites(adapter, {name: replacer(value) for name, value in values.items()}):
        yield


@contextmanager
def zero(adapter: Adapter, sites: list[str]) -> Iterator[None]:
    """Zero each site's tensor."""
    with hook_sites(adapter, {name: torch.zeros_like for name in sites}):
        yield


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Eager attention inside the block (it alone returns attention probabilities), the model's
    own implementation (fast kernels) again afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
