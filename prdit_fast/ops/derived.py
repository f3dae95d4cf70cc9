"""What the ops and the fast model share around autograd: the cache of tensors derived
from parameters, and the backward that recomputes a plain-torch reference.

``DerivedWeights`` holds tensors computed from parameters (compute-dtype casts,
concatenations), each rebuilt only when a source changes: the key is every source's
identity, ``data_ptr``, version counter, device and dtype, so an optimizer step,
``load_state_dict``, ``.to()`` or any in-place update under ``torch.no_grad()`` refreshes
it. Writes through ``param.data`` bypass the version counter: ``clear()`` after those.
While autograd would need a gradient through the sources, nothing is cached: the value
is rebuilt (differentiably) on every call. Inference tensors carry no version counter,
so they are never cached either. ``derived_for(owner)`` gives the cache of one module,
held weakly: it dies with the module and never enters its state dict.

``recompute_backward`` is the backward of a fused forward whose kernels have no backward
of their own: it reruns the plain-torch reference on detached copies of the saved inputs
and returns autograd's gradients for the inputs that need one.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable, Sequence

import torch


class DerivedWeights:
    """Tensors computed from parameters, rebuilt only when a source parameter changes.
    Not a module: nothing here enters a state dict."""

    def __init__(self):
        self._store: dict[str, tuple[list[weakref.ref], list[tuple], Any]] = {}

    def get(self, name: str, sources: Iterable[torch.Tensor], build: Callable[[], Any]) -> Any:
        """``build()`` (a tensor or a tuple of tensors) from ``sources``, cached under ``name``."""
        sources = tuple(sources)
        if torch.is_grad_enabled() and any(p.requires_grad for p in sources):
            return build()  # differentiable; a cached tensor would cut the gradient
        if torch.compiler.is_compiling() or any(p.is_inference() for p in sources):
            return build()  # a traced graph holds the derivation; inference tensors have no version to key on
        key = [(p.data_ptr(), p._version, p.device, p.dtype) for p in sources]
        hit = self._store.get(name)
        if hit is not None and hit[1] == key and all(ref() is p for ref, p in zip(hit[0], sources)):
            return hit[2]
        # a normal (non-inference) tensor even when built under inference_mode, so a later
        # call with autograd on may use it
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._store[name] = ([weakref.ref(p) for p in sources], key, value)
        return value

    def cached(self, name: str) -> Any:
        """The value cached under ``name``, or None (for tests and inspection)."""
        hit = self._store.get(name)
        return None if hit is None else hit[2]

    def clear(self) -> None:
        self._store.clear()


_PER_MODULE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def derived_for(owner: torch.nn.Module) -> DerivedWeights:
    """The derived-weight cache of ``owner``, created on first use, dropped with it."""
    cache = _PER_MODULE.get(owner)
    if cache is None:
        cache = _PER_MODULE[owner] = DerivedWeights()
    return cache


def recompute_backward(
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    wants: Sequence[bool],
    grad_out: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``reference(*inputs)`` against ``grad_out``: one per input, None where
    ``wants`` is False. The reference runs with autograd on detached copies of the inputs."""
    leaves = [t.detach().requires_grad_(w) for t, w in zip(inputs, wants)]
    with torch.enable_grad():
        out = reference(*leaves)
    wanted = [t for t, w in zip(leaves, wants) if w]
    grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return [next(grads) if w else None for w in wants]
