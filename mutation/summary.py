"""Counts of a cosmic-ray session (sampled mutants only) and the diff of each survivor.

usage: python mutation/summary.py SESSION.sqlite [--diffs]
"""
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome

with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    total = db.num_work_items
    done = [(item, result) for item, result in db.completed_work_items
            if result.worker_outcome != WorkerOutcome.SKIPPED]
    sampled = total - sum(1 for _, r in db.completed_work_items if r.worker_outcome == WorkerOutcome.SKIPPED)
    survived = [(i, r) for i, r in done if r.test_outcome == TestOutcome.SURVIVED]
    print(f"{total} mutants, {sampled} sampled, {len(done)} run, {len(done) - len(survived)} killed, "
          f"{len(survived)} survived")
    if "--diffs" in sys.argv:
        for item, result in survived:
            m = item.mutations[0]
            print(f"--- {m.operator_name} line {m.start_pos[0]}\n{result.diff}")
