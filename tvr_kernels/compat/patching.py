"""``patch`` / ``unpatch``: swap the authors' modules of a built model for ours, in place.

Instances are recognised by class name and the attributes the authors' classes carry, never
by importing the authors' code (their repositories are not packages). A replacement takes the
original's constructor arguments and its submodules (the same objects: ``PatchShiftModule``'s
``net``), so parameters, optimiser state and state-dict keys are untouched; the original is
kept on the replacement (outside its state dict) for :func:`unpatch`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from .. import _validate
from ..reference.perturbed_topk import GRADIENTS
from .ts2net import RNGS, PatchShiftModule, PerturbedTopK

# Where a replacement keeps the module it replaced: in __dict__, not as a submodule, so it
# stays out of state_dict(), parameters() and .to(), and is deep-copied along with the model.
_ORIGINAL = "_tvr_compat_original"


@dataclasses.dataclass(frozen=True)
class _Rule:
    """One of the authors' classes: its name, the attributes its instances carry (the
    constructor's arguments, copied to ours), the submodules it holds (moved to ours as they
    are) and how to build ours."""
    name: str
    attrs: tuple[str, ...]
    children: tuple[str, ...]
    build: Callable[..., nn.Module]
    ours: type


_RULES = (
    _Rule("PerturbedTopK", ("k", "num_samples", "sigma"), (),
          lambda m, rng, gradient: PerturbedTopK(m.k, m.num_samples, m.sigma, rng=rng,
                                                 gradient=gradient), PerturbedTopK),
    _Rule("PatchShiftModule", ("net", "video_frame", "n_div"), ("net",),
          lambda m, rng, gradient: PatchShiftModule(m.net, m.video_frame, m.n_div),
          PatchShiftModule),
)
_AUTHORS = " or ".join(r.name for r in _RULES)


@dataclasses.dataclass
class Swap:
    """One module swapped: where (``path`` in ``named_modules`` terms) and the classes."""
    path: str
    before: str
    after: str


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` (or :func:`unpatch`) did to ``model``.

    ``swapped``: every module replaced (a module reachable by several paths is listed under
    each); ``skipped``: ``(path, reason)`` of modules with one of the authors' class names
    that were left alone. True when something was swapped."""
    action: str
    model: str
    swapped: list[Swap] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        if self.swapped:
            lines = [f"{self.action} {self.model}: {len(self.swapped)} module(s)"]
            lines += [f"  {s.path}: {s.before} -> {s.after}" for s in self.swapped]
        elif self.action == "patched":
            lines = [f"nothing to patch in {self.model}: no instance of the authors' {_AUTHORS} "
                     f"(matched by class name and attributes)"]
        else:
            lines = [f"nothing to unpatch in {self.model}: no module swapped by "
                     f"tvr_kernels.compat.patch"]
        lines += [f"  skipped {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _authors_rule(m: nn.Module) -> tuple[_Rule | None, str]:
    """``(rule, "")`` if ``m`` is an instance of one of the authors' classes we replace,
    ``(None, reason)`` if it has such a class name but is not replaceable, ``(None, "")``
    otherwise."""
    rule = next((r for r in _RULES if type(m).__name__ == r.name), None)
    if rule is None:
        return None, ""
    if isinstance(m, rule.ours):
        return None, "already tvr_kernels.compat's"
    missing = [a for a in rule.attrs if not hasattr(m, a)]
    if missing:
        return None, f"a {rule.name} without the authors' attributes {missing}"
    if set(m._modules) != set(rule.children) or m._parameters or m._buffers:
        held = sorted(m._modules) + sorted(m._parameters) + sorted(m._buffers)
        return None, (f"a {rule.name} holding {held}, not the authors' "
                      f"{list(rule.children)}: its state would not carry over")
    return rule, ""


def _edges(model: nn.Module):
    """Every ``(parent, name, child, path)`` below ``model``, each parent visited once (a
    snapshot: swapping children while iterating is safe)."""
    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is not None:
                yield parent, name, child, f"{parent_path}.{name}" if parent_path else name


def _swap(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    new.training = old.training          # the flag only: submodules are shared, already set
    setattr(parent, name, new)


def patch(model: nn.Module, *, rng: str = "philox", gradient: str = "diagonal") -> PatchReport:
    """Swap the authors' ``PerturbedTopK`` and ``PatchShiftModule`` instances anywhere in
    ``model`` for :class:`tvr_kernels.compat.PerturbedTopK` / ``PatchShiftModule`` (the fused
    kernels), in place.

    Matching is by class name plus the authors' attributes (``k``, ``num_samples``,
    ``sigma``; ``net``, ``video_frame``, ``n_div``) and state (none; ``net``): the authors'
    code is never imported. The replacements hold the same submodules, so ``state_dict()``
    keys and tensors, ``parameters()`` (and an optimiser built on them) are unchanged: a state
    dict saved before patching loads after it and vice versa. Patch before wrapping in
    ``DistributedDataParallel`` or ``torch.compile``.

    Args:
        model: any ``nn.Module``; the module itself is not swapped (only its descendants).
        rng, gradient: passed to every new :class:`~tvr_kernels.compat.PerturbedTopK`
            (``"philox"``: in-kernel noise seeded from torch's generator; ``"torch"``: the
            authors' ``torch.normal`` draws, so the same selections as their class under the
            same ``torch.manual_seed``, gradients equal up to summation order).

    Returns:
        A :class:`PatchReport` (false when nothing was swapped; ``print`` it).
    """
    _check_model(model, "patch")
    _validate.choice("rng", rng, RNGS)
    _validate.choice("gradient", gradient, GRADIENTS)
    rule, _ = _authors_rule(model)
    if rule is not None:
        raise ValueError(f"model is itself the authors' {rule.name}: patch swaps submodules in "
                         f"place; build tvr_kernels.compat.{rule.name} from its arguments instead")
    report = PatchReport("patched", type(model).__name__)
    done: dict[int, nn.Module] = {}      # a module shared by several parents gets one swap
    for parent, name, child, path in _edges(model):
        new = done.get(id(child))
        if new is None:
            rule, why = _authors_rule(child)
            if rule is None:
                if why:
                    report.skipped.append((path, why))
                continue
            new = done[id(child)] = rule.build(child, rng, gradient)
            new.__dict__[_ORIGINAL] = child
        _swap(parent, name, child, new)
        report.swapped.append(Swap(path, _qualname(type(child)), _qualname(type(new))))
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Put back the modules :func:`patch` swapped out of ``model``, in place.

    The originals get the replacements' current attributes and submodules (trained weights,
    a ``net`` replaced meanwhile). Modules of ``tvr_kernels.compat`` built directly rather
    than by :func:`patch` have no original and are reported as skipped."""
    _check_model(model, "unpatch")
    report = PatchReport("unpatched", type(model).__name__)
    ours = tuple(r.ours for r in _RULES)
    done: dict[int, nn.Module] = {}
    for parent, name, child, path in _edges(model):
        if not isinstance(child, ours):
            continue
        old = done.get(id(child))
        if old is None:
            old = child.__dict__.get(_ORIGINAL)
            if old is None:
                report.skipped.append((path, "built directly, not by patch: no original"))
                continue
            for attr in next(r for r in _RULES if isinstance(child, r.ours)).attrs:
                setattr(old, attr, getattr(child, attr))
            done[id(child)] = old
        _swap(parent, name, child, old)
        report.swapped.append(Swap(path, _qualname(type(child)), _qualname(type(old))))
    return report


def _check_model(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module, got {type(model).__name__}")
