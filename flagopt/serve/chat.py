"""Chat prompts from a Jinja chat template, as Hugging Face writes them (``--chat-template``).

OPT ships none; a server started with one renders ``messages`` into a prompt with it, in a
sandboxed Jinja environment (templates are data, not code). Jinja comes with FastAPI's
usual installs; without it a chat template cannot be used.
"""

from __future__ import annotations

from collections.abc import Sequence

from flagopt.serve.protocol import APIError, ChatMessage
from flagopt.tokenizer import OPTTokenizer


def render(template: str, messages: Sequence[ChatMessage], tokenizer: OPTTokenizer) -> str:
    """The prompt ``template`` makes of ``messages`` (``add_generation_prompt=True``).

    Raises:
        APIError: 400 when the template fails on these messages; 500 without Jinja.
    """
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise APIError(500, "--chat-template needs jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(
            messages=[m.model_dump(exclude_none=True) for m in messages],
            add_generation_prompt=True, bos_token="</s>", eos_token="</s>")
    except TemplateError as exc:
        raise APIError(400, f"the chat template failed on these messages: {exc}",
                       param="messages") from None
