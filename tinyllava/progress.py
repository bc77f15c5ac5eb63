"""Progress bars on stderr for the long steps: fetching weights, the feature cache, training, evaluation.

Shown on a terminal. In a log file (a run in the background, `... 2> run.log`) they are shown with
TINYLLAVA_PROGRESS=1, a line at most every 30 seconds; TINYLLAVA_PROGRESS=0 hides them everywhere.
"""
import os
import sys


def bar(total, desc, unit, show=True, **options):
    from tqdm import tqdm
    wanted = os.environ.get("TINYLLAVA_PROGRESS")
    disable = True if not show or wanted == "0" else False if wanted == "1" else None  # None: a terminal only
    logged = wanted == "1" and not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=not logged, disable=disable,
                mininterval=30 if logged else 0.1, **options)
