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


def test_nxc_serve_takes_a_video_and_returns_its_track(module_build, module_pipe, tmp_path):
    """A video_url part (a GIF here) is the conversation's clip: a track call's per-frame boxes come back in calls,
    equal to the runtime's on the same frames; a part that is not a video is a 400 in one line."""
    import numpy as np

    from nxc.runtime.video import load_video
    from nxc.serve.app import create_app
    from nxc.shapes.clips import make_clip, save_gif
    clip = make_clip(np.random.default_rng(4), frames=4, max_objects=1)
    save_gif(clip, tmp_path / "c.gif")
    url = "data:image/gif;base64," + base64.b64encode((tmp_path / "c.gif").read_bytes()).decode()
    reply = f"<module>E</module><instruction>it</instruction><region>{box_text(clip.boxes[0, 0])}</region>"
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Track it."},
                                                      {"type": "video_url", "video_url": {"url": url}}]}],
            "max_tokens": 80}
    with say(module_pipe, reply):
        want = module_pipe.chat(load_video(tmp_path / "c.gif"), "Track it.", max_new_tokens=80)
    app = create_app(module_build, pipeline=module_pipe, max_batch=0)
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        with say(module_pipe, reply):
            msg = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        bad = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]})
    call, = msg["calls"]
    assert call["track"] == [[round(float(v), 2) for v in d.box] for d in want.calls[0].track] and len(call["track"]) == 4
    assert bad.status_code == 400 and "video:" in bad.json()["error"]["message"]
