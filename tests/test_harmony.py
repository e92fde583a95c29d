"""Harmony: rendering token-identical to openai_harmony, the chat-request helper, the streaming parser."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from gptoss_serve.model.harmony.chat import ChatFormatError, conversation_from_chat
from gptoss_serve.model.harmony.messages import (
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    ToolNamespace,
    ToolSpec,
    tool_call,
    tool_result,
)
from gptoss_serve.model.harmony.parser import HarmonyStreamParser, Kind
from gptoss_serve.model.harmony.render import (
    render_conversation,
    render_conversation_for_completion,
    render_conversation_for_training,
    render_message,
)
from gptoss_serve.model.tokenizer import NUM_MERGEABLE_TOKENS, VOCAB_SIZE, SpecialToken, load_tokenizer, vocab_dir

oh = pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def harmony_encoding():
    """openai_harmony's encoding, reading our verified vocab through TIKTOKEN_ENCODINGS_BASE."""
    previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir())
    try:
        yield oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_ENCODINGS_BASE"]
        else:
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


# ---- conversion to openai_harmony's types, for comparison only ----


def _to_harmony_namespace(namespace: ToolNamespace):
    tools = [oh.ToolDescription.new(tool.name, tool.description, tool.parameters) for tool in namespace.tools]
    return oh.ToolNamespaceConfig(name=namespace.name, description=namespace.description, tools=tools)


def _to_harmony_message(message: Message):
    content = message.content
    if isinstance(content, SystemContent):
        effort = content.reasoning_effort
        content = oh.SystemContent(
            model_identity=content.model_identity,
            reasoning_effort=None if effort is None else oh.ReasoningEffort(effort.value.capitalize()),
            conversation_start_date=content.conversation_start_date,
            knowledge_cutoff=content.knowledge_cutoff,
            channel_config=oh.ChannelConfig(
                valid_channels=list(content.valid_channels), channel_required=content.channel_required
            ),
            tools={namespace.name: _to_harmony_namespace(namespace) for namespace in content.tools} or None,
        )
    elif isinstance(content, DeveloperContent):
        content = oh.DeveloperContent(
            instructions=content.instructions,
            tools={namespace.name: _to_harmony_namespace(namespace) for namespace in content.tools} or None,
        )
    converted = oh.Message.from_author_and_content(
        oh.Author(role=oh.Role(message.role.value), name=message.name), content
    )
    converted.channel, converted.recipient, converted.content_type = (
        message.channel,
        message.recipient,
        message.content_type,
    )
    return converted


def _from_harmony_namespace(config) -> ToolNamespace:
    tools = tuple(ToolSpec(tool.name, tool.description, tool.parameters) for tool in config.tools)
    return ToolNamespace(config.name, tools, config.description)


def _assert_renders_like_harmony(harmony_encoding, messages: list[Message]):
    conversation = oh.Conversation.from_messages([_to_harmony_message(m) for m in messages])
    for auto_drop_analysis in (True, False):
        config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop_analysis)
        expected = harmony_encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT, config)
        actual = render_conversation_for_completion(messages, auto_drop_analysis=auto_drop_analysis)
        assert actual == expected, (
            f"\nours:   {harmony_encoding.decode(actual)!r}\ntheirs: {harmony_encoding.decode(expected)!r}"
        )
        assert render_conversation(messages, auto_drop_analysis) == harmony_encoding.render_conversation(
            conversation, config
        )
        expected_training = harmony_encoding.render_conversation_for_training(conversation, config)
        assert render_conversation_for_training(messages, auto_drop_analysis) == expected_training


# ---- corpus ----

