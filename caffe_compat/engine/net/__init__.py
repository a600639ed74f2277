"""Net assembly: prototxt filtering, wiring and upgrades (``assemble``, ``upgrade``) and the
built ``NetModule`` (``module``)."""
