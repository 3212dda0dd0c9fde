"""The store: the HDF5 run file, written during training and read everywhere else.

Nothing in this sub-package imports Keras. `schema` describes the layout,
`writer` appends to a file, `reader` reads one, `catalog` lists a folder of
runs, `files` opens files safely, `lock` keeps two writers off one file and
`check` finds damage.
"""
