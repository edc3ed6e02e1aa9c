"""The one media question an adapter may ask: does a file carry an audio stream?"""

from __future__ import annotations

from pathlib import Path


def has_audio_stream(path: Path) -> bool:
    """False only when ``path`` opens as a media container (header only) and has no audio stream.

    A file that cannot be opened counts as having audio: it stays in the manifest and preprocessing
    reports it as a named failure, instead of the adapter dropping it silently.
    """
    import av  # imported here: adapters that never probe media do not need PyAV loaded

    try:
        with av.open(str(path)) as container:
            return len(container.streams.audio) > 0
    except (av.FFmpegError, OSError):
        return True
