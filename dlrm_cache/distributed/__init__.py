"""The cache behind TorchRec sharding: the kernel and sharder (``sharder``), the sharded model
(``runtime``), a run's plan (``placement``: the planner ``planner`` or the hybrid split ``hybrid_plan``,
over the frequency curves of ``table_stats`` and the cost model ``comm_model``), and checkpoints that
reassemble over any number of ranks (``checkpoint``)."""
