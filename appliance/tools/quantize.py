"""`hearth quantize`: a float HF model directory → a 4/8-bit checkpoint in a standard layout.

    hearth quantize --method awq|gptq|rtn --bits 4 --group-size 64 [--no-act-order] SRC DST

The model runs in Hearth's own engine code (appliance/tools/quantizer/pipeline.py) on the CPU in
float32; calibration uses the text shipped in appliance/tools/quantizer/calibration.txt. Registered
in cli.py with `add_parser(commands)` and dispatched with `run(args)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hearth.appliance.tools.quantizer.options import METHODS, QuantizeOptions

__all__ = ["QuantizeOptions", "add_parser", "quantize", "run"]


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the `quantize` subcommand to the CLI's subparsers."""
    p = commands.add_parser(
        "quantize",
        help="quantize a float HF model directory to AWQ / GPTQ / RTN int4 or int8",
        description="Quantize a float Hugging Face model directory (config.json + safetensors) "
        "into a checkpoint Hearth and other engines load: AutoAWQ GEMM layout for awq, "
        "AutoGPTQ layout (with g_idx) for gptq and rtn.",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        required=True,
        help="awq: activation-aware scales; gptq: second-order updates; rtn: rounding",
    )
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="inputs per quantization group; must divide every layer's input size "
        "(the default model's hidden size 576 needs 64 or 32)",
    )
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    _switch(p, "sym", "--sym", "symmetric (no zero points; gptq/rtn default)",
            "--asym", "with zero points")
    _switch(p, "act_order", "--act-order", "gptq (default): quantize the inputs with the largest "
            "activations first; static groups, so the checkpoint keeps the plain layout",
            "--no-act-order", "gptq: columns left to right")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("src", type=Path, help="float model directory")
    p.add_argument("dst", type=Path, help="output directory")
    return p


def _switch(p: argparse.ArgumentParser, dest: str, on: str, on_help: str, off: str,
            off_help: str) -> None:
    """A pair of opposite flags for one option left None (the method's default) unless given."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(on, dest=dest, action="store_true", default=None, help=on_help)
    group.add_argument(off, dest=dest, action="store_false", help=off_help)


def run(args: argparse.Namespace) -> int:
    try:
        options = QuantizeOptions(
            args.method, args.bits, args.group_size, args.sym, args.num_samples, args.seq_len,
            args.act_order,
        )
        quantize(options, args.src, args.dst, progress=not args.no_progress)
    except ValueError as error:
        print(f"hearth quantize: error: {error}")
        return 2
    print(f"wrote {args.dst}")
    return 0


def quantize(options: QuantizeOptions, src: Path, dst: Path, progress: bool = True) -> Path:
    import torch

    from hearth.appliance.tools.quantizer.calibration import calibration_samples, load_float_model
    from hearth.appliance.tools.quantizer.export import write_checkpoint
    from hearth.appliance.tools.quantizer.pipeline import check_group_size, quantize_model
    from hearth.engine.progress import progress_bar

    src, dst = Path(src), Path(dst)
    model = load_float_model(src)
    if model.config.quantization is not None:
        raise ValueError(f"{src} is already quantized ({model.config.quantization.method})")
    check_group_size(model, options.group_size)
    samples = (
        []
        if options.method == "rtn"
        else calibration_samples(src, options.num_samples, options.seq_len)
    )
    desc = f"Quantizing ({options.method})"
    with torch.no_grad(), progress_bar(len(model.layers), desc, "layer", progress) as bar:
        results = quantize_model(model, samples, options, on_layer=lambda i: bar.update(1))
    return write_checkpoint(model, results, options, src, dst)
