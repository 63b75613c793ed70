"""Warnings a person reads once: attributed to the user's line (the one that
called the model, not a library's layer inside it), and, for what the batch
norms of a model report during a forward, one per kind for the whole call,
naming the first module and how many reported it. Repetition across calls
is left to Python's warning filters, as for native's warnings."""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _Line:
    """Where a warning is attributed: the user's line, taken when it happened."""

    filename: str
    lineno: int
    module_globals: dict

    @staticmethod
    def of(frame: FrameType) -> _Line:
        return _Line(frame.f_code.co_filename, frame.f_lineno, frame.f_globals)

    def warn(self, message: str) -> None:
        # What warnings.warn(stacklevel=...) does for a frame that may have moved on or returned.
        warnings.warn_explicit(message, RuntimeWarning, self.filename, self.lineno,
                               module=self.module_globals.get("__name__", "<string>"),
                               registry=self.module_globals.setdefault("__warningregistry__", {}),
                               module_globals=self.module_globals)


def _call_site() -> tuple[FrameType | None, _Line]:
    """(the outermost module call's frame or None, the user's line): the
    line that called the outermost module, or else the first frame outside
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
    return (frames[outermost] if outermost is not None else None), _Line.of(user)


def warn_at_caller(message: str) -> None:
    """Warns now, at the user's line."""
    _call_site()[1].warn(message)


@dataclasses.dataclass
class _Kind:
    message: str  # the first module's
    modules: set[int]  # the ids of the modules that reported it


class _Call:
    """The warnings of one model call on this thread. It holds the id of the
    outermost module call's frame, not the frame, which would keep the call's
    tensors alive should its end go unseen."""

    def __init__(self, frame: FrameType, line: _Line):
        self.frame_id = id(frame)
        self.line = line
        self.kinds: dict[str, _Kind] = {}


_calls = threading.local()


def warn_per_call(kind: str, message: str, module: int) -> None:
    """Warns of `kind` once for the model call this forward belongs to, when
    that call returns: the first module's message, and how many modules
    (`module`: the reporting one's id) reported it. Outside a module call, or
    while a profiler holds the thread's profile hook (the way the call's end
    is seen), it warns at once."""
    call = getattr(_calls, "current", None)
    if call is None or sys.getprofile() is not _on_profile_event:
        # A new call (the hook is ours while one is pending, and its frame is on this stack).
        outermost, line = _call_site()
        if outermost is None or sys.getprofile() not in (None, _on_profile_event):
            line.warn(message)
            return
        if call is not None:  # its end went unseen (the hook was replaced): give its warnings now
            _give(call, unwinding=False)
        call = _calls.current = _Call(outermost, line)
        sys.setprofile(_on_profile_event)
    call.kinds.setdefault(kind, _Kind(message, set())).modules.add(module)


def _on_profile_event(frame: FrameType, event: str, arg) -> None:
    call = getattr(_calls, "current", None)
    if call is None:
        sys.setprofile(None)
    elif event == "return" and id(frame) == call.frame_id:
        sys.setprofile(None)
        # A call that ends by an exception returns None; so, rarely, does a model.
        _give(call, unwinding=arg is None)


def _give(call: _Call, unwinding: bool) -> None:
    """Gives every kind's warning. Where the filters make one an error: raised
    after the others are given, unless the call is ending by an exception of
    its own, which it would replace."""
    _calls.current = None
    errors = []
    for kind in call.kinds.values():
        message = kind.message
        if len(kind.modules) > 1:
            message += f" ({len(kind.modules)} batch norms of the model reported it in this call; this is the first.)"
        try:
            call.line.warn(message)
        except Exception as error:  # noqa: BLE001 (a warning made an error by the filters)
            errors.append(error)
    if errors and not unwinding:
        raise errors[0]
