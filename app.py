"""icsviz explorer: `streamlit run app.py` (the runs in runs/ by default).

Another folder: `streamlit run app.py -- --runs DIR`, `ICSVIZ_RUNS=DIR`, or
`icsviz app --runs DIR`. The views live in icsviz.dashboard.
"""

from icsviz.store.check import start_workers

# The processes that read run files start while the page's modules load (about half a
# second each, in parallel): a folder never seen before is read without waiting for them.
start_workers()

from icsviz.dashboard.entry import run_app  # noqa: E402

run_app()
