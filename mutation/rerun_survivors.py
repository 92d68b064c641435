"""Re-run only a finished session's survivors against today's tests: copy the session, drop the
survivors' results (they become pending again; killed and skipped mutants keep theirs), and exec.

usage: python mutation/rerun_survivors.py SESSION.sqlite AFTER.sqlite
then:  cosmic-ray exec mutation/NAME.toml AFTER.sqlite && python mutation/summary.py AFTER.sqlite --diffs
"""
import shutil
import sqlite3
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome

before, after = sys.argv[1], sys.argv[2]
with use_db(before, WorkDB.Mode.open) as db:
    survivors = [item.job_id for item, result in db.completed_work_items
                 if result.test_outcome == TestOutcome.SURVIVED]
shutil.copyfile(before, after)
with sqlite3.connect(after) as con:
    con.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in survivors])
print(f"{len(survivors)} survivors pending again in {after}")
