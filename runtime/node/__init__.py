"""``xray-edge serve``: a DICOM node beside the X-ray machine (extra ``[node]``). It receives
chest radiographs by C-STORE, classifies each through the same pipeline as ``xray-edge
classify``, and sends a structured report and a heatmap image back into the same study.

config      the command line's settings, checked          scp         the Storage SCP (pynetdicom)
spool       where instances and results are kept          ledger      what became of each (SQLite)
classifier  the classification worker                     sr, sc      the result objects (highdicom)
sender      C-STORE to the destinations, with retries     worklist    the worklist page and /healthz
service     starts, recovers and stops the node           command     the ``serve`` command line
bench       memory and throughput of a running node
"""
