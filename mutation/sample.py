"""Keep a seeded random sample of N pending mutants in a cosmic-ray session; mark the rest skipped.

usage: python mutation/sample.py SESSION.sqlite N [SEED]
"""
import random
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

path, n = sys.argv[1], int(sys.argv[2])
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 15
with use_db(path, WorkDB.Mode.open) as db:
    # ordered by what each mutant does (job ids are random per init): the same seed gives the same
    # mutants on every init of an unchanged module
    items = sorted(db.pending_work_items,
                   key=lambda w: [(m.operator_name, m.occurrence, m.start_pos) for m in w.mutations])
    ids = [w.job_id for w in items]
    keep = set(random.Random(seed).sample(ids, min(n, len(ids))))
    db.set_multiple_results([i for i in ids if i not in keep],
                            WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
    print(f"{len(ids)} mutants, {len(keep)} sampled")
