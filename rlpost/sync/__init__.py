"""Weight sync from the trainer to the rollout engines: the bucketed, pipelined transport
over a collective (``transport``: gloo on CPU, NCCL on GPU). The Ray-side link that
drives it between actors is ``rlpost.workers.weight_sync_link`` (Ray stays in workers)."""
