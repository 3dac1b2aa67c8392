"""The plain paper form the tests compare against now lives in the package:
:mod:`dist_video.reference`. This module keeps the old import path."""

from dist_video.reference import dist_forward

__all__ = ["dist_forward"]
