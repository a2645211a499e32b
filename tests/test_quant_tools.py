"""Checkpoints written by the real tools load in Hearth with the tools' own logits (slow, opt-in).

Needs the artifacts of bench/quant_tools.py (gptqmodel==7.6.0 and llmcompressor, each run in its
own venv) under $HEARTH_QUANT_WORK/{gptqmodel,llmcompressor}; see docs/quantization.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
WORK = os.environ.get("HEARTH_QUANT_WORK")


@pytest.fixture(scope="module")
def report():
    if not WORK or not Path(WORK).is_dir():
        pytest.skip("set HEARTH_QUANT_WORK to the directory bench/quant_tools.py wrote")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import quant

    return quant.run_tool_check(Path(WORK))


def test_llmcompressor_w4a16_group64(report):
    r = report["llmcompressor"]  # transformers decompresses to float32: an exact reference
    assert r["layer"] == "IntQuantLinear"
    assert r["logits"]["max_abs"] < 1e-3
    assert r["logits"]["argmax_agreement"] == 1.0


def test_gptqmodel_gptq_group64(report):
    r = report["gptqmodel"]
    assert r["layer"] == "IntQuantLinear"
    # The tool's dequantize-then-matmul path rounds W to float16: small, unbiased differences.
    assert r["logits_dequant"]["mean_abs"] < 0.02 * r["logit_scale"]
    assert r["logits_dequant"]["argmax_agreement"] >= 0.99
    # Its default CPU kernel runs in bfloat16.
    assert r["logits"]["argmax_agreement"] >= 0.97
