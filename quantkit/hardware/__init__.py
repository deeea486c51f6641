"""Hardware profiles: the schema of ``profiles/*.yaml``, loading them (``host`` is measured),
and the estimates the profiler adds for each target (fits, speed, compatibility)."""

from .loading import (
    HOST,
    ProfileError,
    host_profile,
    load_profile,
    load_profile_file,
    profile_files,
)
from .schema import HardwareProfile

__all__ = ["HOST", "HardwareProfile", "ProfileError", "host_profile", "load_profile", "load_profile_file", "profile_files"]
