"""`remove_bytheway(pipe)`: undo this package's changes to a denoiser without their handles."""

from __future__ import annotations

from typing import List

from .controller import CONTROLLER_ATTR, split_target
from .fast import FAST_HANDLE_ATTR


def remove_bytheway(pipe_or_denoiser) -> List[str]:
    """Remove ByTheWay (`apply_bytheway`) and the fast temporal attention
    (`enable_fast_temporal_attention`) from the pipeline's denoiser, as their handles' `remove()`
    does, for when a handle was not kept (`btw.apply_bytheway(pipe)` in a notebook cell): without
    it the pipeline could not be given ByTheWay again, copied or pickled.

    Returns:
        What was removed: "bytheway", "fast temporal attention", both or neither ([]).

    Examples:
        >>> import bytheway_kernels as btw
        >>> from bytheway_kernels.integration.tiny import tiny_animatediff_pipeline
        >>> pipe = tiny_animatediff_pipeline()
        >>> _ = btw.apply_bytheway(pipe)  # the handle is lost
        >>> btw.remove_bytheway(pipe)
        ['bytheway']
        >>> btw.remove_bytheway(pipe)
        []
    """
    _, _, denoiser = split_target(pipe_or_denoiser)
    removed = []
    for attribute, name in ((CONTROLLER_ATTR, "bytheway"), (FAST_HANDLE_ATTR, "fast temporal attention")):
        handle = getattr(denoiser, attribute, None)
        if handle is not None:
            handle.remove()
            removed.append(name)
    return removed
