"""A patch for a known Sacred bug: output of a failing run after its last heartbeat is lost.

Sacred closes the captured-output file before its final heartbeat when the main
function raises, then skips reading it (IDSIA/sacred#392; the fix in PR #755 was
never merged). For us that is the part that matters: the failing site's last words.
The patched reader also takes the text Sacred stored when it closed the file.
"""

from __future__ import annotations

from sacred.run import Run

_original = Run._get_captured_output


def _get_captured_output_including_final(self) -> None:
    output = self._output_file
    if output.closed and getattr(output, "final", None) is not None:
        text = output.get()  # returns (and clears) what was left when the capture closed
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        text = (self.captured_out or "") + text
        self.captured_out = self.captured_out_filter(text) if self.captured_out_filter else text
        return
    _original(self)


def apply() -> None:
    Run._get_captured_output = _get_captured_output_including_final
