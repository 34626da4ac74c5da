"""Which per-batch hooks of a callback Lightning calls: only those with work on this batch.

Lightning calls every per-batch hook of every callback on every batch, defined or not, and each call
costs a profiler region, a name built from ``state_key`` and the call itself: 3.6 µs on the CI's CPU
against 0.3 µs for a hook it skips (``benchmarks/dispatch_cost.py``), six hooks a batch. Its
dispatcher skips an attribute that is not callable, so during a fit a callback shadows, on the
instance, each hook it has no work in with ``None``; removing the shadow brings the class's method
back. The dispatcher's behaviour is checked once by calling it on a stub: where it would call the
``None`` (another Lightning), nothing is ever shadowed and every hook runs as before.
"""

from __future__ import annotations

import functools
import types

from lightning.pytorch.callbacks import Callback

#: the hooks Lightning calls on every training batch (its training loop and optimizer closure)
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


@functools.cache
def dispatcher_skips_none() -> bool:
    """Whether Lightning's callback dispatcher skips a hook attribute that is ``None``."""
    try:
        from lightning.pytorch.profilers import PassThroughProfiler
        from lightning.pytorch.trainer import call

        probe = Callback()
        probe.on_before_zero_grad = None  # type: ignore[assignment, method-assign]
        stub = types.SimpleNamespace(lightning_module=None, callbacks=[probe], profiler=PassThroughProfiler())
        call._call_callback_hooks(stub, "on_before_zero_grad", None)
    except Exception:  # a dispatcher that calls it, or that we cannot find: never shadow
        return False
    return True


class HookSubscription:
    """The per-batch hooks of one callback that Lightning calls during its fit.

    Hooks the callback's class does not define are never called; :meth:`only` narrows the rest to
    the ones a quiet batch needs, :meth:`all` restores them, :meth:`stop` removes every shadow.

    Example:
        >>> class Mine(Callback):
        ...     def on_train_batch_start(self, *args): ...
        ...     def on_train_batch_end(self, *args): ...
        >>> mine = Mine()
        >>> hooks = HookSubscription(mine)
        >>> hooks.all()  # the fit starts
        >>> mine.on_after_backward is None, callable(mine.on_train_batch_start)
        (True, True)
        >>> hooks.only("on_train_batch_end")  # a run of quiet batches
        >>> mine.on_train_batch_start is None
        True
        >>> hooks.stop()  # the fit ends
        >>> callable(mine.on_after_backward) and callable(mine.on_train_batch_start)
        True
    """

    def __init__(self, callback: Callback) -> None:
        self._callback = callback
        cls = type(callback)
        self.defined = frozenset(h for h in PER_BATCH_HOOKS if getattr(cls, h) is not getattr(Callback, h))
        # a hook defined by a subclass outside this package (a user's) is always called
        self._always = frozenset(h for h in self.defined if not getattr(cls, h).__module__.startswith(__package__))
        self._patched: dict[str, object] = {}  # hooks set on the instance by someone else (a wrapper, a test)
        self.narrowed = False  # whether only a quiet batch's hooks are called

    def all(self) -> None:
        """Every hook the class defines is called."""
        self._call(self.defined)
        self.narrowed = False

    def only(self, *hooks: str) -> None:
        """Only ``hooks`` (of those the class defines) are called."""
        self._call(self.defined.intersection(hooks))
        self.narrowed = True

    def stop(self) -> None:
        """Lightning calls every hook again, as outside a fit."""
        attributes = self._callback.__dict__
        for hook in PER_BATCH_HOOKS:
            if hook in self._patched:
                attributes[hook] = self._patched[hook]
            elif attributes.get(hook, 0) is None:
                del attributes[hook]
        self._patched.clear()
        self.narrowed = False

    def _call(self, wanted: frozenset[str]) -> None:
        if not dispatcher_skips_none():
            return
        attributes = self._callback.__dict__
        for hook in PER_BATCH_HOOKS:
            current = attributes.get(hook)
            if current is not None:  # not our shadow: someone wrapped the hook on the instance, keep calling it
                self._patched[hook] = current
            if hook in wanted or hook in self._always or hook in self._patched:
                if hook in self._patched:
                    attributes[hook] = self._patched[hook]
                else:
                    attributes.pop(hook, None)
            else:
                attributes[hook] = None
