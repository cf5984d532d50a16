"""IA3 directories -> learned scaling vectors: of a module's input on peft's feedforward_modules (the
base layer computes W (x * l)), of its output elsewhere (the whole output, bias included: y * l).

Which modules scale their input is decided by peft's own rule on the saved feedforward_modules, and
the saved vector's shape must agree: (1, in) for the input side, (out, 1) for the output side.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from peft.tuners.ia3.model import IA3Model

from peftserve.errors import AdapterRejected

from ..forms import Delta, InputScaleDelta, OutputScaleDelta
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, module_tensors, require

PARAM = "ia3_l"


def scales_input(config: Config, path: str) -> bool:
    """peft's answer to 'is this module a feedforward module' (regex fullmatch, or path suffixes)."""
    feedforward = config.get("feedforward_modules")
    if not feedforward:
        return False
    if not isinstance(feedforward, (str, list)) or not all(isinstance(m, str) for m in feedforward):
        raise AdapterRejected(f"feedforward_modules={feedforward!r}: expected a regex or a list of names")
    return bool(
        IA3Model._check_target_module_feedforward(SimpleNamespace(feedforward_modules=feedforward), path)
    )


def load_ia3(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize an IA3 directory: an input or output scaling per module, stored as the shift l - 1."""
    modules = module_tensors(tensors, (PARAM,))
    if not modules:
        raise AdapterRejected(f"adapter_model.safetensors holds no {PARAM} tensors")
    deltas: dict[str, Delta] = {}
    for path, params in sorted(modules.items()):
        (scale,) = require(params, path, PARAM)
        on_input = scales_input(config, path)
        expected = "(1, in)" if on_input else "(out, 1)"
        if scale.dim() != 2 or scale.shape[0 if on_input else 1] != 1:
            side = "input (it is a feedforward module)" if on_input else "output"
            raise AdapterRejected(
                f"module {path!r}: {PARAM} has shape {tuple(scale.shape)}; it scales the module's {side}, "
                f"which needs {expected}"
            )
        shift = scale.to(torch.float32).flatten() - 1.0
        label = f"{PARAM} - 1"
        if on_input:
            deltas[path] = InputScaleDelta(shift=shift, label=label)
        else:
            deltas[path] = OutputScaleDelta(shift=shift, with_bias=True, label=label)
    return NormalizedAdapter(peft_type="IA3", kind="ia3", deltas=deltas)
