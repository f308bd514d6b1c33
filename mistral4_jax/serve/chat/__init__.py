"""Chat format and tokenizer of Mistral Small 4, over mistral-common.

* `tokenizer.py`: `Tokenizer` (text <-> ids, special ids, reasoning split, chat entry points).
* `format.py`: message checks, mistral-common request building and encoding, the reasoning split.
* `tools.py`: function calling: `tools` / `tool_choice` checks, `parse_answer` (reasoning, content, calls).
* `grammar.py`: the grammar of a constrained request (tool_choice required / named / none, JSON response formats).
* `images.py`: messages with image parts (our image preprocessing inside mistral-common's encoding).
* `stream.py`: `IncrementalDecoder` for streaming text.
* `session.py`: `ChatResult`, and `ChatSession` (multi-turn chat that keeps its KV cache between turns).
"""

from .format import BEGIN_THINK, END_THINK, REASONING_EFFORTS, has_image_parts, split_reasoning
from .session import ChatResult, ChatSession
from .stream import IncrementalDecoder
from .tokenizer import Tokenizer
from .tools import Answer, parse_answer

__all__ = ["Answer", "BEGIN_THINK", "ChatResult", "ChatSession", "END_THINK", "IncrementalDecoder", "REASONING_EFFORTS", "Tokenizer",
           "has_image_parts", "parse_answer", "split_reasoning"]
