"""What can go wrong with a supervised tritonserver, as the stack tells it apart."""

from __future__ import annotations


class LauncherError(RuntimeError):
    """The server could not be started, died, or a model failed to load."""


class ServerDied(LauncherError):
    """tritonserver itself exited."""


class StubDied(LauncherError):
    """One model's Python backend stub died; the server and the other models still run."""

    def __init__(self, message: str, model: str):
        super().__init__(message)
        self.model = model


class ModelUnloaded(StubDied):
    """A model's stubs went because a holder of the control key unloaded it: not a crash."""


class StartStopped(LauncherError):
    """A stop (Ctrl-C, SIGTERM) came while the models were being prepared or loaded: what had started is
    stopped, and the run ends as any asked-for stop does."""
