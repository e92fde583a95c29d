"""What the router needs to know about a request, computed once in the ingress and passed with the call.

The ingress renders the harmony prompt (about 1 ms for 2k tokens) and hashes its blocks, so the router in the
ingress process can read the hint from the pending request's kwargs and needs no tokenizer or round trip. The
replica receives the same hint: it records the prefix in its summary and stores a Responses result under the
response id chosen here, which lets the router send a `previous_response_id` follow-up to that replica.
"""

from __future__ import annotations

import dataclasses
import logging

from gptoss_serve.cluster.serve.chat import prepare_chat
from gptoss_serve.cluster.serve.completions import prepare_completion
from gptoss_serve.cluster.serve.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest
from gptoss_serve.cluster.serve.prefix_summary import prefix_block_hashes
from gptoss_serve.cluster.serve.responses import prepare_response
from gptoss_serve.cluster.serve.responses_items import new_id
from gptoss_serve.model.tokenizer import VOCAB_SIZE, Tokenizer

logger = logging.getLogger(__name__)

ROUTING_KWARG = "routing"  # the keyword the ingress passes the hint under, and the router reads
_UNBOUNDED_LEN = 1 << 30  # the replica checks the real context window; the hint must not refuse anything


@dataclasses.dataclass(frozen=True)
class RoutingHint:
    prefix_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks (prefix_summary.py)
    num_prompt_tokens: int = 0
    previous_response_id: str | None = None  # the conversation this request continues (Responses API)
    response_id: str | None = None  # the id its Responses result will be stored under


async def routing_hint(endpoint: str, request, tokenizer: Tokenizer) -> RoutingHint:
    """The request's hint; a request the replica will refuse (bad tools, empty prompt) gets an empty one."""
    try:
        if isinstance(request, ChatCompletionRequest):
            return _hint(prepare_chat(request, tokenizer, _UNBOUNDED_LEN).prompt.prompt_token_ids)
        if isinstance(request, CompletionRequest):
            prepared = prepare_completion(request, tokenizer, _UNBOUNDED_LEN, VOCAB_SIZE)
            return _hint(prepared.prompts[0])
        if isinstance(request, ResponsesRequest):
            response_id = new_id("resp")
            if request.previous_response_id is not None:  # its items are in the store: the replica renders them
                return RoutingHint(previous_response_id=request.previous_response_id, response_id=response_id)
            prepared = await prepare_response(request, tokenizer, _UNBOUNDED_LEN, store=None)
            return dataclasses.replace(_hint(prepared.prompt.prompt_token_ids), response_id=response_id)
    except Exception as error:  # the replica answers it with the proper 400
        logger.debug("%s: no routing hint: %r", endpoint, error)
        if isinstance(request, ResponsesRequest):
            return RoutingHint(response_id=new_id("resp"))
    return RoutingHint()


def _hint(prompt_token_ids: list[int]) -> RoutingHint:
    return RoutingHint(prefix_block_hashes(prompt_token_ids), len(prompt_token_ids))
