"""Structured output (json_object / json_schema): what is asked of the model and what is checked.

Enforced: the answer is a final-channel message (assistant_turn forces the `final` header after reasoning, so
JSON never lands in the analysis channel or in malformed harmony), the schema is given to the model in the
developer message under `# Response Formats` as harmony expects, and the answer is checked afterwards: it must
parse as JSON (a markdown code fence around it is removed) and, with a schema, validate against it.
Not enforced: decoding is not constrained token by token, so a weak model can still write invalid JSON. The
response then says so in the choice's `response_format_error` (chat) or the response's `error` (Responses);
it is never silently passed off as valid.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

try:
    import jsonschema
except ImportError:  # schema validation is skipped without it; JSON syntax is still checked
    jsonschema = None


@dataclasses.dataclass(frozen=True)
class JsonFormat:
    name: str
    schema: dict[str, Any] | None  # None: any JSON object (json_object)
    description: str | None = None


def developer_instructions(fmt: JsonFormat) -> str:
    """The `# Response Formats` section for the developer message."""
    lines = ["# Response Formats", "", f"## {fmt.name}", ""]
    if fmt.description:
        lines += [f"// {line}" for line in fmt.description.splitlines()]
    if fmt.schema is not None:
        lines.append(json.dumps(fmt.schema, separators=(",", ":")))
    else:
        lines.append("Answer with one JSON object and nothing else.")
    return "\n".join(lines)


def check(fmt: JsonFormat, text: str) -> tuple[str, str | None]:
    """(the JSON text without a code fence around it, the reason it is not acceptable or None)."""
    body = _strip_code_fence(text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return body, f"the answer is not valid JSON: {error}"
    if fmt.schema is None:
        if not isinstance(value, dict):
            return body, "the answer is JSON but not an object"
        return body, None
    if jsonschema is not None:
        try:
            jsonschema.validate(value, fmt.schema)
        except jsonschema.ValidationError as error:
            return body, f"the answer does not match the schema: {error.message}"
        except jsonschema.SchemaError as error:
            return body, f"the schema itself is invalid: {error.message}"
    return body, None


def _strip_code_fence(text: str) -> str:
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        inner = text[3:-3]
        first_newline = inner.find("\n")
        if first_newline >= 0 and inner[:first_newline].strip().isalnum():
            inner = inner[first_newline + 1:]  # the language tag (```json)
        return inner.strip()
    return text
