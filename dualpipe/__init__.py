"""Pipeline parallelism: schedules as data, a simulator that prices them, and the runtime.

    schedule.py   pure: one_f_one_b / zb1p / dualpipe / dualpipev(rank, pp, n_micro) -> list[Action],
                  build_schedule(name, pp, n_micro), stage placement, format_schedule (text grid)
    simulate.py   pure: simulate(schedules, Costs(...)) runs every rank's list together, checks
                  dependencies, message order and deadlock, and returns the timeline, bubble, peak
                  activations and parameter copies per rank; to_chrome_trace for any timeline
    runtime.py    PipelineRuntime(stages, schedule, pp_group, rank_of_stage): executes the same action
                  lists on real ranks (batched P2P, B/W split, overlapped F&B), sums the gradients of
                  parameters held on two pp ranks; stage.py: how one chunk runs (pieces, B/W, overlap)

Neither schedule.py nor simulate.py imports torch: `moeforge plan` and the unit tests use them
without processes. See docs/dualpipe.md for the schedules, the bubble table and its definition,
docs/pipeline.md for the runtime.
"""
