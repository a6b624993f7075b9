"""nxc-serve on a build with a modules table (issue 29): the reply's module calls come back beside the text and its
grounding, in the JSON answer and in the stream's last chunk, equal to the runtime's."""
import base64
import io
import json

import httpx
from module_helpers import REPLY_TWO, box_text, say, scene
from serve_helpers import LiveServer


def test_nxc_serve_returns_the_calls(module_build, module_pipe):
    from nxc.serve.app import create_app
    s = scene()
    buf = io.BytesIO()
    s.image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Segment it."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 120}
    reply = REPLY_TWO.format(box=box_text(s.objects[0].box))
    with say(module_pipe, reply):
        want = module_pipe.chat(s.image, "Segment it.", max_new_tokens=120)
    app = create_app(module_build, pipeline=module_pipe, max_batch=0)      # one turn per thread: run_cached
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        with say(module_pipe, reply):
            msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        with say(module_pipe, reply):
            chunks = [line for line in c.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
                      if line.startswith("data: {")]
    assert msg["content"] == want.text and [g["box"] for g in msg["grounding"]] == [
        [round(float(v), 4) for v in want.detections[0].box]]
    assert [(x["module"], x["detection"], x["error"]) for x in msg["calls"]] == [
        ("B", 0, None), ("Q", None, want.calls[1].error)]
    last = json.loads(chunks[-1][len("data: "):]) if "usage" not in chunks[-1] else json.loads(chunks[-2][6:])
    assert last["choices"][0]["delta"]["calls"] == msg["calls"]
