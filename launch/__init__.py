"""Running kinoe: the ``kinoe`` command, environment checks, and (as they land) launchers and the pipeline."""
