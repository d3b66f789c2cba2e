"""celluscan.training: ``celluscan train``.

Modules: ``config`` (dataclasses <- YAML, ``--set`` overrides), ``engine`` (the loop:
``Trainer``), ``checkpoint`` (atomic, resumable; safetensors + JSON), ``data_source`` (the
uint8 tensor cache as ``TrainData``), ``sampling`` (each epoch's order, a pure function of
seed and epoch), ``schedule``, ``ema``, ``mixup``, ``distributed`` (torchrun / DDP),
``device`` and ``cli``. Imported lazily: ``import celluscan.training`` loads nothing heavy.
"""
