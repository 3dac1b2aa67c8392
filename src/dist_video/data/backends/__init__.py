"""Frame readers, one module per decoding backend; :mod:`dist_video.data.decoding` chooses one
by name. Each module's ``read(path, wanted, index, threads, size)`` returns the frames
``wanted`` (ascending, distinct frame indices) as uint8 ``H x W x 3`` RGB arrays of ``size``
(width, height), index -> frame; the optional ones have a ``load()`` that raises
:class:`~dist_video.data.frame_index.BackendUnavailableError` saying what to install."""
