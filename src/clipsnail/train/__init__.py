"""The one training engine every task runs on (`engine.fit`: resume, checkpoints, EMA, logging), the losses, and the
optimiser with its schedule. Above the models and inference, below the tasks."""