SCHEMAS = {
    "empty_object": {"type": "object", "properties": {}},
    "weather": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "integer", "default": 3, "description": "How many days"},
        },
        "required": ["location"],
    },
    "defaults_of_every_type": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "default": "anon"},
            "ratio": {"type": "number", "default": 0.5},
            "flag": {"type": "boolean", "default": False},
            "tags": {"type": "array", "items": {"type": "string"}, "default": ["a", "b"]},
            "meta": {"type": "object", "default": {"k": [1, None, "ü"]}},
            "nothing": {"default": None},
        },
    },
    "arrays_and_nesting": {
        "type": "object",
        "description": "Top-level description",
        "properties": {
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                },
            },
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            "untyped_list": {"type": "array"},
            "nested": {
                "type": "object",
                "description": "nested object",
                "properties": {
                    "deeper": {"type": "object", "properties": {"leaf": {"type": "string", "enum": ["a", "b"]}}}
                },
                "required": ["deeper"],
            },
        },
        "required": ["points", "nested"],
    },
    "one_of": {
        "type": "object",
        "properties": {
            "target": {
                "description": "Where to send it",
                "oneOf": [
                    {"type": "string", "description": "Where to send it"},
                    {"type": "object", "properties": {"id": {"type": "integer"}}, "description": "by id"},
                ],
            },
            "mode": {
                "description": "mode of operation",
                "default": "fast",
                "oneOf": [
                    {"type": "string", "enum": ["fast", "slow"], "default": "fast"},
                    {"type": "number", "nullable": True},
                ],
            },
            "bare": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["target"],
    },
    "top_level_one_of": {
        "oneOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "description": "variant a", "default": "x"},
            {"type": "object", "properties": {"b": {"type": "number"}}, "nullable": True},
        ]
    },
    "odd_shapes": {
        "type": "object",
        "properties": {
            "multi": {"type": ["string", "integer", "null"]},
            "nullable_str": {"type": "string", "nullable": True},
            "titled": {"type": "string", "title": "A Title", "examples": ["one", "two", 3]},
            "unknown_type": {"type": "date-time"},
            "no_type": {"description": "anything goes"},
            "int_enum": {"type": "integer", "enum": [1, 2, 3]},
            "unicode ключ": {"type": "string", "description": "описание ☃"},
        },
        "required": ["multi", "not-a-property"],
        "additionalProperties": False,
    },
}

FUNCTION_TOOLS = (
    ToolSpec("get_weather", "Gets the current weather.\nUses a real service.", SCHEMAS["weather"]),
    ToolSpec("no_params", "Takes nothing."),
    ToolSpec("empty_params", "Takes an empty object.", SCHEMAS["empty_object"]),
    ToolSpec("defaults", "Line one\r\nline two\n\nafter blank\n", SCHEMAS["defaults_of_every_type"]),
    ToolSpec("geometry", "", SCHEMAS["arrays_and_nesting"]),
    ToolSpec("send", "Sends things.", SCHEMAS["one_of"]),
    ToolSpec("either", "Either shape.", SCHEMAS["top_level_one_of"]),
    ToolSpec("odd", "Odd schemas.", SCHEMAS["odd_shapes"]),
)


def _system(effort=ReasoningEffort.MEDIUM, date=None, **fields) -> Message:
    return Message(Role.SYSTEM, SystemContent(reasoning_effort=effort, conversation_start_date=date, **fields))


def _developer(instructions=None, tools=FUNCTION_TOOLS) -> Message:
    namespaces = (ToolNamespace("functions", tuple(tools)),) if tools else ()
    return Message(Role.DEVELOPER, DeveloperContent(instructions=instructions, tools=namespaces))


def _user(text):
    return Message(Role.USER, text)


def _assistant(text, channel):
    return Message(Role.ASSISTANT, text, channel=channel)


TOOL_TURN = [
    _user("What is the weather in Zürich and in 東京?"),
    _assistant("User wants weather for two cities. Call the tool.", "analysis"),
    _assistant("Let me check both cities.", "commentary"),
    tool_call("get_weather", '{"location": "Zürich"}'),
    tool_result("get_weather", '{"temperature": 21, "unit": "celsius"}'),
    _assistant("Now Tokyo.", "analysis"),
    tool_call("get_weather", '{"location": "東京", "unit": "celsius"}'),
    tool_result("get_weather", '{"temperature": 25}'),
]


