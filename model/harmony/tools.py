"""Tool definitions as the model was trained to read them: JSON schemas become TypeScript-like types.

A tool namespace renders as

    ## functions

    namespace functions {

    // Gets the weather.
    type get_weather = (_: {
    // City name
    location: string,
    unit?: "celsius" | "fahrenheit", // default: celsius
    }) => any;

    } // namespace functions

The layout, indentation and comment placement follow openai_harmony's renderer character for character,
because the token ids must match what gpt-oss saw in training.
"""

from __future__ import annotations

import json
from typing import Any

from gptoss_serve.model.harmony.messages import ToolNamespace

_NESTED_INDENT = "    "  # properties of a nested object
_VARIANT_INDENT = "   "  # the body of a oneOf variant, aligned after " | "


def text_lines(text: str) -> list[str]:
    """Lines as Rust's `str::lines` gives them: split on \\n, one trailing \\r dropped, no final empty line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _get(schema: Any, key: str) -> Any:
    """schema[key], tolerating schemas that are not objects (e.g. `true`)."""
    return schema.get(key) if isinstance(schema, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _json_compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _default_text(schema: Any) -> str | None:
    """`default: x`; strings are quoted unless they name one of the schema's enum values."""
    if not isinstance(schema, dict) or "default" not in schema:
        return None
    default = schema["default"]
    if isinstance(default, str):
        return f"default: {default}" if _is_enum(schema) else f'default: "{default}"'
    return f"default: {_json_compact(default)}"


def _with_null(type_text: str, schema: Any) -> str:
    """OpenAPI's `nullable: true` adds `| null` unless the type already mentions null."""
    if _get(schema, "nullable") is True and "null" not in type_text:
        return f"{type_text} | null"
    return type_text


def _one_of_text(variants: list, indent: str) -> str:
    """A top-level oneOf: one `| variant // comments` line per variant."""
    out = []
    for variant in variants:
        out.append(f"\n{indent} | ")
        out.append(_with_null(schema_to_typescript(variant, indent + _VARIANT_INDENT), variant))
        comments = [text for text in (_text(_get(variant, "description")), _default_text(variant)) if text]
        if comments:
            out.append(f" // {' '.join(comments)}")
    return "".join(out)


def _one_of_property_text(key: str, optional_mark: str, schema: dict, variants: list, indent: str) -> str:
    """A property whose schema is a oneOf: comments above, then one line per variant, then a lone comma."""
    out = []
    property_description = _text(schema.get("description"))
    first_variant_description = _text(_get(variants[0], "description")) if variants else None
    # A property description equal to the first variant's is written once, next to that variant.
    description_above = property_description is not None and property_description != first_variant_description
    if description_above:
        out.append(f"{indent}// {property_description}\n")
    default = _default_text(schema)
    if default:
        out.append(f"{indent}// {default}\n")
    out.append(f"{indent}{key}{optional_mark}:\n")
    for index, variant in enumerate(variants):
        out.append(f"{indent} | ")
        out.append(_with_null(schema_to_typescript(variant, indent + _VARIANT_INDENT), variant))
        comments = []
        variant_description = _text(_get(variant, "description"))
        if not (index == 0 and description_above) and variant_description is not None:
            if variant_description != property_description:
                comments.append(variant_description)
        variant_default = _default_text(variant)
        if variant_default:
            comments.append(variant_default)
        if comments:
            out.append(f" // {' '.join(comments)}")
        out.append("\n")
    out.append(f"{indent},\n")
    return "".join(out)


def _property_text(key: str, schema: Any, required: set[str], indent: str) -> str:
    out = []
    title = _text(_get(schema, "title"))
    if title is not None:
        out.append(f"{indent}// {title}\n{indent}//\n")
    one_of = _get(schema, "oneOf")
    if one_of is None:
        description = _text(_get(schema, "description"))
        if description is not None:
            out.append(f"{indent}// {description}\n")
    examples = _get(schema, "examples")
    if isinstance(examples, list) and examples:
        out.append(f"{indent}// Examples:\n")
        out.extend(f'{indent}// - "{example}"\n' for example in examples if isinstance(example, str))
    optional_mark = "" if key in required else "?"
    if isinstance(one_of, list):
        out.append(_one_of_property_text(key, optional_mark, schema, one_of, indent))
        return "".join(out)
    out.append(f"{indent}{key}{optional_mark}: ")
    out.append(_with_null(schema_to_typescript(schema, indent + _NESTED_INDENT), schema))
    out.append(",")
    default = _default_text(schema) if one_of is None else None
    if default:
        out.append(f" // {default}")
    out.append("\n")
    return "".join(out)


def _object_text(schema: dict, indent: str) -> str:
    out = []
    description = _text(schema.get("description"))
    if description is not None:
        out.append(f"{indent}// {description}\n")
    out.append("{\n")
    properties = schema.get("properties")
    if isinstance(properties, dict):
        required_list = schema.get("required") if isinstance(schema.get("required"), list) else []
        required = {name for name in required_list if isinstance(name, str)}
        out.extend(_property_text(key, value, required, indent) for key, value in properties.items())
    out.append(f"{indent}}}")
    return "".join(out)


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """The TypeScript-like type of a JSON schema; unknown or unsupported shapes become `any`."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return _one_of_text(one_of, indent)
    type_value = _get(schema, "type")
    if isinstance(type_value, list):
        names = ["number" if name == "integer" else name for name in type_value if isinstance(name, str)]
        if names:
            return " | ".join(names)
    if not isinstance(type_value, str):
        return "any"
    if type_value == "object":
        return _object_text(schema, indent)
    if type_value == "string":
        enum_values = schema.get("enum") if isinstance(schema.get("enum"), list) else []
        literals = [f'"{value}"' for value in enum_values if isinstance(value, str)]
        return " | ".join(literals) if literals else "string"
    if type_value in ("number", "integer"):
        return "number"
    if type_value == "boolean":
        return "boolean"
    if type_value == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _namespace_text(namespace: ToolNamespace) -> str:
    lines = [f"## {namespace.name}\n"]
    if namespace.description is not None:
        prefix = "// " if namespace.tools else ""
        lines.extend(prefix + line for line in text_lines(namespace.description))
    if namespace.tools:
        lines.append(f"namespace {namespace.name} {{\n")
        for tool in namespace.tools:
            lines.extend(f"// {line}" for line in text_lines(tool.description))
            if tool.parameters is None:
                lines.append(f"type {tool.name} = () => any;\n")
            else:
                lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
        lines.append(f"}} // namespace {namespace.name}")
    return "\n".join(lines)


def tools_section_text(namespaces: tuple[ToolNamespace, ...]) -> str:
    """The `# Tools` section; namespaces in name order, as openai_harmony keeps them in a sorted map."""
    ordered = sorted(namespaces, key=lambda namespace: namespace.name)
    return "\n\n".join(["# Tools", *(_namespace_text(namespace) for namespace in ordered)])
