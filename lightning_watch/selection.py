"""Which modules a monitor watches: defaults, globs over qualified names, and types.

A selection is resolved once per ``fit`` against the LightningModule, in the module's
registration order, so that "first layer" and "last layer" keep their meaning for rules that
compare early and late layers (vanishing gradients).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

#: Element-wise activations. A module of one of these types is watched by default even though
#: it owns no parameters, because its output is where dead and saturated units show.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Threshold,
)


def direct_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the leaves ``module`` itself owns, parametrized weights included.

    A parametrized tensor (``torch.nn.utils.parametrizations.weight_norm``/``orthogonal``/
    ``spectral_norm``) is not in the module's own parameters: its leaf lives in
    ``module.parametrizations.<name>.original`` (``original0``, ``original1``, ... for several).
    It is reported here as ``<name>`` (or ``<name>.original<i>``), so the layer, not the
    ``ParametrizationList`` child, owns it; that child owns nothing. Reading ``module.<name>``
    would run the parametrization (for spectral norm: a power iteration that updates buffers),
    so only the leaves are touched.

    Example:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> [name for name, _ in direct_parameters(weight_norm(nn.Linear(2, 2)))]
        ['bias', 'weight.original0', 'weight.original1']
    """
    if isinstance(module, parametrize.ParametrizationList):
        return
    yield from module.named_parameters(recurse=False)
    if parametrize.is_parametrized(module):
        for tensor_name, plist in module.parametrizations.items():
            for leaf_name, leaf in plist.named_parameters(recurse=False):
                yield (tensor_name if leaf_name == "original" else f"{tensor_name}.{leaf_name}"), leaf


def owns_parameters(module: nn.Module) -> bool:
    """True when ``module`` registers parameters itself (not only through children).

    The leaves of a parametrized weight count as the layer's own (see :func:`direct_parameters`).
    """
    return next(direct_parameters(module), None) is not None


def _as_list(value: str | Iterable[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise ValueError(f"`{arg}` must be a glob string or a list of them, got {value!r}.")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"`{arg}` must be a glob string or a list of them, got {item!r} in {value!r}.")
    return items


def _did_you_mean(name: str, module_name: str | None = None) -> str:
    """``" (did you mean 'Conv2d'?)"`` for a near miss among torch.nn's module classes, else ``""``.

    ``module_name`` is the dotted path's module (``"torch.nn"`` in ``"torch.nn.Conv2D"``); only
    torch.nn's names are known here.
    """
    if module_name not in (None, "torch.nn"):
        return ""
    classes = [n for n, v in vars(nn).items() if isinstance(v, type) and issubclass(v, nn.Module)]
    # a wrong case ("Conv2D", "relu") is the usual slip: prefer it to a merely similar name
    close = [n for n in classes if n.lower() == name.lower()] or difflib.get_close_matches(name, classes, 3, 0.75)
    prefix = "" if module_name is None else f"{module_name}."
    return f" (did you mean {' or '.join(repr(prefix + n) for n in close)}?)" if close else ""


def resolve_type(spec: type | str) -> type[nn.Module]:
    """Turn ``nn.Linear``, ``"Linear"`` or ``"torch.nn.Linear"`` into a module class.

    Strings make selections writable in LightningCLI YAML.

    Raises:
        ValueError: if the name does not resolve to a subclass of ``torch.nn.Module``.
    """
    if isinstance(spec, type):
        cls = spec
    elif isinstance(spec, str) and spec:
        if "." in spec:
            module_name, _, attr = spec.rpartition(".")
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                raise ValueError(
                    f"`types` entry {spec!r} could not be imported{_did_you_mean(attr, module_name)}; "
                    "use a class or a dotted path such as 'torch.nn.Linear'."
                ) from None
        else:
            cls = getattr(nn, spec, None)
            if cls is None:
                raise ValueError(
                    f"`types` entry {spec!r} is not a class in torch.nn{_did_you_mean(spec)}; "
                    "use a class or a dotted path such as 'mypkg.layers.MyBlock'."
                )
    else:
        raise ValueError(f"`types` entries must be module classes or their names, got {spec!r}.")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"`types` entry {spec!r} must be a subclass of torch.nn.Module, got {cls!r}.")
    return cls


@dataclass(frozen=True)
class ModuleSelection:
    """Declarative choice of modules; resolved against a model with :meth:`resolve`.

    Args:
        include: glob(s) over qualified module names (``"encoder.*"``, ``"*.fc?"``). ``None`` means
            the monitor's default set.
        exclude: glob(s) removed from whatever ``include``/``types``/the default selected.
        types: module classes (or their names) to select; combined with ``include`` by union.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> sel = ModuleSelection(include="0")
        >>> [name for name, _ in sel.resolve(model, default=owns_parameters)]
        ['0']
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    types: tuple[type[nn.Module], ...] = ()

    @classmethod
    def from_args(
        cls,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        types: Sequence[type | str] | None = None,
    ) -> ModuleSelection:
        """Validate user arguments (at construction time) and build a selection."""
        if types is not None and (isinstance(types, (str, type))):
            types = [types]
        if types is not None and not isinstance(types, Iterable):
            raise ValueError(f"`types` must be a module class, its name, or a list of them, got {types!r}.")
        return cls(
            include=tuple(_as_list(include, "include")),
            exclude=tuple(_as_list(exclude, "exclude")),
            types=tuple(resolve_type(t) for t in (types or ())),
        )

    def check_types(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming a ``types`` entry that matches no module of ``model``."""
        present = {type(module) for name, module in model.named_modules() if name}
        for cls in self.types:
            if not any(issubclass(kind, cls) for kind in present):
                names = ", ".join(sorted(kind.__name__ for kind in present))
                raise ValueError(
                    f"`types` entry {cls.__name__!r} matches no module of {type(model).__name__}. "
                    f"Types present: {names}"
                )

    def resolve(self, model: nn.Module, default) -> list[tuple[str, nn.Module]]:
        """Return ``(qualified_name, module)`` pairs in registration order.

        Args:
            model: the root module (the LightningModule).
            default: predicate ``module -> bool`` used when neither ``include`` nor ``types`` is given.

        Raises:
            ValueError: if an ``include`` or ``exclude`` pattern matches no module, naming the
                pattern and some available names.
        """
        named = [(name, module) for name, module in model.named_modules() if name]
        sample = ", ".join(repr(name) for name, _ in named[:12]) + (" …" if len(named) > 12 else "")
        # a typo in any pattern would otherwise silently watch the wrong set of modules
        for arg, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                    raise ValueError(
                        f"`{arg}` pattern {pattern!r} matches no module of {type(model).__name__}. "
                        f"Available names: {sample}"
                    )
        if self.include or self.types:
            chosen = [
                (name, module)
                for name, module in named
                if any(fnmatch.fnmatchcase(name, p) for p in self.include) or isinstance(module, self.types)
            ]
        else:
            chosen = [(name, module) for name, module in named if default(module)]
        return [
            (name, module) for name, module in chosen if not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        ]