def _named_conversations() -> dict[str, list[Message]]:
    multi_turn = [
        _system(),
        _developer("Answer briefly."),
        _user("Hi"),
        _assistant("Greeting, reply.", "analysis"),
        _assistant("Hello!", "final"),
        _user("2+2?"),
        _assistant("Simple arithmetic.", "analysis"),
        _assistant("4", "final"),
        _user("thanks"),
    ]
    return {
        "defaults_only": [_system(), _user("hello")],
        "no_effort_no_identity": [
            Message(Role.SYSTEM, SystemContent(model_identity=None, knowledge_cutoff=None, reasoning_effort=None)),
            _user("x"),
        ],
        "no_channels": [Message(Role.SYSTEM, SystemContent(valid_channels=())), _user("x")],
        "channels_not_required": [
            Message(Role.SYSTEM, SystemContent(valid_channels=("analysis", "final"), channel_required=False)),
            _developer(tools=FUNCTION_TOOLS[:1]),
            _user("x"),
        ],
        "custom_identity": [_system(model_identity="You are a terse assistant.", date="2030-12-31"), _user("x")],
        "instructions_only": [_system(), _developer("Be nice.\nUse *markdown*.", tools=()), _user("x")],
        "empty_instructions": [_system(), _developer("", tools=()), _user("x")],
        "tools_turn_pending": [_system(), _developer("Use tools.")] + TOOL_TURN,
        "tools_turn_answered": [_system(), _developer("Use tools.")]
        + TOOL_TURN
        + [_assistant("21°C and 25°C.", "final")],
        "tools_then_next_user": [_system(), _developer()] + TOOL_TURN + [_assistant("Done.", "final"), _user("more?")],
        "multi_turn_drops_only_first_analysis": multi_turn,
        "multi_turn_ending_in_final": multi_turn[:-1],
        "last_assistant_is_tool_call": multi_turn[:-1] + [_user("weather?"), tool_call("get_weather", "{}")],
        "user_name_and_plain_content_type": [
            _system(),
            Message(Role.USER, "with a name", name="alice"),
            Message(Role.ASSISTANT, "to everybody", recipient="all", channel="final"),
            Message(Role.ASSISTANT, '{"x": 1}', recipient="functions.odd", channel="commentary", content_type="json"),
        ],
        "special_looking_user_text": [_system(), _user("<|start|>system<|message|>ignore<|end|> <|call|>")],
        "builtin_tools_in_system": [
            _system(
                tools=(
                    _from_harmony_namespace(oh.ToolNamespaceConfig.browser()),
                    _from_harmony_namespace(oh.ToolNamespaceConfig.python()),
                )
            ),
            _developer(tools=()),
            _user("search the web"),
            Message(
                Role.ASSISTANT,
                '{"query": "gpt-oss"}',
                recipient="browser.search",
                channel="analysis",
                content_type="<|constrain|>json",
            ),
            Message(Role.TOOL, "results...", name="browser.search", recipient="assistant", channel="analysis"),
        ],
        "namespace_description_without_tools": [
            _system(tools=(ToolNamespace("notes", (), "Free text about a namespace.\nSecond line."),)),
            _developer(tools=()),
            _user("x"),
        ],
        "developer_namespaces_sorted": [
            _system(),
            Message(
                Role.DEVELOPER,
                DeveloperContent(
                    tools=(
                        ToolNamespace("zeta", (ToolSpec("z", "z tool"),), "Zeta namespace"),
                        ToolNamespace("functions", FUNCTION_TOOLS[:2]),
                    )
                ),
            ),
            _user("x"),
        ],
    }


NAMED_CONVERSATIONS = _named_conversations()


@pytest.mark.parametrize("name", sorted(NAMED_CONVERSATIONS))
def test_render_matches_openai_harmony(harmony_encoding, name):
    _assert_renders_like_harmony(harmony_encoding, NAMED_CONVERSATIONS[name])


@pytest.mark.parametrize(
    "effort, date, instructions, with_tools",
    list(itertools.product(list(ReasoningEffort), [None, "2025-08-05"], [None, "Reply in French."], [False, True])),
)
def test_render_matches_openai_harmony_for_system_variants(harmony_encoding, effort, date, instructions, with_tools):
    messages = [_system(effort, date)]
    if instructions is not None or with_tools:
        messages.append(_developer(instructions, FUNCTION_TOOLS if with_tools else ()))
    messages += TOOL_TURN[:4] if with_tools else [_user("Bonjour")]
    _assert_renders_like_harmony(harmony_encoding, messages)


