"""The script `icsviz app` hands to Streamlit.

Streamlit runs its target as a script, not as a module of a package, so the
target must import the package absolutely (entry.py's relative imports would
fail there). The repository's app.py is the same lines.
"""

from icsviz.store.check import start_workers

# The processes that read run files start while the page's modules load (about half a
# second each, in parallel): a folder never seen before is read without waiting for them.
start_workers()

from icsviz.dashboard.entry import run_app  # noqa: E402

run_app()
