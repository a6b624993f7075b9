"""nxc-serve: an OpenAI-style HTTP API and a web page over the torch-free runtime (one shared Pipeline).

    nxc-serve build/fp32 --port 8000                  # or: nxc.serve.app.create_app("build/fp32")

Routes
  POST /v1/chat/completions   OpenAI chat format. The first user message carries the image as a content part
                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} (a local
                              path only with --allow-local-images), or a clip instead: {"type": "video_url",
                              "video_url": {"url": "data:image/gif;base64,..."}} (GIF / animated PNG / WebP; MP4
                              with nxc[video]), frames averaged; a track call's per-frame boxes come back in
                              calls[k].track. Region input: "boxes": [[x1,y1,x2,y2], ...]
                              (pixels) on a user message, or at the top level for the last user message; the text
                              refers to them as [0], [1], ... Earlier assistant messages are sent back as they came
                              (with their "grounding") so that their [k] keep their boxes. "stream": true -> SSE.
                              Sampling: max_tokens (or max_completion_tokens), temperature, top_p, top_k, seed.
                              A build that draws (signal tokens + generator): image_steps, image_guidance,
                              image_seed, image_scheduler ("ddim" | "euler" | "lcm"); other builds refuse them (400).
  POST /v1/ground             {"image": <base64 or data URI>, "prompt": str, "boxes": [...]?, "max_tokens": int?}
                              -> {"text", "finish_reason", "grounding", "usage"}: one turn, no OpenAI envelope
                              (and "images", image_url parts with their nxc fields, when the reply drew).
  GET  /v1/models             the one served model ({"data": [{"id": <model name>, ...}]})
  GET  /healthz               {"status": "ok", "model": ...}
  GET  /metrics               Prometheus text: requests, tokens, stage latencies
  GET  /                      the web page (static/index.html)

A detection in "grounding" (index k is the [k] in the reply text):
  {"index": k, "box": [x1,y1,x2,y2] pixels of the image, "box_norm": [..] in 0..1 (the padded square, as the model),
   "phrase": str, "score": float | null, "mask": {"size": [H, W], "counts": str} | null}   (COCO RLE, nxc.serve.rle)

A reply that drew pictures: message.content becomes content parts, [{"type": "text", "text": ...}, then one
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} per picture], and message.images the k-th
picture's {"index", "width", "height", "seed", "steps", "guidance", "scheduler"} (a reply without pictures keeps its
string content). Earlier assistant messages may be sent back with their image_url parts (the pictures are not fed).

Streaming: each SSE event is `data: {chat.completion.chunk}`; choices[0].delta has "content" (the reply text the
token adds, with `<at> <boxes>` already rendered as [k]) and, in the chunk where a trigger fires, "grounding" with
that detection (box, no mask yet); once the text is done, one chunk per picture with delta "images": [its
image_url part, its nxc fields beside "type"]. The last chunk has finish_reason and the complete "grounding" (masks,
scores), then `data: [DONE]`.

Errors: 4xx JSON {"error": {"message": <the runtime's one-line message>, "type": "invalid_request_error", "code"}}.
"""
