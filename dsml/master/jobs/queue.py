"""The queue of tasks ready to run, and how a worker's free room is filled from it.

Order: job priority (higher first), then submit order, then task index.  A worker asks
with its free room (CPUs, memory, GPUs: a :class:`~.model.Room`) and gets tasks whose
needs all fit, never more than it has free (no prefetch hoarding, peer-systems §4.10).
A task too wide for the room left is skipped,
not waited for: smaller tasks behind it may fill the worker (so a wide task can wait
behind a steady stream of narrow ones of the same or higher priority: no slot
reservation yet).  Locality: among tasks of the *same* priority, one that is data-local
on the worker (:func:`data_local`: it holds most of the task's input bytes) goes first,
but only within the first :data:`LOCALITY_WINDOW` queued tasks, so a remote task is
never passed over forever.

The queue is two parts: ``front``, a sorted list of (at most LOCALITY_WINDOW) entries
that are all smaller than every entry of ``heap``, and the heap.  The heap holds only
(-priority, job seq, task index): three ints, a tuple the garbage collector stops
walking (a 100,000-task job's heap entries once held each its task record and cost a
full collection tens of milliseconds of the reactor's turn); the task is found from its
live job (``jobs``, the manager's) when the entry reaches the front.  :meth:`TaskQueue.take`
only looks at the front, so finding the first task that fits, or the first local one,
never pops and pushes back; the heap refills the front one pop per task given.  Each
task given thus costs one heap pop and a scan of at most the window (no full scans).

Entries of tasks that left the queue other than by being given (cancelled) stay behind:
they are dropped when met, or in bulk by :meth:`TaskQueue.compact` once they outnumber
the queued ones.  The count of queued tasks is the manager's (it changes with task
states); the queue holds entries and reads each task's state to know a dead one.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Final

from .model import QueuePlace, Room
from .records import JobRecord, TaskRecord
from .states import QUEUED

__all__ = ["LOCALITY_WINDOW", "MAX_JOBS_COUNTED", "TaskQueue", "data_local", "queue_places"]

#: Locality may reorder only within this many queued tasks at the head of the queue.
LOCALITY_WINDOW: Final = 64
#: :func:`queue_places` counts the queued tasks ahead of a job's own only while at most
#: this many jobs are live (the count walks them all).
MAX_JOBS_COUNTED: Final = 1000

#: A front entry: (-priority, job seq, task index, task).  The first three are unique.
Entry = tuple[int, int, int, TaskRecord]
#: A heap entry: (-priority, job seq, task index).
Key = tuple[int, int, int]


def data_local(inputs: Iterable[tuple[str, str]], holds: Callable[[str], bool],
               size: Callable[[str], int] | None = None) -> bool:
    """Whether a task with ``inputs`` (key, path) is data-local on a worker: the worker
    holds (``holds(key)``) more than half of the inputs' bytes (``size(key)``).  A map
    over a dataset's chunk is local where the chunk is, whatever small inputs come with
    it (the function's pickle, stored on other workers: with "every input" as the rule
    a map of four workers' chunks ran local on the two holding the pickle).  Without
    ``size``, or when every input is empty: the worker holds every input.  False for a
    task without inputs."""
    total = held = 0
    every = True
    seen = False
    for key, _ in inputs:
        seen = True
        n = size(key) if size is not None else 0
        total += n
        if holds(key):
            held += n
        else:
            every = False
            if size is None:
                return False
    if not seen:
        return False
    return held * 2 > total if total else every


class TaskQueue:
    """Queued tasks in priority order, with a sorted front for locality (see above)."""

    def __init__(self, jobs: Mapping[int, JobRecord]) -> None:
        #: The live jobs by seq (the manager's own dict): where a heap entry's task is.
        self.jobs = jobs
        self.heap: list[Key] = []
        self.front: list[Entry] = []
        #: Entries of tasks that left the queue other than by being given.
        self.dead = 0

    def __len__(self) -> int:
        """Entries held, dead ones included."""
        return len(self.heap) + len(self.front)

    def load(self, tasks: Iterable[TaskRecord]) -> None:
        """Put the queued tasks of a state file just opened in the queue."""
        heap = self.heap
        for task in tasks:
            heap.append((-task.job.priority, task.job.seq, task.index))
        heapq.heapify(heap)

    def push(self, task: TaskRecord) -> None:
        """Put a queued task in the queue at its place."""
        key = (-task.job.priority, task.job.seq, task.index)
        front = self.front
        if front and key < front[-1][:3]:
            bisect.insort(front, (*key, task))
            if len(front) > LOCALITY_WINDOW:
                heapq.heappush(self.heap, front.pop()[:3])
        else:
            heapq.heappush(self.heap, key)

    def push_all(self, job: JobRecord, tasks: Iterable[TaskRecord]) -> None:
        """Put many queued tasks of a job in the queue (the front goes back to the heap)."""
        heap = self.heap
        for entry in self.front:
            heapq.heappush(heap, entry[:3])
        self.front.clear()
        key = -job.priority
        for task in tasks:
            heapq.heappush(heap, (key, job.seq, task.index))

    def compact(self, queued: int) -> None:
        """Drop the dead entries once they outnumber the ``queued`` tasks."""
        if self.dead > 1024 and self.dead > queued:
            live = [k for k in self.heap if self._queued(k) is not None]
            live += [e[:3] for e in self.front if e[3].state == QUEUED]
            heapq.heapify(live)
            self.heap = live
            self.front.clear()
            self.dead = 0

    def _queued(self, key: Key) -> TaskRecord | None:
        """The task of a heap entry, if it is still queued (else the entry is dead)."""
        job = self.jobs.get(key[1])
        if job is None or not 0 <= key[2] < len(job.tasks):
            return None
        task = job.tasks[key[2]]
        return task if task.index == key[2] and task.state == QUEUED else None

    def _fill_front(self) -> None:
        front, heap = self.front, self.heap
        while len(front) < LOCALITY_WINDOW and heap:
            key = heapq.heappop(heap)
            task = self._queued(key)
            if task is not None:
                front.append((*key, task))

    def take(
        self,
        free: Room,
        holds: Callable[[str], bool],
        local: bool,
        local_only: bool,
        avoid: str = "",
        room: Room | None = None,
        wait_local: Callable[[TaskRecord], bool] | None = None,
        size: Callable[[str], int] | None = None,
    ) -> list[TaskRecord]:
        """Remove and return queued tasks that fit in the ``free`` room, in the order given.

        With ``local``, a task data-local on the worker (:func:`data_local` with
        ``holds(key)`` and ``size(key)``) goes
        first among those of its priority in the front; with ``local_only`` only such
        tasks are taken, never one of a lower priority than the first task that fits.
        A retried task whose last attempt ran on worker ``avoid`` is passed over when it
        fits in ``room``, the most another worker could take (retries of a task on a
        broken worker kept landing on it, the first one free).  ``wait_local(task)``: a
        task this worker does not hold the inputs of, to leave a while for one that does
        (delay scheduling; the caller decides for how long).
        """

        def shunned(task: TaskRecord) -> bool:
            return (room is not None and bool(task.attempts)
                    and task.attempts[-1].worker == avoid and room.holds(task.spec.room))

        cache: dict[str, bool] = {}
        memo: dict[TaskRecord, bool] = {}

        def held(key: str) -> bool:
            known = cache.get(key)
            if known is None:
                known = cache[key] = bool(holds(key))
            return known

        def is_local(task: TaskRecord) -> bool:
            known = memo.get(task)
            if known is None:
                known = memo[task] = data_local(task.spec.inputs, held, size)
            return known

        out: list[TaskRecord] = []
        front = self.front
        cpus, mem, gpus = free.cpus, free.mem, free.gpus
        while cpus > 0:
            self._fill_front()
            first = None
            for i, entry in enumerate(front):
                spec = entry[3].spec
                if entry[3].state != QUEUED:
                    first = -1  # a cancelled task's entry: drop them all, look again
                    break
                if (spec.slots <= cpus and spec.mem <= mem and spec.gpus <= gpus
                        and not shunned(entry[3])
                        and not (wait_local is not None and spec.inputs
                                 and not is_local(entry[3]) and wait_local(entry[3]))):
                    first = i
                    break
            if first is None:
                break  # nothing in the window fits
            if first == -1:
                front[:] = [e for e in front if e[3].state == QUEUED]
                continue
            pick: int | None = first
            if local:
                top = front[first][0]
                pick = None if local_only else first
                for i in range(first, len(front)):
                    entry = front[i]
                    if entry[0] != top:
                        break  # locality never beats priority
                    task = entry[3]
                    spec = task.spec
                    if (task.state == QUEUED and spec.slots <= cpus and spec.mem <= mem
                            and spec.gpus <= gpus and is_local(task) and not shunned(task)):
                        pick = i
                        break
            if pick is None:
                break  # local_only: nothing local fits
            task = front.pop(pick)[3]
            spec = task.spec
            cpus, mem, gpus = cpus - spec.slots, mem - spec.mem, gpus - spec.gpus
            out.append(task)
        return out


def queue_places(
    job: JobRecord, live: Collection[JobRecord], first: int = 0, limit: int | None = None
) -> dict[int, QueuePlace]:
    """Where each queued task of ``job`` stands, by task index, among the ``live`` jobs;
    only its tasks ``first`` .. ``first + limit`` (one page of a status) when asked.

    ``ahead`` counts the queued tasks before the task in the queue order (priority,
    submit order, index): its own job's, counted from the job's queued blocks
    (:meth:`~.records.JobRecord.queued_before`) and over the page, and other jobs',
    counted over the live jobs, only while there are at most :data:`MAX_JOBS_COUNTED`
    (else it is None).  So it costs O(the page + tasks / BLOCK + BLOCK) plus at most
    that many jobs, never a walk of the queue.  (The order is the queue's, not a
    promise: a wider task ahead may be passed, locality may reorder a window.)
    """
    before: int | None = None
    if len(live) <= MAX_JOBS_COUNTED:
        key = (-job.priority, job.seq)
        before = sum(j.counts[QUEUED] for j in live if (-j.priority, j.seq) < key)
    places: dict[int, QueuePlace] = {}
    end = len(job.tasks) if limit is None else min(len(job.tasks), first + limit)
    mine = job.queued_before(first) if first else 0
    for task in job.tasks[first:end]:
        if task.state == QUEUED:
            spec = task.spec
            places[task.index] = QueuePlace(
                spec.slots, None if before is None else before + mine, spec.mem, spec.gpus
            )
            mine += 1
    return places
