"""Chat templates for vision-language checkpoints that ship none (released ones carry chat_template.json).

They print the released templates' text for plain turns: each image as <|vision_start|><|image_pad|><|vision_end|>,
each video with <|video_pad|>, "Picture n: " / "Video n: " before them when add_vision_id is set, text parts as
they are. Qwen2-VL and Qwen2.5-VL add a default system message; Qwen3-VL does not.
"""

from __future__ import annotations

_BODY = """\
{%- set counts = namespace(image=0, video=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
{%- set counts.image = counts.image + 1 -%}
{{- ('Picture ' ~ counts.image ~ ': ') if add_vision_id else '' -}}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif part['type'] == 'video' or 'video' in part -%}
{%- set counts.video = counts.video + 1 -%}
{{- ('Video ' ~ counts.video ~ ': ') if add_vision_id else '' -}}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}
{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

_DEFAULT_SYSTEM = """\
{%- if messages and messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
{%- endif -%}
"""

VL_TEMPLATES = {
    "qwen2_vl": _DEFAULT_SYSTEM + _BODY,
    "qwen2_5_vl": _DEFAULT_SYSTEM + _BODY,
    "qwen3_vl": _BODY,
}
