"""The DSMD method in plain PyTorch: distillation losses, loss balancers, teacher-embedding queue, metrics.

``from raydistill.method import losses, balancers, metrics``; only :mod:`raydistill.method.distributed`
calls ``torch.distributed``.
"""

from raydistill.method import balancers, distributed, losses, metrics, queue

__all__ = ["balancers", "distributed", "losses", "metrics", "queue"]