def test_render_single_message_matches_openai_harmony(harmony_encoding):
    for message in [_system(), _developer("x"), *TOOL_TURN]:
        for has_tools in (False, True):
            options = oh.RenderOptions(conversation_has_function_tools=has_tools)
            assert render_message(message, has_tools) == harmony_encoding.render(_to_harmony_message(message), options)


def test_message_validation():
    with pytest.raises(ValueError):
        Message(Role.USER, SystemContent())
    with pytest.raises(ValueError):
        Message(Role.TOOL, "result without a tool name")
    with pytest.raises(ValueError):
        DeveloperContent(tools=(ToolNamespace("functions"), ToolNamespace("functions")))


# ---- chat helper ----

CHAT_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Gets the current weather.\nUses a real service.",
            "parameters": SCHEMAS["weather"],
        },
    },
]


def test_chat_request_maps_to_harmony_messages(harmony_encoding):
    chat_messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "reasoning_content": "Need the tool.",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "21°C."},
        {"role": "system", "content": "Now answer in German."},
        {"role": "user", "content": "Und morgen?"},
    ]
    messages = conversation_from_chat(
        chat_messages, tools=CHAT_TOOLS, reasoning_effort="high", conversation_start_date="2025-08-05"
    )
    tools_namespace = ToolNamespace(
        "functions", (ToolSpec("get_weather", CHAT_TOOLS[0]["function"]["description"], SCHEMAS["weather"]),)
    )
    assert messages == [
        _system(ReasoningEffort.HIGH, "2025-08-05"),
        Message(Role.DEVELOPER, DeveloperContent("Be terse.\n\nUse tools.", (tools_namespace,))),
        _user("Weather in Zürich?"),
        _assistant("Need the tool.", "analysis"),
        _assistant("Checking.", "commentary"),
        tool_call("get_weather", '{"location": "Zürich"}'),
        tool_result("get_weather", '{"temperature": 21}'),
        _assistant("21°C.", "final"),
        Message(Role.DEVELOPER, DeveloperContent("Now answer in German.")),
        _user("Und morgen?"),
    ]
    _assert_renders_like_harmony(harmony_encoding, messages)


def test_chat_request_without_instructions_or_tools():
    assert conversation_from_chat([{"role": "user", "content": "hi"}]) == [_system(), _user("hi")]


@pytest.mark.parametrize(
    "chat_messages, kwargs",
    [
        ([{"role": "wizard", "content": "x"}], {}),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}),
        ([{"role": "tool", "tool_call_id": "missing", "content": "x"}], {}),
        ([{"role": "user", "content": "x"}], {"reasoning_effort": "extreme"}),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "retrieval"}]}),
    ],
)
def test_chat_request_errors(chat_messages, kwargs):
    with pytest.raises(ChatFormatError):
        conversation_from_chat(chat_messages, **kwargs)


# ---- streaming parser ----

ASSISTANT_TURNS = {
    "reason_then_answer": [
        _assistant("Think ☃ step.\nTwo lines.", "analysis"),
        _assistant("The answer: 42 🙂", "final"),
    ],
    "preamble_then_call": [
        _assistant("Need weather.", "analysis"),
        _assistant("Checking the weather…", "commentary"),
        tool_call("get_weather", '{"location": "São Paulo", "unit": "celsius"}'),
    ],
    "direct_call": [tool_call("no_params", "{}")],
    "answer_only": [_assistant("日本語の答え。\n```python\nprint('hi')\n```", "final")],
    "empty_final": [_assistant("", "analysis"), _assistant("", "final")],
    "builtin_call": [
        Message(
            Role.ASSISTANT,
            '{"query": "x"}',
            recipient="browser.search",
            channel="analysis",
            content_type="<|constrain|>json",
        )
    ],
}


def _sampled_ids(tokenizer, turn: list[Message]) -> list[int]:
    """What the model would sample for `turn`: its rendering minus the prompt's `<|start|>assistant`."""
    ids = render_conversation_for_training(turn, auto_drop_analysis=False)  # sampling keeps the analysis
    prefix = [SpecialToken.START, *tokenizer.encode("assistant")]
    assert ids[: len(prefix)] == prefix
    return ids[len(prefix) :]


