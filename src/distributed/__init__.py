"""Running one job on several processes (GPUs) through ``torch.distributed``.

:mod:`.window_parallel` splits the DiT's windows across processes, :mod:`.clip_parallel` shares a clip's
batches between them, :mod:`.launch` starts the processes from the command line.  This file imports no torch,
so option lists can be read cheaply.
"""

PARALLEL_MODES = ("auto", "batches", "windows")
