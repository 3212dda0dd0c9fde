"""icsviz explorer: `streamlit run app.py` (the runs in runs/ by default).

Another folder: `streamlit run app.py -- --runs DIR`, `ICSVIZ_RUNS=DIR`, or
`icsviz app --runs DIR`. The views live in icsviz.dashboard.
"""

from icsviz.dashboard import run_script

run_script()
