"""The script `icsviz app` hands to Streamlit.

Streamlit runs its target as a script, not as a module of a package, so the
target must import the package absolutely (entry.py's relative imports would
fail there). The repository's app.py is the same two lines.
"""

from icsviz.dashboard import run_script

run_script()
