"""Adding extra terms to the loss Lightning backpropagates, inside its one backward call.

A callback cannot replace the loss (``on_before_backward`` returns nothing), and a second
``backward()`` per step costs a second pass and breaks DDP's once-per-iteration gradient
reduction. Every backward Lightning runs, automatic (the optimizer closure) or manual
(``self.manual_backward(loss)``), goes through ``trainer.strategy.backward(closure_loss,
optimizer, ...)``. :class:`BackwardPatch` shadows that method on the strategy *instance* for
the duration of a fit and passes ``closure_loss + extra`` on, so everything downstream sees the
total exactly as if the user had returned it:

- DDP's ``prepare_for_backward`` (manual optimization) traverses the total's graph;
- the precision plugin's ``pre_backward`` scales the total (``16-mixed``'s GradScaler) and
  ``on_before_backward`` hooks receive it;
- one ``backward()`` runs, so DDP reduces each gradient once.

The contributor returns its terms as they would appear in the user's ``training_step`` loss;
the patch divides them by ``accumulate_grad_batches`` under automatic optimization, because
Lightning has already divided ``closure_loss`` by it. Manual optimization does no such division
(Lightning refuses ``accumulate_grad_batches`` there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

#: ``contributor() -> Tensor | None``: the terms to add to the next backward, unscaled.
Contributor = Callable[[], Tensor | None]

_ATTR = "_lightning_watch_backward_patch"


class BackwardPatch:
    """One per strategy: shadows ``strategy.backward`` while at least one contributor is attached.

    Example:
        >>> import torch
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(logger=False, accelerator="cpu")
        >>> patch = BackwardPatch.attach(trainer, lambda: torch.tensor(0.0))
        >>> "backward" in vars(trainer.strategy)
        True
        >>> BackwardPatch.detach(trainer.strategy, patch.contributors[0])
        >>> "backward" in vars(trainer.strategy)
        False
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.strategy = trainer.strategy
        self.contributors: list[Contributor] = []
        self.in_backward = False
        # A user (or another library) may already have shadowed the method on this instance.
        self._had_instance_attr = "backward" in vars(self.strategy)
        self._previous = vars(self.strategy).get("backward")
        self._original = self.strategy.backward  # bound method (or whatever was there)

    @classmethod
    def attach(cls, trainer: pl.Trainer, contributor: Contributor) -> BackwardPatch:
        """Add ``contributor`` to the strategy's patch, installing the patch if needed."""
        strategy = trainer.strategy
        patch = getattr(vars(strategy).get("backward"), _ATTR, None)
        if patch is None:
            patch = cls(trainer)
            patch._install()
        patch.trainer = trainer
        patch.contributors.append(contributor)
        return patch

    @staticmethod
    def detach(strategy: Any, contributor: Contributor) -> None:
        """Remove ``contributor``; the last one to leave restores the strategy's own method."""
        patch = getattr(vars(strategy).get("backward"), _ATTR, None)
        if patch is None:
            return
        patch.contributors = [c for c in patch.contributors if c != contributor]  # bound methods compare by ==
        if not patch.contributors:
            patch._uninstall()

    def _install(self) -> None:
        def backward(closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
            return self._backward(closure_loss, optimizer, *args, **kwargs)

        setattr(backward, _ATTR, self)
        self.strategy.backward = backward

    def _uninstall(self) -> None:
        if self._had_instance_attr:
            self.strategy.backward = self._previous
        else:
            del self.strategy.backward

    def _backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        extra: Tensor | None = None
        for contributor in self.contributors:
            term = contributor()
            if term is not None:
                extra = term if extra is None else extra + term
        if extra is not None:
            module = self.strategy.lightning_module
            if module is not None and module.automatic_optimization:
                # Lightning backpropagates `loss / accumulate_grad_batches`: scale the penalty alike
                accumulate = self.trainer.accumulate_grad_batches
                if accumulate != 1:
                    extra = extra / accumulate
            closure_loss = closure_loss + extra  # promotes like a hand-written `loss + penalty`
        self.in_backward = True
        try:
            return self._original(closure_loss, optimizer, *args, **kwargs)
        finally:
            self.in_backward = False
