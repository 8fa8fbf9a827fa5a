"""How an input becomes a language model's prompt: one function that training and serving both call.

A generation artifact records its :class:`PromptFormat` in the manifest. The trainer renders every training and
evaluation input with :func:`render_prompt`, and the service renders every posted input with the same function
and the same tokenizer, so the two cannot drift. Instruction-tuned models use their own chat template; other
models a plain template string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PLACEHOLDER = "{input}"
ROLES = ("system", "user", "assistant")


class PromptFormat(BaseModel):
    """Where an input goes in the prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    style: Literal["chat", "plain"] = Field(
        description="chat: the tokenizer's chat template wraps one user turn; plain: the template is the prompt.")
    template: str = Field(PLACEHOLDER, description="The user turn (chat) or the whole prompt (plain); "
                                                   "'{input}' marks the input, exactly once.")
    system: str | None = Field(None, description="chat: a system turn before the user turn (none: the chat "
                                                 "template's own default, if it has one).")

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, value: str) -> str:
        if value.count(PLACEHOLDER) != 1:
            raise ValueError(f"must contain {PLACEHOLDER} exactly once (found {value.count(PLACEHOLDER)} times)")
        return value


def check_messages(messages: Sequence[Any], where: str = "messages", last: str = "user") -> list[dict[str, str]]:
    """Chat messages as the chat template takes them (``last``: the role the conversation must end with).

    Raises:
        ValueError: naming the first malformed message (not a {role, content} object, an unknown role, an empty
            conversation, or one that does not end with a ``last`` turn).
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{where}: give at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"{where}[{i}]: each message is an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: must be a string")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != last:
        raise ValueError(f"{where}: the last message must be the {last}'s"
                         + (" (the model answers it)" if last == "user" else " (the answer the model learns)"))
    return checked


def split_conversation(messages: Any) -> tuple[str | None, str, str]:
    """One training example from a chat conversation: ``(system turn or None, the user's turn, the answer)``.

    The user's turn is the input, which the artifact's prompt format wraps as it wraps every other input (the
    chat template, the template string, the system turn), so training and serving render it the same way.

    Raises:
        ValueError: malformed messages, or a conversation other than [system,] user, assistant (several exchanges
            would need their history rendered into each prompt, which the prompt format does not hold).
    """
    checked = check_messages(messages, where="conversation", last="assistant")
    roles = [m["role"] for m in checked]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"conversation: expected a user turn and the assistant's answer (after an optional system "
                         f"turn), got the roles {roles}; split longer conversations into one example per answer")
    system = checked[0]["content"] if roles[0] == "system" else None
    return system, checked[-2]["content"], checked[-1]["content"]


def render_messages(tokenizer: Any, messages: Sequence[Any]) -> str:
    """A conversation as the model's chat template renders it, ending where the assistant's answer begins.

    Raises:
        ValueError: the messages are malformed, or the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a plain prompt")
    return tokenizer.apply_chat_template(check_messages(messages), add_generation_prompt=True, tokenize=False)


def render_prompt(fmt: PromptFormat, tokenizer: Any, text: str) -> str:
    """The prompt for one input: what the model sees before it writes its answer."""
    body = fmt.template.replace(PLACEHOLDER, text)
    if fmt.style == "plain":
        return body
    messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [{"role": "user", "content": body}]
    return render_messages(tokenizer, messages)