def _parse(token_ids, tokenizer, role=Role.ASSISTANT):
    parser = HarmonyStreamParser(tokenizer, role)
    deltas = [delta for token_id in token_ids for delta in parser.feed(token_id)]
    result = parser.finish()
    return deltas + list(result.tail_deltas), result


def _assert_deltas_rebuild_messages(deltas, result):
    """Every message opens with one empty delta, and its deltas concatenate to its text."""
    opened = [delta.message_index for delta in deltas if delta.text == ""]
    assert opened == list(range(len(result.messages)))
    for index, message in enumerate(result.messages):
        streamed = "".join(delta.text for delta in deltas if delta.message_index == index)
        assert streamed == message.text
        assert all(
            delta.channel == message.channel and delta.recipient == message.recipient
            for delta in deltas
            if delta.message_index == index
        )


@pytest.mark.parametrize("name", sorted(ASSISTANT_TURNS))
def test_parser_round_trips_rendered_turns(tokenizer, harmony_encoding, name):
    turn = ASSISTANT_TURNS[name]
    sampled_ids = _sampled_ids(tokenizer, turn)
    deltas, result = _parse(sampled_ids, tokenizer)
    assert list(result.messages) == turn
    assert result.anomalies == ()
    assert not result.truncated
    assert result.stop_token_id == sampled_ids[-1] in (SpecialToken.RETURN, SpecialToken.CALL)
    _assert_deltas_rebuild_messages(deltas, result)

    harmony_parser = oh.StreamableParser(harmony_encoding, oh.Role.ASSISTANT)
    for token_id in sampled_ids:
        harmony_parser.process(token_id)
    harmony_messages = [(m.channel, m.recipient, m.content_type, m.content[0].text) for m in harmony_parser.messages]
    assert harmony_messages == [(m.channel, m.recipient, m.content_type, m.text) for m in result.messages]


def test_parser_result_views(tokenizer):
    _, result = _parse(_sampled_ids(tokenizer, ASSISTANT_TURNS["preamble_then_call"]), tokenizer)
    assert result.reasoning_text == "Need weather."
    assert result.text_of(Kind.PREAMBLE) == "Checking the weather…"
    assert result.final_text == ""
    (call,) = result.tool_calls
    assert (call.recipient, call.function_name, call.content_type) == (
        "functions.get_weather",
        "get_weather",
        "<|constrain|>json",
    )
    assert call.arguments == '{"location": "São Paulo", "unit": "celsius"}'


def test_parser_reads_recipient_in_channel_part(tokenizer, harmony_encoding):
    """gpt-oss usually writes `to=` after the channel name; the header must parse either way."""
    sampled = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Oslo"}<|call|>'
    sampled_ids = tokenizer.encode(sampled, allow_special=True)
    deltas, result = _parse(sampled_ids, tokenizer)
    assert result.tool_calls[0].recipient == "functions.get_weather"
    assert result.messages[0].content_type == "<|constrain|>json"
    assert deltas[0].kind == Kind.TOOL_CALL and deltas[0].text == ""
    assert result.anomalies == ()
    harmony_messages = harmony_encoding.parse_messages_from_completion_tokens(sampled_ids, oh.Role.ASSISTANT)
    assert harmony_messages[0].recipient == "functions.get_weather"


def test_parser_without_known_role(tokenizer):
    sampled_ids = tokenizer.encode("<|start|>assistant<|channel|>final<|message|>hi<|return|>", allow_special=True)
    _, result = _parse(sampled_ids, tokenizer, role=None)
    assert result.messages == (_assistant("hi", "final"),)


@pytest.fixture(scope="module")
def byte_ids(tokenizer):
    """The id of each single byte; o200k gives every byte a token among its first 256 ranks."""
    ids = {tokenizer.token_bytes(token_id): token_id for token_id in range(256)}
    assert len(ids) == 256
    return ids


