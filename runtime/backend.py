"""What a backend is: a name, a device type, a cheap probe() and a lazy load() (design.md section 3).

A backend author subclasses :class:`Backend`, registers implementations in ``load`` through the
:class:`Registrar`, and allocates outputs with :func:`new_output` so that conformance can poison them.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

__all__ = ["API_VERSION", "Backend", "Probe", "Implementation", "Registrar", "new_output", "poisoned_outputs"]

API_VERSION = 1
"""Version of the backend API; a plug-in whose ``api_version`` differs is refused."""

Supports = Callable[[Mapping[str, Any]], "str | None"]


@dataclass(frozen=True)
class Probe:
    """Result of Backend.probe(): can it run here, why not, and what the hardware can do."""

    available: bool
    reason: str
    capabilities: Mapping[str, Any] = field(default_factory=dict)


class Backend:
    """Base class of every backend. Subclasses set ``name`` and ``device_type`` and override both methods.

    ``probe()`` must be cheap: no device initialisation, no heavy import. ``load()`` runs once, on first
    use, and registers implementations (it may import the heavy libraries).
    """

    name: str = ""
    device_type: str = ""
    api_version: int = API_VERSION
    description: str = ""
    prepared_variants: tuple[str, ...] | None = None
    """The variants :meth:`prepare_weight` prepares for (None: all of them): an explicit choice of another
    variant of this backend keeps the released weights (``dsv4rt.prepare``)."""

    def probe(self) -> Probe:
        raise NotImplementedError(f"backend {self.name!r} does not define probe()")

    def load(self, registrar: "Registrar") -> None:
        raise NotImplementedError(f"backend {self.name!r} does not define load()")

    def prepare_inputs(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Turn an op's released-format inputs (already on this backend's device) into the form its fast
        variants take, e.g. weights converted once into a fused op's layout. Conformance and bench call it
        so that they exercise those variants; the model hands its weights to :meth:`prepare_weight`.
        Default: the inputs unchanged."""
        return args

    def prepare_weight(self, op: str, w: Any, w_scale: Any, block_size: int = 128) -> Any:
        """Convert one GEMM weight once, at load, into what this backend's fast variants take.

        ``op`` is ``fp8_gemm``, ``fp4_gemm`` or ``fp4_grouped_gemm``; ``w`` / ``w_scale`` are the released
        tensors, already on this backend's device; ``block_size`` is the FP8 scale block (128 V4, 32 V4.1).
        The model (``dsv4rt.prepare.weight_preparer``) passes the result as ``w`` on every call of ``op``
        with this very ``w_scale`` object, so the result must still pass the op contract as ``w`` and give
        every other implementation the released values (e.g. a tensor subclass sharing ``w``'s storage).
        Default: ``w`` itself, no copy; a backend that keeps the default is never asked (no load cost)."""
        return w

    def offers(self) -> Mapping[str, tuple[str, ...]]:
        """Variants this backend registers per op where everything it needs is present (op -> variants).

        Optional and cheap (no imports): `dsv4rt info --matrix` shows it for backends that cannot load
        on the current machine, and a test checks that ``load()`` never registers anything it does not
        declare here. An empty mapping means "not declared".
        """
        return {}


@dataclass(frozen=True)
class Implementation:
    """One registered implementation of one op: ``backend/variant`` on a device type."""

    op: str
    backend: str
    variant: str
    device_type: str
    fn: Callable[..., Any]
    priority: int = 0
    requires: frozenset[str] = frozenset()
    supports: Supports | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.variant}"

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class Registrar:
    """Handed to Backend.load(): records the backend's implementations."""

    def __init__(self, backend: Backend, known_ops: Iterable[str]) -> None:
        self.backend = backend
        self._known = frozenset(known_ops)
        self.implementations: list[Implementation] = []
        self.capabilities: dict[str, Any] = {}

    def publish_capabilities(self, caps: Mapping[str, Any]) -> None:
        """Capabilities only load() can find (e.g. features of a library probe() must not import); they
        are merged into the backend's probe result, so ``requires=`` and `dsv4rt info` see them."""
        self.capabilities.update(caps)

    def implement(self, op: str, variant: str, fn: Callable[..., Any], *, priority: int = 0,
                  requires: Iterable[str] = (), supports: Supports | None = None,
                  device_type: str | None = None) -> None:
        """Register ``fn`` as ``<backend>/<variant>`` for ``op``.

        ``fn`` takes the op's parameters positionally, in the order of its signature. ``priority``
        orders variants (higher wins); ``requires`` names probe capabilities that must be truthy;
        ``supports(args)`` returns None or the reason this call is out of range.
        """
        if op not in self._known:
            raise ValueError(f"backend {self.backend.name!r} registers unknown op {op!r}; "
                             f"known ops: {', '.join(sorted(self._known))}")
        if any(i.op == op and i.variant == variant for i in self.implementations):
            raise ValueError(f"backend {self.backend.name!r} registers {op} variant {variant!r} twice")
        _check_callable(f"{self.backend.name}/{variant}", op, fn)
        if supports is not None and not callable(supports):
            raise ValueError(f"{self.backend.name}/{variant} ({op}): supports must be callable or None, "
                             f"got {type(supports).__name__}")
        self.implementations.append(Implementation(
            op=op, backend=self.backend.name, variant=variant,
            device_type=device_type or self.backend.device_type, fn=fn, priority=priority,
            requires=frozenset(requires), supports=supports))


def _check_callable(name: str, op: str, fn: Any) -> None:
    """``fn`` must be callable with the op's parameters, positionally."""
    import inspect

    from .registry import REGISTRY   # lazy: the registry module imports this one

    n_params = len(REGISTRY.specs[op].params)
    if not callable(fn):
        raise ValueError(f"{name} registers {op} with a {type(fn).__name__}, which is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):   # builtins without a signature: cannot be checked here
        return
    try:
        sig.bind(*range(n_params))
    except TypeError as exc:
        raise ValueError(f"{name} registers {op} with {getattr(fn, '__qualname__', fn)!r}{sig}, which cannot "
                         f"take the op's {n_params} parameters positionally: {exc}") from None


_POISON: contextvars.ContextVar[bool] = contextvars.ContextVar("dsv4rt_poison", default=False)


def new_output(shape: Iterable[int], dtype: Any, device: Any) -> Any:
    """Allocate an op output. Uninitialised normally; filled with NaN (floats) or a sentinel
    (integers) inside :func:`poisoned_outputs`, so a kernel that skips an element is caught."""
    import torch

    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _POISON.get():
        if out.dtype.is_floating_point and out.element_size() >= 2:
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.fill_(True)
        else:
            out.view(torch.uint8).fill_(0x5A)
    return out


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this block, :func:`new_output` poisons every allocation."""
    token = _POISON.set(enabled)
    try:
        yield
    finally:
        _POISON.reset(token)
