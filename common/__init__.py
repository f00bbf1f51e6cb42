"""What three or more stages share: typed configs, run directories and manifests, logs, progress."""
