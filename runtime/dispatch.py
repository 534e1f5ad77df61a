"""Op: the callable users and the model call. Checks the contract, selects once per cache key, runs.

The cache key holds everything selection depends on (device, dtypes, shapes, contiguity, static
attributes, explicit choices, environment generation), so a repeated call costs a tuple build, one
dict lookup and, on CPU, the value checks. Model code can skip even that with :meth:`Op.resolve`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from . import env
from .backend import Implementation
from .errors import MixedDeviceError
from .registry import Registry, generation
from .select import Choice, choose, context_frames, explicit_choice
from .spec import REQUIRED, OpSpec

__all__ = ["Op"]

log = logging.getLogger("dsv4rt")
_CACHE_LIMIT = 4096
_TENSOR = None  # torch.Tensor, bound on first Op creation (importing dsv4rt must not import torch)


class _Entry:
    __slots__ = ("fn", "values", "choice")

    def __init__(self, fn: Callable[..., Any], values: bool, choice: Choice) -> None:
        self.fn, self.values, self.choice = fn, values, choice


def _to_device(obj: Any, device: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    return obj


def _fallback(fn: Callable[..., Any], device: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        import torch

        home = next(a.device for a in args if isinstance(a, torch.Tensor))
        return _to_device(fn(*_to_device(args, device)), home)
    return run


class Op:
    """A declared op. Call it like the function in its contract; ``backend=`` forces an implementation."""

    def __init__(self, spec: OpSpec, registry: Registry) -> None:
        global _TENSOR
        import torch

        _TENSOR = torch.Tensor
        self.spec = spec
        self.name = spec.name
        self.__doc__ = spec.doc
        self.__signature__ = spec.signature
        self._registry = registry
        self._names = spec.param_names
        self._n = len(self._names)
        self._tensor_pos = tuple(i for i, p in enumerate(spec.params) if p.kind != "static")
        self._static_pos = tuple(i for i, p in enumerate(spec.params) if p.kind == "static")
        self._cache: dict[tuple, _Entry] = {}

    def __repr__(self) -> str:
        return f"<dsv4rt op {self.name}{self.spec.signature}>"

    # ---- argument handling -------------------------------------------------------------------------
    def _bind(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        if len(args) > self._n:
            raise TypeError(f"{self.name}() takes {self._n} arguments ({', '.join(self._names)}), got {len(args)}")
        values = list(args) + [REQUIRED] * (self._n - len(args))
        for key, value in kwargs.items():
            try:
                i = self._names.index(key)
            except ValueError:
                raise TypeError(f"{self.name}() got an unexpected argument {key!r}; "
                                f"arguments: {', '.join(self._names)}") from None
            if values[i] is not REQUIRED:
                raise TypeError(f"{self.name}() got argument {key!r} twice")
            values[i] = value
        for i, p in enumerate(self.spec.params):
            if values[i] is REQUIRED:
                if p.default is REQUIRED:
                    raise TypeError(f"{self.name}() is missing argument {p.name!r}")
                values[i] = p.default
        return tuple(values)

    def _key(self, args: tuple, backend: str | None) -> tuple:
        key: list[Any] = [backend, context_frames(), generation()]
        for i in self._tensor_pos:
            t = args[i]
            if t is None:
                key.append(None)
            elif type(t) is _TENSOR:
                key.append((t.shape, t.dtype, t.device, t.is_contiguous()))
            else:  # a tensor subclass (e.g. a prepared weight) selects by its type and its own key
                key.append((t.shape, t.dtype, t.device, t.is_contiguous(), type(t), getattr(t, "dsv4rt_key", None)))
        for i in self._static_pos:   # typed: True == 1 == 1.0 == np.int64(1) must not share a checked entry
            key.append((type(args[i]), args[i]))
        return tuple(key)

    def _device_type(self, a: Mapping[str, Any]) -> str:
        devices = {self._names[i]: a[self._names[i]].device for i in self._tensor_pos
                   if a[self._names[i]] is not None}
        if len(set(devices.values())) > 1:
            raise MixedDeviceError(self.name, {k: str(v) for k, v in devices.items()})
        return next(iter(devices.values())).type

    # ---- selection ---------------------------------------------------------------------------------
    def _select(self, args: tuple, backend: str | None) -> _Entry:
        a = dict(zip(self._names, args))
        self.spec.check(a)
        device_type = self._device_type(a)
        choice = choose(self._registry, self.name, device_type, a,
                        explicit_choice(self.name, backend, context_frames()))
        fn = choice.impl.fn
        if choice.fallback_device is not None:
            fn = _fallback(fn, choice.fallback_device)
        mode = env.get("DSV4RT_CHECK_VALUES")
        values = self.spec.check_values is not None and (
            mode == "always" or (mode not in ("never", "always") and device_type == "cpu"))
        log.info("dsv4rt: %s on %s -> %s%s", self.name, device_type, choice.impl.name,
                 f" (fallback to {choice.fallback_device})" if choice.fallback_device else "")
        return _Entry(fn, values, choice)

    def _entry(self, args: tuple, backend: str | None) -> _Entry:
        try:
            key = self._key(args, backend)
            entry = self._cache.get(key)
        except (AttributeError, TypeError):  # a non-tensor where a tensor belongs, or an unhashable attribute
            self.spec.check(dict(zip(self._names, args)))
            raise
        if entry is None:
            entry = self._select(args, backend)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            # selection may load a backend, which bumps the generation: store under the key as it is now
            self._cache[self._key(args, backend)] = entry
        return entry

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if kwargs or len(args) != self._n:
            args = self._bind(args, kwargs)
        entry = self._entry(args, backend)
        if entry.values:
            self.spec.check_values(dict(zip(self._names, args)))  # type: ignore[misc]
        try:
            return entry.fn(*args)
        except Exception as exc:   # free unless raised: say which implementation it came from
            if hasattr(exc, "add_note"):
                exc.add_note(f"raised by {entry.choice.impl.name}, the implementation dsv4rt chose for {self.name}")
            raise

    # ---- introspection -----------------------------------------------------------------------------
    def resolve(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Implementation:
        """The implementation this call would use. Calling it skips dispatch and checks entirely: bind
        once per shape class (e.g. per decode step shape) and reuse."""
        args = self._bind(args, kwargs)
        entry = self._entry(args, backend)
        return entry.choice.impl

    def explain(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Choice:
        """The full selection for this call: the chosen implementation and every rejected candidate."""
        args = self._bind(args, kwargs)
        return self._entry(args, backend).choice

    def clear_cache(self) -> None:
        self._cache.clear()
