"""Warnings a person reads once: attributed to the user's line (the one that
called the model, not a library's layer inside it), and, for what the batch
norms of a model see during a forward, one per kind for the whole call,
naming the first module and how many saw it. Repetition across calls is left
to Python's warning filters, as for native's warnings."""
from __future__ import annotations

import os
import sys
import threading
import warnings
from types import FrameType

import torch

__all__ = ["warn_at_caller", "warn_per_call"]

# Directories whose frames a warning skips to reach the user's line.
_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))
_MODULE_CALLS = {torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__}


def _is_internal(filename: str) -> bool:
    # "<...>": code that torch generated (FX); "torchinductor": inductor's compiled modules.
    return filename.startswith(_INTERNAL_DIRS) or filename.startswith("<") or "torchinductor" in filename


def _call_site() -> tuple[FrameType | None, FrameType]:
    """(the outermost module call's frame or None, the user's frame): the
    frame that called the outermost module, or else the first frame outside
    torch_safebn and torch, whether the module ran eagerly or inside compiled code."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    calls = [i for i, f in enumerate(frames) if f.f_code in _MODULE_CALLS]
    outermost = calls[-1] if calls else None
    callers = frames[outermost + 1:] if outermost is not None else frames
    user = next((f for f in callers if not _is_internal(f.f_code.co_filename)), frames[-1])
    return (frames[outermost] if outermost is not None else None), user


def _warn_at(message: str, frame: FrameType) -> None:
    # What warnings.warn(stacklevel=...) does for `frame`, which may lie below the caller's stack.
    module_globals = frame.f_globals
    warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=module_globals.get("__name__", "<string>"),
                           registry=module_globals.setdefault("__warningregistry__", {}),
                           module_globals=module_globals)


def warn_at_caller(message: str) -> None:
    """Warns now, at the user's line."""
    _warn_at(message, _call_site()[1])


class _Call:
    """The warnings of one model call on this thread, by kind: [the first
    module's message, how many modules gave one, the user's frame]."""

    def __init__(self, frame: FrameType):
        self.frame = frame
        self.kinds: dict[str, list] = {}


_calls = threading.local()


def warn_per_call(kind: str, message: str) -> None:
    """Warns of `kind` once for the model call this forward belongs to, when
    that call returns (normally or by an exception): the first module's
    message, and how many modules of the call gave one. Outside a module
    call, or while a profiler holds the thread's profile hook (the way the
    call's end is seen), it warns at once."""
    outermost, user = _call_site()
    if outermost is None or sys.getprofile() not in (None, _on_profile_event):
        _warn_at(message, user)
        return
    call = getattr(_calls, "current", None)
    if call is None or call.frame is not outermost:
        if call is not None:  # its end went unseen (the hook was replaced): give its warnings now
            _give(call)
        call = _calls.current = _Call(outermost)
        sys.setprofile(_on_profile_event)
    entry = call.kinds.setdefault(kind, [message, 0, user])
    entry[1] += 1


def _on_profile_event(frame: FrameType, event: str, arg) -> None:
    call = getattr(_calls, "current", None)
    if call is None:
        sys.setprofile(None)
    elif event == "return" and frame is call.frame:
        sys.setprofile(None)
        _give(call)


def _give(call: _Call) -> None:
    _calls.current = None
    for message, count, user in call.kinds.values():
        if count > 1:
            message += f" ({count} batch norms of the model saw it in this call; this is the first.)"
        _warn_at(message, user)
