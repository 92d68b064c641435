"""Drive an Engine directly (no gRPC): submit requests, wait for each to end, collect its events."""

from __future__ import annotations

import threading


def run_requests(engine, requests, timeout: float = 300) -> dict[str, dict]:
    """Submits every request (then starts the engine if it is not running) and waits until each one
    finishes or fails. Per request id: "events" (the events themselves), "tokens", "logprobs", "tops"
    (top_logprobs), "text" (concatenated over the events), "finish" and "error"."""
    out, lock, done = {}, threading.Lock(), threading.Event()

    def on_event(ev):
        with lock:
            o = out.setdefault(ev.request_id, {"events": [], "tokens": [], "logprobs": [], "tops": [],
                                               "text": "", "finish": None, "error": None})
            o["events"].append(ev)
            o["tokens"] += ev.token_ids
            o["logprobs"] += ev.logprobs
            o["tops"] += ev.top_logprobs
            o["text"] += ev.text
            if ev.finish_reason or ev.error:
                o["finish"], o["error"] = ev.finish_reason, ev.error
                if sum(1 for v in out.values() if v["finish"] or v["error"]) == len(requests):
                    done.set()

    for r in requests:
        engine.submit(r, on_event)
    engine.start()
    assert done.wait(timeout), "requests did not finish"
    return out
