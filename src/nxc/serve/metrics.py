"""Prometheus text exposition for nxc-serve: requests, tokens, detections, stage latencies. No client library.

    nxc_requests_total{route="/v1/chat/completions",status="200"} 12
    nxc_request_seconds_bucket{route="...",le="0.1"} 3        (histogram; also _sum, _count)
    nxc_stage_seconds_sum{stage="decode"} 0.81                (summary of the runtime's Timeline stages)
    nxc_time_to_first_token_seconds_sum / _count, nxc_tokens_total{kind="prompt"|"completion"}, nxc_detections_total,
    nxc_pictures_total, nxc_requests_in_flight
(a build that draws adds its stages, named as its graphs: projector, denoiser, latent_decoder)
"""
from __future__ import annotations

import threading
from collections import defaultdict

from nxc.runtime.timing import STAGES, Timeline

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, list[float]] = {}          # route -> [bucket counts..., sum, count]
        self.stage_sum: dict[str, float] = defaultdict(float)
        self.stage_count: dict[str, int] = defaultdict(int)
        self.ttft = [0.0, 0]
        self.tokens = {"prompt": 0, "completion": 0}
        self.detections = 0
        self.pictures = 0
        self.in_flight = 0
        self.queue_wait = [0.0, 0]
        self.cancelled_rows = 0

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[(route, status)] += 1
            h = self.latency.setdefault(route, [0.0] * (len(BUCKETS) + 2))
            for i, le in enumerate(BUCKETS):
                if seconds <= le:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.queue_wait[0] += seconds
            self.queue_wait[1] += 1

    def cancelled(self) -> None:
        with self._lock:
            self.cancelled_rows += 1

    def turn(self, prompt_tokens: int, completion_tokens: int, detections: int, timeline: Timeline,
             pictures: int = 0) -> None:
        per_stage: dict[str, float] = defaultdict(float)
        for ev in timeline.events:
            per_stage[ev.stage] += ev.seconds
        with self._lock:
            self.tokens["prompt"] += prompt_tokens
            self.tokens["completion"] += completion_tokens
            self.detections += detections
            self.pictures += pictures
            for stage, s in per_stage.items():
                self.stage_sum[stage] += s
                self.stage_count[stage] += 1
            if timeline.first_token is not None:
                self.ttft[0] += timeline.first_token - timeline.start
                self.ttft[1] += 1

    def render(self, batch: dict | None = None) -> str:
        """`batch`: the scheduler's stats (nxc.runtime.batch.Batcher.stats), when it runs."""
        with self._lock:
            lines = ["# HELP nxc_requests_total HTTP requests answered, by route and status.",
                     "# TYPE nxc_requests_total counter"]
            lines += [f'nxc_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP nxc_request_seconds Wall time of a request (a stream: until its last event).",
                      "# TYPE nxc_request_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                for i, le in enumerate(BUCKETS):
                    lines.append(f'nxc_request_seconds_bucket{{route="{route}",le="{le}"}} {int(h[i])}')
                lines += [f'nxc_request_seconds_bucket{{route="{route}",le="+Inf"}} {int(h[-1])}',
                          f'nxc_request_seconds_sum{{route="{route}"}} {h[-2]:.6f}',
                          f'nxc_request_seconds_count{{route="{route}"}} {int(h[-1])}']
            lines += ["# HELP nxc_stage_seconds Time per turn spent in each runtime stage.",
                      "# TYPE nxc_stage_seconds summary"]
            for stage in (*STAGES, *sorted(set(self.stage_count) - set(STAGES))):
                if stage in self.stage_count:
                    lines += [f'nxc_stage_seconds_sum{{stage="{stage}"}} {self.stage_sum[stage]:.6f}',
                              f'nxc_stage_seconds_count{{stage="{stage}"}} {self.stage_count[stage]}']
            lines += ["# HELP nxc_time_to_first_token_seconds From the start of a turn to its first token.",
                      "# TYPE nxc_time_to_first_token_seconds summary",
                      f"nxc_time_to_first_token_seconds_sum {self.ttft[0]:.6f}",
                      f"nxc_time_to_first_token_seconds_count {self.ttft[1]}",
                      "# HELP nxc_tokens_total Tokens prefilled (prompt) and generated (completion).",
                      "# TYPE nxc_tokens_total counter"]
            lines += [f'nxc_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
            lines += ["# HELP nxc_detections_total Boxes (and masks) returned.", "# TYPE nxc_detections_total counter",
                      f"nxc_detections_total {self.detections}",
                      "# HELP nxc_pictures_total Pictures returned (a build that draws).",
                      "# TYPE nxc_pictures_total counter", f"nxc_pictures_total {self.pictures}",
                      "# HELP nxc_requests_in_flight Requests being answered now.", "# TYPE nxc_requests_in_flight gauge",
                      f"nxc_requests_in_flight {self.in_flight}",
                      "# HELP nxc_cancelled_total Requests whose client went away before the answer ended.",
                      "# TYPE nxc_cancelled_total counter", f"nxc_cancelled_total {self.cancelled_rows}"]
            if batch is not None:
                lines += ["# HELP nxc_batch_rows Rows (turns) in the decode batch now.", "# TYPE nxc_batch_rows gauge",
                          f"nxc_batch_rows {batch['rows']}",
                          "# HELP nxc_batch_max_rows The scheduler's --max-batch.", "# TYPE nxc_batch_max_rows gauge",
                          f"nxc_batch_max_rows {batch['max_batch']}",
                          "# HELP nxc_queue_length Turns waiting for a row.", "# TYPE nxc_queue_length gauge",
                          f"nxc_queue_length {batch['waiting']}",
                          "# HELP nxc_batch_steps_total Batched llm steps run.", "# TYPE nxc_batch_steps_total counter",
                          f"nxc_batch_steps_total {batch['steps']}",
                          "# HELP nxc_batch_rows_per_step Mean rows per step over the last 256 steps.",
                          "# TYPE nxc_batch_rows_per_step gauge",
                          f"nxc_batch_rows_per_step {batch['mean_rows_per_step']:.3f}",
                          "# HELP nxc_queue_wait_seconds From a turn's arrival to its first prompt chunk.",
                          "# TYPE nxc_queue_wait_seconds summary",
                          f"nxc_queue_wait_seconds_sum {self.queue_wait[0]:.6f}",
                          f"nxc_queue_wait_seconds_count {self.queue_wait[1]}"]
        return "\n".join(lines) + "\n"
