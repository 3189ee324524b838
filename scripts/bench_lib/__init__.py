"""Support code of ``scripts/bench``: the procwatch benchmark.

A benchmark, not a test: nothing here passes or fails.  It measures how
soon a peer learns that a killed process is gone, for procwatch and for
what a user would otherwise pick, in one run on one machine, idle and under
an exit storm.  The machines are shared and noisy, so read ratios between
rows of the same run, not absolute times.

Modules:
    build      compiles the C helpers in ``csrc/`` (cached by source hash):
               cnlisten (bare listener), cnrelay (minimal relay), pwwait (C
               futex peer), observer (pidfd, /proc poller), forker (storm), target
    procs      child bookkeeping (nothing outlives a run), line protocol, storm
    latency    kill -> observer-sees-it harness and the baseline observers
    pwsuite    the procwatch measurements: its services, peers, capacity,
               peer-side cost, footprint, and the summary against the targets
    pwpeer     a Python peer in Peer.wait_exit() (a helper process)
    pycnlisten the bare connector listener in Python (a helper process)
    report     statistics, machine description, table / JSON / markdown
    cli        argument parsing and the run itself
"""
