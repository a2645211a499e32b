"""`hearth quantize`'s model pass: our float model, layer by layer, into per-linear QuantResults.

    rtn   every fused linear rounded to nearest per group; no calibration data
    gptq  sequential, as GPTQModel's true_sequential: per decoder layer, for qkv, o, gate_up, down
          in turn, run the layer (earlier linears already quantized) over the calibration samples,
          build the Hessian from that linear's inputs, quantize it with second-order updates; the
          next layer sees the quantized layer's outputs
    awq   as AutoAWQ: run the float layer once, capturing every linear's inputs; search per-channel
          scales and fold 1/s into the previous op (RMSNorm weight; up_proj rows for down_proj;
          v rows for o_proj when there is no GQA); search clipping; round to nearest (asymmetric)

Results are keyed by our module names ("layers.3.mlp.gate_up_proj"); the model's float weights
are replaced by their dequantized values as it goes (what the checkpoint will hold).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hearth.appliance.tools.quantizer import algorithms
from hearth.appliance.tools.quantizer.algorithms import QuantResult
from hearth.appliance.tools.quantizer.calibration import DenseCausalAttention
from hearth.appliance.tools.quantizer.options import QuantizeOptions

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
def check_group_size(model, group_size: int) -> None:
    """Every linear's input size must be a multiple of the group size; say which one is not."""
    c = model.config
    sizes = {"hidden_size": c.hidden_size, "num_heads * head_dim": c.num_heads * c.head_dim,
             "intermediate_size": c.intermediate_size}
    bad = {name: size for name, size in sizes.items() if size % group_size}
    if bad:
        fits = [g for g in (128, 64, 32) if all(s % g == 0 for s in sizes.values())]
        raise ValueError(f"group size {group_size} does not divide {bad}; use "
                         f"{' or '.join(map(str, fits)) or 'a divisor of ' + str(sizes)}")


@torch.no_grad()
def quantize_model(model, samples: list[torch.Tensor], options: QuantizeOptions,
                   on_layer: Callable[[int], None] = lambda i: None) -> dict[str, QuantResult]:
    check_group_size(model, options.group_size)
    results: dict[str, QuantResult] = {}
    states = [(model.embed_tokens(s), None) for s in samples]
    for i, layer in enumerate(model.layers):
        if options.method == "rtn":
            for name in LINEARS:
                results[f"layers.{i}.{name}"] = _rtn(layer.get_submodule(name), options)
        elif options.method == "gptq":
            for name in LINEARS:
                x = torch.cat(_capture(layer, [name], states)[0][name])
                results[f"layers.{i}.{name}"] = _gptq(layer.get_submodule(name), x, options)
        else:
            inputs, outputs = _capture(layer, list(LINEARS), states)
            results.update(_awq_layer(model, i, {n: torch.cat(v) for n, v in inputs.items()},
                                      options))
        if options.method != "rtn":
            states = outputs if options.method == "awq" else _capture(layer, [], states)[1]
        on_layer(i)
    return results


def _capture(layer, names: list[str], states):
    """Run the layer over every sample: (inputs of the named linears, per sample; new states)."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [layer.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs[n].append(args[0].detach().float()))
        for n in names]
    outputs = []
    try:
        for hidden, residual in states:
            positions = torch.arange(hidden.shape[0])
            outputs.append(layer(positions, hidden, residual, None, None, DenseCausalAttention()))
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, outputs


def _set(linear, result: QuantResult) -> QuantResult:
    linear.weight.data.copy_(result.dequantize().to(linear.weight.dtype))
    return result


def _rtn(linear, o: QuantizeOptions) -> QuantResult:
    return _set(linear, algorithms.rtn(linear.weight.data.float(), o.bits, o.group_size,
                                       o.symmetric))


def _gptq(linear, x: torch.Tensor, o: QuantizeOptions) -> QuantResult:
    hessian = 2.0 * x.t() @ x / x.shape[0]  # (K, K)
    return _set(linear, algorithms.gptq(linear.weight.data.float(), hessian, o.bits, o.group_size,
                                        o.symmetric, act_order=o.gptq_act_order))


def _awq_layer(model, i: int, x: dict[str, torch.Tensor], o: QuantizeOptions):
    layer, c = model.layers[i], model.config
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    v_rows = slice(q_rows + kv_rows, q_rows + 2 * kv_rows)
    up_rows = slice(c.intermediate_size, 2 * c.intermediate_size)
    folds = {  # linear -> (weight the 1/s folds into, its rows), or None: no scaling
        "self_attn.qkv_proj": (layer.input_layernorm.weight, slice(None)),
        "self_attn.o_proj": (attn.qkv_proj.weight, v_rows) if kv_rows == q_rows else None,
        "mlp.gate_up_proj": (layer.post_attention_layernorm.weight, slice(None)),
        "mlp.down_proj": (mlp.gate_up_proj.weight, up_rows),
    }
    tokens = _subsample(x)
    for name, fold in folds.items():  # scale everything first: folds touch other linears' rows
        if fold is None:
            continue
        linear = layer.get_submodule(name)
        s = algorithms.awq_scales(linear.weight.data, tokens[name], o.bits, o.group_size)
        linear.weight.data.mul_(s[None, :].to(linear.weight.dtype))
        prev, rows = fold
        prev.data[rows].div_(s.reshape((-1,) + (1,) * (prev.dim() - 1)).to(prev.dtype))
        tokens[name] = tokens[name] / s
    results = {}
    for name in LINEARS:
        linear = layer.get_submodule(name)
        w = linear.weight.data.float()
        if name != "self_attn.qkv_proj":  # AutoAWQ skips q/k: attention scores amplify clipping
            w = algorithms.awq_clip(w, tokens[name][::4], o.bits, o.group_size)
        results[f"layers.{i}.{name}"] = _set(linear, algorithms.rtn(w, o.bits, o.group_size,
                                                                    sym=False))
    return results


def _subsample(x: dict[str, torch.Tensor], max_tokens: int = 512) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in x.items():
        step = max(1, t.shape[0] // max_tokens)
        out[name] = t[::step][:max_tokens]
    return out
