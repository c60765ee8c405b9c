"""Running one job on several processes (GPUs) through ``torch.distributed``: see :mod:`.window_parallel`."""
