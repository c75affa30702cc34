"""The other processes of a run: one that dies ends the run within `dead_rank_timeout` seconds with one line naming
it, and the main process may prepare the data for longer than the process-group timeout.

A dead rank. When a process dies (the OOM killer, a lost node), the others wait in their next collective until the
process-group timeout (`ddp_timeout`, 30 minutes by default; NCCL then aborts with a stack dump that names no rank).
torchrun's agent stops the other processes of its own machine when one of them dies, but has no word for the other
machines; gloo notices a closed connection at once, but not a frozen or unplugged machine. A smaller `ddp_timeout`
would still name nobody, and would also cut short every wait that is legitimately long (the others sit in a barrier
while rank 0 writes a large checkpoint). So every process beats a heartbeat into the store torchrun already shares
with the processes (MASTER_ADDR:MASTER_PORT), from a thread, which also watches:

- rank 0 watches every process, the others watch rank 0 (the store's load grows with the processes, not their square);
- a process of the same machine (same kernel and pid namespace) is dead as soon as its pid is gone;
- a process whose heartbeat has not moved for `dead_rank_timeout` less two beats is dead (a frozen machine, a lost
  network): the heartbeats come every `dead_rank_timeout` / 12 seconds (at most 5), and a death is seen up to one
  beat late, so the run stops within `dead_rank_timeout` of it;
- a process that ended through Python (its own error, Ctrl-C, SIGTERM) says so first: the others take it for dead
  only if they are still running that long after, or at once if a collective failed meanwhile;
- the store itself gone (no answer within `dead_rank_timeout`) means the launcher that held it, on rank 0's machine,
  is gone.

The first process to see a death writes it into the store; every process reads it there, and one per machine prints
one line naming the dead rank and the newest complete checkpoint to resume from. Each then exits with code 4, from
the watching thread (`os._exit`), as its main thread may be blocked in a collective that would never return. When gloo
raises in the main thread first ("Connection closed by peer"), the traceback waits until the watcher has either found
the dead process or seen every heartbeat move (then nobody died, and the error is shown as it is). The watch ends once
the run has left its process group: no collective can wait on a dead process after that.

Long data preparation. `TrainingArguments.main_process_first` makes the other processes wait for the main one in a
barrier, which has the process-group timeout: a tokenization longer than `ddp_timeout` killed them ("rank 0
tokenizes, the rest hit the watchdog"). `main_process_first` here has them poll a key in the same store, which has no
timeout, and then tokenize themselves: that reads the datasets cache the main process wrote.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from sft_hf.errors import PEER_DIED_EXIT_CODE, Preempted, UserError
from sft_hf.run.checkpoints import resume_hint

logger = logging.getLogger(__name__)

# How a collective fails when a peer is gone (gloo: "Connection closed by peer ... typically caused by a remote worker
# crashing"): such an error in the main thread waits for the watcher's verdict before it is printed.
COMMUNICATION_ERROR = re.compile(r"gloo|nccl|connection (closed|reset) by peer|broken pipe|remote worker",
                                 re.IGNORECASE)


def run_store(timeout: float = 300.0):
    """A client of the store the launcher shares with the processes (torchrun's; MASTER_ADDR:MASTER_PORT), keys under
    sft-hf's own prefix; None when the processes were started without one."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    store = dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    # torchrun keeps its store across restarts of the processes (max_restarts): a restart starts afresh
    return dist.PrefixStore(f"sft_hf/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def machine_id() -> str:
    """The same on two processes whose pids name the same processes: host, boot, pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: pids are never compared
        return f"{socket.gethostname()}/{os.getpid()}"
    return f"{socket.gethostname()}/{boot}/{namespace}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead, only not yet reaped by its launcher
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_communication_error(error: BaseException) -> bool:
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError)
                                                 and bool(COMMUNICATION_ERROR.search(str(error))))


class PeerWatch:
    """This process's heartbeat and its watch over the others (see the module's docstring). `on_verdict(line)` ends
    the process (by default: exit code 4); the watch lasts while `running()` (by default: while the process group
    exists)."""

    def __init__(self, store, rank: int, world_size: int, local_rank: int, local_world_size: int, timeout: float,
                 output_dir: str, on_verdict=None, running=None):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.local_rank, self.output_dir = local_rank, output_dir
        # a death is seen up to one check late, and acted on at the next: the run stops within `timeout` of it
        self.interval = min(5.0, timeout / 12)
        self.silence = timeout - 2 * self.interval
        self.machine = machine_id()
        # rank 0 watches everyone's heartbeat, the others rank 0's; the processes of this machine by their pids
        self.beats_watched = list(range(1, world_size)) if rank == 0 else [0]
        first = rank - local_rank  # torchrun numbers the processes of a machine consecutively
        self.neighbours = [r for r in range(first, min(first + local_world_size, world_size)) if r != rank]
        self.peers: dict[int, dict] = {}  # rank → what it published: host, machine, pid, local_rank
        self.on_verdict = on_verdict or (lambda line: os._exit(PEER_DIED_EXIT_CODE))
        self.running = running or dist.is_initialized
        self.others = [r for r in range(world_size) if r != rank]
        self.failed_collective = threading.Event()  # the main thread's collective failed: did a process die?
        self.all_alive = threading.Event()  # no: every process's heartbeat moved since then
        self._beats_at_failure: dict[int, int] = {}
        self._stop = threading.Event()
        self._store_gone = False
        self.thread = threading.Thread(target=self._run, name="sft-hf peer watch", daemon=True)
        self._previous_hook = None

    def start(self) -> PeerWatch:
        me = {"host": socket.gethostname(), "machine": self.machine, "pid": os.getpid(), "local_rank": self.local_rank}
        self.store.set(f"process/{self.rank}", json.dumps(me))
        self.store.add(f"beat/{self.rank}", 1)
        self.thread.start()
        atexit.register(self.leave)
        self._previous_hook, sys.excepthook = sys.excepthook, self._excepthook
        return self

    def leave(self) -> None:
        """This process ends through Python (its own error, Ctrl-C, SIGTERM): not a death for the others to report."""
        if self._stop.is_set() or self._store_gone:
            return
        self._stop.set()
        try:
            self.store.set(f"left/{self.rank}", "1")
        except RuntimeError:  # the store is gone already (torch's DistError): the run is over
            pass

    # -- the watching thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        changed: dict[int, tuple[int, float]] = {}  # rank → (heartbeat count, when it last changed)
        left: dict[int, float] = {}  # rank → when its "left" mark was first seen
        last_tick = time.monotonic()
        while not self._stop.wait(self.interval):
            if not self.running():  # the run left its process group: no collective can wait on a peer now
                return
            now = time.monotonic()
            if now - last_tick > max(3 * self.interval, 5.0):  # this process was frozen too: start the clocks again
                changed.clear()
            last_tick = now
            try:
                verdict = self._check(now, changed, left)
            except RuntimeError as error:  # the store went with the launcher of rank 0's machine (DistError)
                if self._stop.is_set():
                    return
                self._store_gone = True  # nothing to tell it when this process leaves
                verdict = {"rank": None, "text": f"the launcher of rank 0's machine is gone (it held the store at "
                                              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
                                              f"which stopped answering: {type(error).__name__})"}
            if verdict and not self._stop.is_set():
                self._conclude(verdict)
                return

    def _check(self, now: float, changed: dict, left: dict) -> dict | None:
        self.store.add(f"beat/{self.rank}", 1)
        if self.store.check(["verdict"]):
            return json.loads(self.store.get("verdict"))
        failed = self.failed_collective.is_set()
        beats_watched = self.others if failed else self.beats_watched  # after a failure: is every process alive?
        moved = True
        for rank in dict.fromkeys(self.neighbours + beats_watched):
            if self.store.check([f"left/{rank}"]):
                since = left.setdefault(rank, now)
                if failed or now - since >= self.silence:
                    return self._publish(rank, "ended with an error of its own (see its message), and the others "
                                               "cannot go on without it")
                continue
            info = self._info(rank)
            if info and info["machine"] == self.machine and not pid_alive(info["pid"]):
                return self._publish(rank, "died: its process is gone (killed by the OOM killer or a signal?)")
            if rank in beats_watched:
                count = self.store.add(f"beat/{rank}", 0)
                seen = changed.get(rank)
                if seen is None or seen[0] != count:
                    changed[rank] = (count, now)
                elif now - seen[1] >= self.silence:
                    return self._publish(rank, f"gave no sign of life for {self.silence:g} s (dead_rank_timeout "
                                               f"{self.timeout:g}): its machine froze, died or lost the network")
                if failed:
                    moved &= count > self._beats_at_failure.setdefault(rank, count)
        if failed and moved:  # the failure was not a death: it is the error to show
            self.all_alive.set()
        return None

    def _info(self, rank: int) -> dict | None:
        if rank not in self.peers and self.store.check([f"process/{rank}"]):
            self.peers[rank] = json.loads(self.store.get(f"process/{rank}"))
        return self.peers.get(rank)

    def _publish(self, rank: int, what: str) -> dict:
        """The first death found is the one every process reports."""
        info = self._info(rank)
        where = f" (pid {info['pid']} on {info['host']})" if info else ""
        verdict = json.dumps({"rank": rank, "text": f"rank {rank}{where} {what}"})
        return json.loads(self.store.compare_set("verdict", "", verdict))

    def _conclude(self, verdict: dict) -> None:
        resume = resume_hint(self.output_dir, "no checkpoint was saved yet (save_strategy: steps keeps them)")
        line = f"error: {verdict['text']}; the run stops. {resume}"
        dead = verdict["rank"]  # None: no process is known dead, the store is
        # one line per machine: from its first process, or its second when the first is the dead one
        first_here = self.rank - self.local_rank
        if self.local_rank == (1 if dead is not None and dead == first_here and dead in self.neighbours else 0):
            print(line, file=sys.stderr, flush=True)
        self.on_verdict(line)

    # -- the main thread ----------------------------------------------------------------------------------------

    def _excepthook(self, kind, error, traceback) -> None:
        if self.thread.is_alive() and is_communication_error(error):
            # this process ends now, with this error or the watcher's verdict: a launcher's SIGTERM adds nothing
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
            self.failed_collective.set()
            deadline = time.monotonic() + self.timeout + self.interval
            while self.thread.is_alive() and not self.all_alive.is_set() and time.monotonic() < deadline:
                self.all_alive.wait(0.1)  # a verdict ends the process from the watching thread
        self._previous_hook(kind, error, traceback)


def leave_process_group(accelerator) -> None:
    """Every process leaves the process group together, at the end of a run or at a SIGTERM's checkpoint.

    gloo's worker threads free a finished collective's tensors a moment after it completes, and need the GIL for it;
    torch destroys the group (when its last reference goes: DDP's, as the run's objects are freed) holding the GIL and
    waiting for those threads. A process that got there first hung at exit, now and then, on a loaded machine; a
    moment without the GIL lets them finish."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(1)
    accelerator.end_training()


def apply_ddp_timeout(args) -> None:
    """transformers hands `ddp_timeout` to the process group on GPUs only: a CPU (gloo) run kept torch's 30 minutes
    whatever it asked for. The default group gets it here (once the arguments have set the group up)."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if args.world_size > 1 and dist.is_initialized() and args.device.type == "cpu" and set_timeout is not None:
        set_timeout(timedelta(seconds=args.ddp_timeout))


def watch_peers(args) -> PeerWatch | None:
    """Starts this process's heartbeat and watch in a multi-process run (started by torchrun: `accelerate launch`,
    `sft-hf launch`); None for one process, `dead_rank_timeout: 0`, or processes started without torchrun's store."""
    timeout = getattr(args, "dead_rank_timeout", 0) or 0
    if args.world_size <= 1 or timeout <= 0:
        return None
    store = run_store(timeout)  # a store that does not answer for that long is gone with rank 0's machine
    if store is None:
        logger.info("dead_rank_timeout: no MASTER_ADDR/MASTER_PORT store to beat into (not started by torchrun): a "
                    "dead process is noticed only at the process-group timeout (ddp_timeout)")
        return None
    return PeerWatch(store, args.process_index, args.world_size, args.local_process_index,
                     int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size)), timeout, args.output_dir).start()


# -------------------------------------------------------------------------------------------------------------------
# Long data preparation


@contextmanager
def main_process_first(args, desc: str = "work"):
    """`TrainingArguments.main_process_first` (the main process of each machine first, the others after it, reading
    what it cached) without the barrier and its timeout: the others poll a key in the launcher's store."""
    store = run_store() if args.world_size > 1 else None
    if store is None:
        with args.main_process_first(desc=desc):
            yield
        return
    key = f"ready/{desc}/{args.process_index - args.local_process_index}"
    if args.local_process_index == 0:
        try:
            yield
        except BaseException as error:
            store.set(key, "failed:" + next(c.__name__ for c in type(error).__mro__
                                            if c in (UserError, Preempted, KeyboardInterrupt, BaseException)))
            raise
        store.set(key, "done")
        return
    while not store.check([key]):
        time.sleep(0.5)
    outcome = store.get(key).decode()
    if outcome.startswith("failed:"):
        kind = {"UserError": UserError, "Preempted": Preempted, "KeyboardInterrupt": KeyboardInterrupt}.get(
            outcome.split(":", 1)[1], RuntimeError)
        raise kind(f"the main process of this machine failed to {desc} (its error says why)")
    yield
