"""How a model family writes tool calls in its text (``ToolFormat``), and which one a chat template
renders (``format_for_template``). A format is what surrounds one call's JSON
(``{"name": ..., "arguments": ...}``):

- ``hermes``: ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``, one block per call
  (Hermes 2 Pro, Qwen 2.5 and 3, and every model whose template renders ``<tool_call>``).
- ``llama3``: ``{"name": "f", "parameters": {...}}``, calls separated by ``;`` or new lines, perhaps
  after ``<|python_tag|>`` (Llama 3.1, 3.2 and 3.3's JSON tool calling).
- ``mistral``: ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`` (Mistral 7B v0.3, Mixtral,
  Mistral Nemo).
- ``builtin``: the ``hermes`` format, for models whose template knows nothing of tools (SmolLM2,
  Baichuan, ChatGLM3, the built-in templates): the tools are described in the system prompt
  (``models.templates.describe_tools``) and the model is asked to answer in that format.

``openai_api.tool_calls`` makes the grammar that has a model write calls in its format and parses
them back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolFormat:
    name: str
    triggers: tuple[str, ...]  # text that starts a call region; the first is the one the grammar writes
    opening: str  # what the grammar writes before a call's function name
    arguments_key: str  # "arguments" or "parameters"
    closing: str  # what the grammar writes after a call's arguments
    trigger_in_json: bool = False  # the trigger is the start of the call's JSON itself (llama3)

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the model writes it (assistant turns of earlier calls, in the prompt)."""
        return f'{self.opening}{name}", "{self.arguments_key}": {arguments}{self.closing}'


HERMES = ToolFormat("hermes", ("<tool_call>",), '<tool_call>\n{"name": "', "arguments", "}\n</tool_call>")
FORMATS = {
    "hermes": HERMES,
    "builtin": dataclasses.replace(HERMES, name="builtin"),
    "llama3": ToolFormat("llama3", ('{"name": ', "<|python_tag|>", '{"name":'), '{"name": "', "parameters", "}",
                         trigger_in_json=True),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",), '[TOOL_CALLS][{"name": "', "arguments", "}]"),
}


def format_for_template(template_text: str | None) -> ToolFormat:
    """The tool-call format a Jinja chat template renders; ``builtin`` when it renders no tools."""
    text = template_text or ""
    if "tools" not in text:
        return FORMATS["builtin"]
    if "[TOOL_CALLS]" in text:
        return FORMATS["mistral"]
    if "<|python_tag|>" in text or '"parameters"' in text or "'parameters'" in text:
        return FORMATS["llama3"]
    return FORMATS["hermes"]
