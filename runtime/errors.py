"""Exceptions raised by dsv4rt. Every one derives from :class:`Dsv4rtError`."""
from __future__ import annotations

__all__ = [
    "Dsv4rtError",
    "ContractError",
    "MixedDeviceError",
    "NoImplementationError",
    "BackendSelectionError",
    "CheckpointError",
    "PluginLoadError",
]


class Dsv4rtError(Exception):
    """Base class of every error dsv4rt raises on purpose."""


class ContractError(Dsv4rtError, ValueError):
    """An op was called with arguments that break its contract.

    The message always names the op, the argument, what was expected and what came.
    """

    def __init__(self, op: str, arg: str, expected: str, got: str) -> None:
        self.op, self.arg, self.expected, self.got = op, arg, expected, got
        super().__init__(f"{op}: argument '{arg}': expected {expected}, got {got}")


class MixedDeviceError(ContractError):
    """Tensor arguments of one call live on different devices."""

    def __init__(self, op: str, devices: dict[str, str]) -> None:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        self.devices = dict(devices)
        first = next(iter(devices))
        Dsv4rtError.__init__(
            self,
            f"{op}: tensor arguments are on different devices ({listing}); move them to one device "
            f"(dsv4rt never copies between devices unless DSV4RT_FALLBACK=cpu)",
        )
        self.op, self.arg, self.expected, self.got = op, first, "one device for all tensors", listing


class NoImplementationError(Dsv4rtError, NotImplementedError):
    """No registered implementation can run this call (each candidate's reason is in the message)."""


class BackendSelectionError(Dsv4rtError):
    """An explicit backend choice (argument, context, environment) is malformed or cannot run."""


class CheckpointError(Dsv4rtError):
    """A checkpoint is malformed: the message names the tensor or file."""


class PluginLoadError(Dsv4rtError):
    """A backend plug-in failed to load (fatal only with DSV4RT_PLUGINS_STRICT=1)."""
