"""The engine's thread governor (chatsmith/infer/threads.py): it follows measured step times to one
thread when a loaded machine makes that faster and back when it is quiet again, probes rarely when
nothing changes, and switching never changes an answer (the native int8/int4 steps give the same
bits on any thread count)."""

from __future__ import annotations

import torch

from chatsmith.infer.threads import ThreadGovernor


def drive(gov: ThreadGovernor, seconds_on: dict[int, float], steps: int, rows: int = 1) -> list[int]:
    """Run `steps` decode steps whose time depends only on the thread count; the counts used."""
    used = []
    for _ in range(steps):
        n = gov.threads()
        used.append(n)
        gov.record(seconds_on[n], rows)
    return used


def test_it_moves_to_one_thread_under_load_and_back_when_the_load_is_gone():
    gov = ThreadGovernor(2)
    used = drive(gov, {2: 0.100, 1: 0.012}, 40)          # loaded: 2 threads wait on each other
    assert gov.current == 1 and gov.switches == 1
    assert used[-20:] == [1] * 20
    assert used.count(2) <= 2 * gov.window + 2 + gov.window   # the first probe, then a cut-short one
    used = drive(gov, {2: 0.006, 1: 0.010}, 2 * gov.max_interval)   # quiet again
    assert gov.current == 2 and gov.switches == 2
    assert used[-50:].count(1) <= gov.window   # back on 2 threads, at most a probe's worth of 1


def test_on_a_steady_machine_it_probes_less_and_less():
    gov = ThreadGovernor(2)
    used = drive(gov, {2: 0.006, 1: 0.009}, 8 * gov.max_interval)
    assert gov.switches == 0 and gov.current == 2
    assert gov.interval == gov.max_interval
    # Probes on 1 thread: a handful while the interval doubles, then one per max_interval steps.
    assert used.count(1) / len(used) < 0.01
    assert gov.probes <= 5 + 8


def test_a_probe_is_abandoned_when_the_batch_changes_size():
    gov = ThreadGovernor(2)
    for _ in range(2 * gov.window):
        gov.record(0.01, 1)
    assert gov.phase == "other"
    gov.record(0.001, 1)          # would argue for 1 thread...
    gov.record(0.001, 3)          # ...but the batch grew: the probe ends without a decision
    assert gov.phase == "run" and gov.current == 2 and gov.switches == 0


def test_one_thread_has_nothing_to_choose():
    gov = ThreadGovernor(1)
    drive(gov, {1: 0.01}, 100)
    assert not gov.active and gov.probes == 0 and gov.threads() == 1


def test_switching_threads_mid_answer_changes_no_token_or_log_prob():
    """int4 and int8 engines whose steps alternate between 1 and 2 threads give the answers and
    log-probs of fixed ones, bit for bit, and leave the caller's thread count as it was."""
    from chatsmith.infer.engine import Engine
    from chatsmith.infer.sampling import SamplingParams
    from chatsmith.models import load_model

    model, tok = load_model("tiny-random-llama")
    prompts = [[5, 17, 99, 3, 42], [7, 7, 8], [11, 250, 31, 64, 2, 9, 13]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for precision in ("int8", "int4"):
            fixed = Engine(model, tok, precision=precision, max_batch_size=4, adaptive_threads=False)
            assert fixed.governor is None
            ref = [(c.token_ids, c.logprobs) for c in fixed.generate(prompts, params)]
            moving = Engine(model, tok, precision=precision, max_batch_size=4)
            assert moving.governor is not None and moving.governor.full == 2
            seen: list[int] = []

            def alternate(seen: list[int] = seen) -> int:   # 1, 2, 1, 2, ... step by step
                seen.append(1 + len(seen) % 2)
                return seen[-1]

            moving.governor.threads = alternate
            out = [(c.token_ids, c.logprobs) for c in moving.generate(prompts, params)]
            assert out == ref, precision
            assert set(seen) == {1, 2}
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_threads_flag_below_one_is_a_clear_error(capsys):
    from chatsmith.cli import main

    assert main(["chat", "tiny-random-llama", "--prompt", "hi", "--threads", "0"]) == 2
    assert "--threads must be 1 or more, got 0" in capsys.readouterr().err
