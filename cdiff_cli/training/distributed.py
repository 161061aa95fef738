"""Several processes under `accelerate launch`: each draws its own data, gradients are all-reduced directly
(no wrapper around the UNet), and only the main process reads or writes the checkpoint."""

from __future__ import annotations

import torch

from cdiff_cli.errors import CdiffError, reason
from cdiff_cli.progress import Progress
from cdiff_cli.training.checkpoint import Checkpointer


def distributed(accelerator) -> bool:
    return accelerator is not None and accelerator.num_processes > 1


def try_save(checkpointer: Checkpointer, state: dict, step: int, steps: int, progress: Progress) -> bool:
    """Save a checkpoint; a failure (a full disk) is a warning, not the end of the run: the training
    itself is fine, and the previous checkpoint is intact."""
    try:
        checkpointer.save(state, step, steps)
        return True
    except Exception as e:  # OSError, or torch.save's RuntimeError on a really full disk
        progress.warn(f"could not save the checkpoint at step {step}: {reason(e)}; training goes on")
        return False


def save_on_main(checkpointer, state, step: int, steps: int, progress: Progress, rank: int, processes: int) -> bool:
    """The main process writes the checkpoint; every process learns whether it was saved."""
    saved = try_save(checkpointer, state, step, steps, progress) if rank == 0 else False
    if processes > 1:
        from accelerate.utils import broadcast_object_list

        saved = broadcast_object_list([saved])[0]
    return saved


def load_everywhere(checkpointer: Checkpointer, rank: int, processes: int) -> dict:
    """The checkpoint, read (and checked against this run) by the main process and sent to the others,
    so that only the process holding the training lock touches the checkpoint folder, and a refusal
    stops every process with the same message."""
    if processes == 1:
        return checkpointer.load()
    from accelerate.utils import broadcast_object_list

    box: list = [None, None]  # [state, error message (a Message: the CLI names its options as flags)]
    if rank == 0:
        try:
            box[0] = checkpointer.load()
        except CdiffError as e:
            box[1] = e.message
            broadcast_object_list(box)
            raise
    broadcast_object_list(box)
    if box[1] is not None:
        raise CdiffError(box[1])
    return box[0]


def gather_objects(obj, processes: int) -> list:
    """`obj` of every process, in process order (a one-item list with one process)."""
    if processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def all_reduce_mean(tensors: list[torch.Tensor], processes: int, extra: list[float] = ()) -> list[float]:
    """Average gradients over processes: one flat all-reduce, no DDP wrapper around the UNet. `extra`
    numbers ride along in the same all-reduce and come back summed over the processes."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([float(x) for x in extra], device=grads[0].device)])
    dist.all_reduce(flat)
    sums = flat[flat.numel() - len(extra):].tolist()
    flat /= processes
    offset = 0
    for p, g in zip(tensors, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return sums
