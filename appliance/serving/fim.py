"""`suffix` on /v1/completions: the request's text prompts as fill-in-the-middle prompts.

The prompt is the code before the cursor, `suffix` the code after it; engine/fim.py lays them
out around the model's FIM tokens. Prefix and suffix are tokenized on their own (no BOS), so
usage.prompt_tokens = prefix tokens + suffix tokens + 3 (+1 BOS where the tokenizer adds one,
2 sentinels for Codestral).
"""

from __future__ import annotations

from hearth.appliance.protocol import CompletionRequest, bad_request
from hearth.appliance.serving.core import Prompt
from hearth.engine.fim import FAMILIES, FimSpec
from hearth.engine.prepare import TextCodec

_FAMILY_TOKENS = ", ".join(f.prefix[0] for f in FAMILIES)


def no_fim_message(model_name: str) -> str:
    return (
        f"suffix asks for fill-in-the-middle, but the model {model_name!r} has no FIM tokens "
        f"(none of {_FAMILY_TOKENS} in its vocabulary); send the request without suffix for a "
        "plain completion, or serve a code model trained for fill-in-the-middle (StarCoder2, "
        "Qwen2.5-Coder, CodeLlama, DeepSeek-Coder, Codestral). If the model has FIM tokens under "
        "other names, set fim for it in models.toml"
    )


def fim_prompts(tokenizer: TextCodec, fim: FimSpec, request: CompletionRequest) -> list[Prompt]:
    """One FIM prompt per text prompt, all with the request's suffix."""
    if request.echo:
        raise bad_request("echo cannot be combined with suffix (fill-in-the-middle)", param="echo")
    prompt = request.prompt
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not texts or not all(isinstance(text, str) for text in texts):
        raise bad_request(
            "suffix (fill-in-the-middle) needs the prompt as text (the code before the cursor), "
            "not token ids",
            param="prompt",
        )
    suffix_ids = tokenizer.encode(request.suffix or "", add_special_tokens=False)
    return [
        Prompt(None, fim.prompt_ids(tokenizer.encode(text, add_special_tokens=False), suffix_ids))
        for text in texts
    ]
