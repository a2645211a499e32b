"""The offline quantizer behind `hearth quantize` (appliance/tools/quantize.py): our float model,
layer by layer, into a standard 4/8-bit checkpoint. It uses the engine (loader, model registry,
tokenizer, the formats' packing); the engine never imports it.

    algorithms.py          RTN, GPTQ (second-order), AWQ (activation-aware scale search)
    calibration.py         calibration / perplexity text, dense runs of our model
    pipeline.py            the model pass: per-linear QuantResults
    export.py              QuantResults → AutoAWQ / AutoGPTQ checkpoint
    calibration.txt        the shipped calibration and held-out text
"""
