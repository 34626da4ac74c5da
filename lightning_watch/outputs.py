"""What a module's output *is*, whatever shape it comes in.

Modules return tensors, tuples (``nn.LSTM`` gives ``(out, (h, c))``, ``nn.MultiheadAttention``
gives ``(out, weights)``), ``PackedSequence``, dicts, ``None`` or integer tensors. These helpers
find the one tensor worth measuring and say along which dimension its units (features or
channels) and its samples lie.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_watch.selection import owns_parameters  # a layer with weights fixes its own output layout

#: Modules whose outputs put channels in dimension 1 (``N, C, *spatial``).
CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

_SEQUENCE_FIRST_DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def primary_tensor(output: object) -> Tensor | None:
    """The tensor that stands for a module's output, or ``None`` when there is none.

    Tuples and lists give their first element (the sequence output of RNNs, the attention
    output of ``MultiheadAttention``), a ``PackedSequence`` gives its packed ``data``, a mapping
    its first tensor value. Non-floating tensors are returned too; callers decide.

    Example:
        >>> import torch
        >>> out = (torch.ones(2, 3), (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)))
        >>> primary_tensor(out).shape
        torch.Size([2, 3])
    """
    for _ in range(8):  # nested tuples are shallow in practice; the bound guards odd recursion
        if isinstance(output, Tensor):
            return output
        if isinstance(output, PackedSequence):
            return output.data
        if isinstance(output, (tuple, list)):
            if not output:
                return None
            output = output[0]
        elif isinstance(output, Mapping):
            output = next((v for v in output.values() if isinstance(v, (Tensor, PackedSequence))), None)
        else:
            return None
    return None


def batch_first(module: nn.Module) -> bool:
    """Whether ``module`` takes and returns ``(batch, ...)`` tensors.

    RNNs, ``MultiheadAttention`` and the Transformer modules default to ``(seq, batch, ...)``
    unless built with ``batch_first=True``; every other module is batch-first.
    """
    if isinstance(module, _SEQUENCE_FIRST_DEFAULT_TYPES):
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            layer = module.layers[0] if len(module.layers) else None
            return bool(getattr(getattr(layer, "self_attn", None), "batch_first", False))
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return bool(module.self_attn.batch_first)
        if isinstance(module, nn.Transformer):
            return bool(module.encoder.layers[0].self_attn.batch_first)
        return bool(getattr(module, "batch_first", False))
    return True


def batch_dim(module: nn.Module, output: object) -> int | None:
    """Dimension of ``primary_tensor(output)`` that indexes samples, ``None`` if it has none.

    ``PackedSequence`` data has no batch dimension (time steps of all samples are packed in
    dimension 0), nor has an unbatched (0-d or 1-d) output.
    """
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], PackedSequence):
        return None
    if isinstance(output, PackedSequence):
        return None
    tensor = primary_tensor(output)
    if tensor is None or tensor.dim() < 2:
        return None
    return 0 if batch_first(module) else 1


def batch_size(module: nn.Module, output: object) -> int | None:
    """Number of samples in ``output`` (``PackedSequence`` included), ``None`` if unknown."""
    packed = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(packed, PackedSequence):
        return int(packed.batch_sizes[0])
    dim = batch_dim(module, output)
    tensor = primary_tensor(output)
    return None if dim is None or tensor is None else int(tensor.shape[dim])


def unit_dim(module: nn.Module, tensor: Tensor, producer: nn.Module | None = None) -> int:
    """Dimension of ``tensor`` that indexes units: channels for conv-like outputs, else features.

    An element-wise activation keeps the layout of whatever produced its input, so for one the
    caller passes ``producer``, the last parametrized module that ran before it.
    """
    if tensor.dim() < 2:
        return -1
    layout_of = module
    if producer is not None and not isinstance(module, CHANNEL_FIRST_TYPES) and not owns_parameters(module):
        layout_of = producer
    if isinstance(layout_of, CHANNEL_FIRST_TYPES) and tensor.dim() >= 3:
        return 1
    return tensor.dim() - 1


def is_measurable(tensor: Tensor) -> bool:
    """Non-empty floating-point and complex tensors can be measured (complex ones as ``|z|``).

    Integer and bool outputs (token ids, masks) have no activation scale: they are skipped.
    """
    return (tensor.is_floating_point() or torch.is_complex(tensor)) and tensor.numel() > 0
