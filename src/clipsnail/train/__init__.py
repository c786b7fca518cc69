"""The one training engine every task runs on (`engine.fit`: resume, checkpoints, EMA, logging; its parts in
data_order, checkpoints, metrics_log, signals and placement), the losses, and the optimiser with its schedule.
Above the models and inference, below the tasks."""
