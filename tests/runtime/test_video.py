"""Video input (issue 29): a clip's frames sampled evenly, read from a GIF by Pillow or an MP4 by PyAV; a video
conversation's image rows are its frames' rows averaged (VITRON's video input); a `track` module call segments the
region's object in every frame, the box carried from frame to frame; nxc-run --video."""
import numpy as np
import pytest
from module_helpers import box_text, say

from nxc.runtime.images import ImageError
from nxc.runtime.video import Video, even_indices, load_video
from nxc.shapes.clips import make_clip, save_gif


@pytest.fixture(scope="module")
def clip():
    return make_clip(np.random.default_rng(4), frames=6, max_objects=1)


def test_frames_are_sampled_evenly():
    assert even_indices(5, 8) == [0, 1, 2, 3, 4]
    assert even_indices(16, 4) == [2, 6, 10, 14]
    assert even_indices(9, 3) == [1, 4, 7]


def test_a_gif_loads_as_its_frames(clip, tmp_path):
    save_gif(clip, tmp_path / "c.gif", ms_per_frame=100)
    v = load_video(tmp_path / "c.gif")
    assert len(v.frames) == 6 and v.size == (96, 96) and v.fps == pytest.approx(10.0)
    for got, want in zip(v.frames, clip.frames):                  # GIF's palette: within a few levels
        assert np.abs(np.asarray(got, int) - np.asarray(want, int)).mean() < 4
    assert len(load_video(tmp_path / "c.gif", max_frames=3).frames) == 3


def test_an_mp4_loads_through_pyav(clip, tmp_path):
    av = pytest.importorskip("av", reason="MP4 input needs the video extra (PyAV)")
    path = tmp_path / "c.mp4"
    with av.open(str(path), "w") as box:
        stream = box.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for f in clip.frames:
            box.mux(stream.encode(av.VideoFrame.from_image(f)))
        box.mux(stream.encode())
    v = load_video(path, max_frames=8)
    assert len(v.frames) == 6 and v.size == (96, 96) and v.fps == pytest.approx(8.0)
    assert np.abs(np.asarray(v.frames[2], float) - np.asarray(clip.frames[2], float)).mean() < 12   # lossy codec


@pytest.mark.parametrize("name, content, message", [
    ("missing.gif", None, "no such file"),
    ("notes.txt", b"hello", "not a video nxc reads"),
    ("broken.gif", b"GIF89a-not-really", "not a video Pillow can read"),
])
def test_bad_videos_are_refused_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as e:
        load_video(path)
    assert "\n" not in str(e.value)


def test_frames_of_two_sizes_are_refused():
    from PIL import Image
    with pytest.raises(ImageError, match="share one size"):
        Video((Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))))


def test_a_video_conversation_averages_its_frames_rows(embedded_pipe, clip):
    video = Video(clip.frames)
    rows = [embedded_pipe.conversation(f).features() for f in clip.frames]
    got = embedded_pipe.conversation(video).features()
    assert got.shape == rows[0].shape and np.allclose(got, np.mean(rows, axis=0), atol=1e-6)
    assert not np.allclose(rows[0], rows[-1], atol=1e-3)              # the frames differ: the mean is not one of them
    r = embedded_pipe.chat(video, "Where is the object?", max_new_tokens=24)
    assert r.finish_reason in ("stop", "length")


def test_a_track_call_follows_the_object_through_the_frames(module_pipe, clip):
    from nxc.runtime.events import Done
    from nxc.runtime.modules import Track
    from nxc.runtime.modules.track import mask_box
    video = Video(clip.frames)
    reply = f"<module>E</module><instruction>video segmentation: it</instruction><region>{box_text(clip.boxes[0, 0])}</region>"
    with say(module_pipe, reply):
        events = list(module_pipe.stream(video, "Track it.", max_new_tokens=80))
    result = events[-1].result
    assert isinstance(events[-1], Done)
    call, = result.calls
    assert (call.backend, call.error) == ("track", None) and len(call.track) == 6
    tracks = [e for e in events if isinstance(e, Track)]
    assert len(tracks) == 1 and tracks[0].detections == call.track and result.detections == [call.track[0]]
    assert np.array_equal(call.track[0].box, np.asarray(eval(box_text(clip.boxes[0, 0])), np.float32))
    for before, after in zip(call.track, call.track[1:]):             # each frame prompted by the last frame's mask
        carried = mask_box(before.mask)
        assert np.array_equal(after.box, before.box if carried is None else carried)
    with say(module_pipe, reply):
        one = module_pipe.chat(clip.frames[0], "Track it.", max_new_tokens=80)
    assert len(one.calls[0].track) == 1 and np.array_equal(one.calls[0].track[0].mask, call.track[0].mask)


def test_nxc_run_takes_a_video(module_build, clip, tmp_path, capsys):
    from nxc.runtime import cli
    save_gif(clip, tmp_path / "c.gif")
    assert cli.main([str(module_build), "--video", str(tmp_path / "c.gif"), "--prompt", "Hi.",
                     "--max-new-tokens", "4"]) == 0
    assert cli.main([str(module_build), "--video", str(tmp_path / "c.gif"), "--image", str(tmp_path / "c.gif"),
                     "--prompt", "Hi."]) == 2
    assert "--image and --video: give one of them" in capsys.readouterr().err
