"""The cache behind TorchRec sharding: the kernel and sharder (``sharder``), the plan (``planner``), and
checkpoints that reassemble over any number of ranks (``checkpoint``)."""
