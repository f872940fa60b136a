"""Recovery benchmark: does the default policy bring a faulted run back to health, and what
does it cost?

Run by hand from the repository root (never from the tests or CI)::

    .venv/bin/python -m benchmarks.recovery [--only FAULT ...] [--modes none detect policy]
        [--seed N] [--json FILE]

Every fault of :mod:`.faults` (and a healthy run) trains the scenario benchmark's TinyLM
(43k parameters, AdamW 3e-3, warm-up and cosine, batch 8, ~25 ms a step) for 400 optimizer
steps, three ways (:mod:`.train`): ``none`` (no agent), ``detect`` (agent, collector with
``RUNWATCH_POLICY=off``) and ``policy`` (agent with a checkpoint every 50 steps and
``run.data``, collector with the default policy). Two collectors (``python -m runwatch server``
on fresh SQLite files, loopback ports, detectors checked every second, hang timeouts scaled
by 0.01 as in the scenario benchmark) serve the two agent modes.

Reported per run: the final validation loss on the held-out windows and its distance from the
healthy run without agent (target for the default policy: within 10 % for every fault that
spoils the run without runwatch, and no non-finite loss at the end); the commands the run
received; time to recovery (iterations and seconds from the onset until the mean train loss
of 10 iterations is within 10 % of the healthy run's at the same steps; 10 is the floor, a
fault without effect); the iterations a rollback made the run repeat, and their wall time.
"""
