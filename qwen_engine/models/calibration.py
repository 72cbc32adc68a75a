"""Fixed texts for the w8a8 mode's smoothing (models/w8a8.py: calibrate), each its own pass: a few chat turns
mixing what the Qwen models are asked for — prose, code, JSON tool calls, Chinese, arithmetic, a thinking block —
in ChatML, so the special tokens' activations (some of a model's largest) are seen too; then a plain Python
module. Written for this project; ~640 tokens in all, a ~3 s float pass for the demo model at its first conversion.
Longer texts gained nothing measurable: the first 256 tokens of a version three times as long gave the same KL
(0.00182 against 0.00189 nats on compare.py's corpus).

Each pass starts a sequence, and a sequence's first token has very large activations in a few columns: they
must be among those seen (measured without them, the demo's mean KL was 2.5x worse)."""

from __future__ import annotations

import os

CALIBRATION_TEXT = """<|im_start|>system
You are a careful assistant. Answer briefly and say so when you are unsure.<|im_end|>
<|im_start|>user
Our warehouse ships on weekdays only. An order came on Friday at 18:40, after the 17:00 cut-off. When does it
leave, and when should it arrive if delivery takes two working days?<|im_end|>
<|im_start|>assistant
<think>
It missed Friday's cut-off, so it leaves on Monday; two working days later is Wednesday.
</think>
It leaves on Monday and should arrive on Wednesday.<|im_end|>
<|im_start|>user
What is the weather in Hangzhou tomorrow?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Hangzhou", "date": "tomorrow", "unit": "celsius"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
{"forecast": "light rain", "high": 14, "low": 9}
</tool_response><|im_end|>
<|im_start|>assistant
Light rain tomorrow, between 9 °C and 14 °C. Take an umbrella.<|im_end|>
<|im_start|>user
请用一句话解释什么是缓存。<|im_end|>
<|im_start|>assistant
缓存把常用的数据放在更快的存储里，再次使用时直接读取，所以程序更快。<|im_end|>
<|im_start|>user
A train covers 240 km in 3 h, then 150 km in 2.5 h. Average speed?<|im_end|>
<|im_start|>assistant
390 km in 5.5 h: about 70.9 km/h, not the mean of 80 and 60 km/h.<|im_end|>
"""

CODE_TEXT = '''"""An LRU cache and retries with backoff."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from typing import Any, Callable


class LRUCache:
    """At most `capacity` entries; reading an entry makes it the most recently used."""

    def __init__(self, capacity: int = 128) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._data:
            return default
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: str, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)


async def with_retries(call: Callable[[], Any], attempts: int = 5, base: float = 0.2) -> Any:
    for n in range(attempts):
        try:
            return await call()
        except (ConnectionError, TimeoutError) as error:
            if n == attempts - 1:
                raise RuntimeError(f"gave up after {attempts} attempts") from error
            await asyncio.sleep(base * 2**n + random.uniform(0, base))
'''

def calibration_ids(tokenizer) -> list[list[int]] | None:
    """The calibration texts as token ids, one sequence each (special tokens as their ids); None where
    QWEN_ENGINE_W8A8_SMOOTHING=0 asks for no smoothing."""
    if os.environ.get("QWEN_ENGINE_W8A8_SMOOTHING", "1") == "0":
        return None
    return [tokenizer.encode(CALIBRATION_TEXT), tokenizer.encode(CODE_TEXT)]
