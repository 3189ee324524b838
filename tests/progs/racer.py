"""A client that races others to register_pid(), round after round.

    racer.py --key K --barrier FILE --index I --racers N --rounds R --name NAME

The racers meet at a barrier before every call, so that their calls really
overlap: FILE holds one u64 per racer, mapped shared; racer I stores the
phase it reached in word I, then spins (no sleep, no system call) until
every word has reached it.  Spinning racers on different CPUs leave the
barrier within a microsecond of each other; a call takes hundreds.  On a
busy machine a spinning racer shares its CPU with everything else, and the
two would take turns instead of racing: so each racer is pinned to a CPU of
its own and, where allowed (root), runs at nice -20 for its short life
(a round costs about a millisecond).

Each round: barrier, ``register_pid(NAME)``, barrier, unregister if it won
(the second barrier keeps a winner from leaving before the others tried).
A "%d" in NAME is replaced by the round: a fresh name each round, so that
every round allocates a slot (the table's ended slots, oldest first).
stdout, one line a round: "ROUND WON|LOST SLOT T0 T1", T0 and T1 the
CLOCK_MONOTONIC ns around the call, so the test can tell that calls overlapped.
"""

import argparse
import mmap
import os
import sys
import time

import procwatch

SPIN_LIMIT = 10.0           # s at one barrier: a racer that never comes has died (stop spinning)


def barrier(words, index, phase):
    words[index] = phase
    deadline = time.monotonic() + SPIN_LIMIT
    spins = 0
    while min(words) < phase:
        spins += 1
        if spins % 100000 == 0 and time.monotonic() > deadline:
            sys.exit(f"racer {index}: the others never reached phase {phase}")


def contend(index):
    """Pin racer ``index`` to a CPU of its own, and raise its priority where allowed."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[index % len(cpus)]})
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except PermissionError:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--key", type=lambda s: int(s, 0), required=True)
    ap.add_argument("--barrier", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--racers", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    fd = os.open(args.barrier, os.O_RDWR)
    mm = mmap.mmap(fd, 8 * args.racers)
    words = memoryview(mm).cast("Q")
    contend(args.index)
    out = []
    for r in range(1, args.rounds + 1):
        barrier(words, args.index, 2 * r - 1)
        t0 = time.monotonic_ns()
        try:
            reg = procwatch.register_pid(args.name.replace("%d", str(r)), key=args.key)
        except procwatch.NameInUse:
            reg = None
        t1 = time.monotonic_ns()
        out.append(f"{r} {'WON' if reg else 'LOST'} {reg.slot if reg else -1} {t0} {t1}")
        barrier(words, args.index, 2 * r)
        if reg:
            reg.unregister()
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()
