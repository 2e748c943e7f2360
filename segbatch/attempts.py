"""Which inputs stop their worker: the ledger that keeps one input from stalling a job.

An attempt at an input that starts and never finishes stopped its worker (killed for memory, a
crash in native code). Ray restarts the actor and runs the batch again, without end; this
ledger, kept outside the actors, counts such attempts per input so that ``SegmentActor`` can
run suspects alone and turn a proven culprit into an error row. Plain Python (no torch, no
Ray): the pipeline runs one instance as a Ray actor, whose process starts in a moment.
"""

from __future__ import annotations

from collections.abc import Sequence


class AttemptLedger:
    """Per run and input index, the attempts that started and never finished.

    Each entry is ``[unfinished, alone]``: all such attempts, and those in which the input ran by
    itself (the ones that prove it is the culprit). ``run`` keys one job's entries, so one ledger
    serves every job of a Ray session; ``forget`` drops a finished job's.
    """

    def __init__(self) -> None:
        self._unfinished: dict[str, dict[int, list[int]]] = {}

    def unfinished(self, run: str, indices: Sequence[int]) -> list[tuple[int, int]]:
        """``(attempts, attempts alone)`` started and not finished, per index."""
        entries = self._unfinished.get(run, {})
        return [(entries[i][0], entries[i][1]) if i in entries else (0, 0) for i in indices]

    def start(self, run: str, indices: Sequence[int]) -> None:
        entries = self._unfinished.setdefault(run, {})
        alone = int(len(indices) == 1)
        for i in indices:
            counts = entries.setdefault(i, [0, 0])
            counts[0] += 1
            counts[1] += alone

    def finish(self, run: str, indices: Sequence[int]) -> None:
        entries = self._unfinished.get(run, {})
        for i in indices:
            entries.pop(i, None)

    def forget(self, run: str) -> None:
        self._unfinished.pop(run, None)


def stopped_worker_message(attempts: int) -> str:
    return (
        f"this input stopped its worker {attempts} times (out of memory?) and is not tried "
        "again; make it smaller for the model (preprocess.resize, tiling), give the workers more "
        "memory, or raise inference.max_input_attempts"
    )