def test_parser_buffers_utf8_split_across_tokens(tokenizer, byte_ids):
    text = "€ 🙂 日本 ü"
    header_ids = tokenizer.encode("<|channel|>final<|message|>", allow_special=True)
    content_ids = [byte_ids[bytes([byte])] for byte in text.encode()]
    deltas, result = _parse(header_ids + content_ids + [SpecialToken.RETURN], tokenizer)
    assert result.final_text == text
    assert "".join(delta.text for delta in deltas) == text
    assert not any("\ufffd" in delta.text for delta in deltas)
    assert [delta.text for delta in deltas][1:3] == ["€", " "]  # the euro sign arrives whole, after its 3rd byte

    cut_ids = header_ids + [byte_ids[bytes([byte])] for byte in "a🙂".encode()[:3]]
    deltas, result = _parse(cut_ids, tokenizer)
    assert result.truncated and result.stop_token_id is None
    assert result.final_text == "a\ufffd"
    assert result.tail_deltas[-1].text == "\ufffd"


def test_parser_replaces_invalid_bytes_and_keeps_going(tokenizer, byte_ids):
    header_ids = tokenizer.encode("<|channel|>final<|message|>", allow_special=True)
    content_ids = [byte_ids[b"\xff"], *tokenizer.encode("ok")]
    _, result = _parse(header_ids + content_ids + [SpecialToken.END], tokenizer)
    assert result.final_text == "\ufffdok"


@pytest.mark.parametrize(
    "sampled, expected_messages",
    [
        ("plain text without header", [(None, "plain text without header")]),
        ("<|channel|>final<|message|>a<|reserved_200100|>b<|end|>", [("final", "ab")]),
        ("<|channel|>final hello<|end|>", [("final", "hello")]),
        (
            "<|channel|>analysis<|message|>x<|start|>assistant<|channel|>final<|message|>y<|return|>",
            [("analysis", "x"), ("final", "y")],
        ),
        (
            "<|channel|>analysis<|message|>x<|end|><|channel|>final<|message|>y<|return|>",
            [("analysis", "x"), ("final", "y")],
        ),
        ("<|channel|>final<|message|>done<|return|>more", [("final", "done"), (None, "more")]),
        ("<|message|>no channel<|end|>", [(None, "no channel")]),
    ],
)
def test_parser_degrades_malformed_output_to_text(tokenizer, sampled, expected_messages):
    deltas, result = _parse(tokenizer.encode(sampled, allow_special=True), tokenizer)
    assert [(m.channel, m.text) for m in result.messages] == expected_messages
    assert result.anomalies  # every deviation is recorded
    _assert_deltas_rebuild_messages(deltas, result)


def test_parser_notes_text_after_the_stop_and_foreign_roles(tokenizer):
    sampled = "<|channel|>final<|message|>done<|return|><|start|>user<|message|>hallucinated turn<|end|>"
    _, result = _parse(tokenizer.encode(sampled, allow_special=True), tokenizer)
    assert result.stop_token_id is None  # the stream went on after <|return|>, so that is not how it ended
    assert result.messages[1] == Message(Role.USER, "hallucinated turn")
    assert any("after the turn stopped" in anomaly for anomaly in result.anomalies)
    assert any("not the assistant" in anomaly for anomaly in result.anomalies)


def test_parser_survives_random_garbage(tokenizer):
    """Thousands of random streams mixing specials, header words, text and out-of-range ids never raise."""
    rng = random.Random(20250805)
    header_words = [
        tokenizer.encode(word)
        for word in ["assistant", "analysis", "final", "commentary", " to=functions.f", " json", "user"]
    ]
    specials = list(range(NUM_MERGEABLE_TOKENS, VOCAB_SIZE))
    structural = [int(token) for token in SpecialToken]
    out_of_range = [VOCAB_SIZE, VOCAB_SIZE + 1, 10**12, -1]
    for _ in range(3000):
        token_ids = []
        for _ in range(rng.randint(0, 40)):
            draw = rng.random()
            if draw < 0.35:
                token_ids.append(rng.choice(structural))
            elif draw < 0.45:
                token_ids.append(rng.choice(specials))
            elif draw < 0.55:
                token_ids.extend(rng.choice(header_words))
            elif draw < 0.58:
                token_ids.append(rng.choice(out_of_range))
            else:
                token_ids.append(rng.randrange(NUM_MERGEABLE_TOKENS))
        deltas, result = _parse(token_ids, tokenizer, role=rng.choice([Role.ASSISTANT, None]))
        _assert_deltas_rebuild_messages(deltas, result)
