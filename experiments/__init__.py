"""absl experiment mains: flags → library calls → results.json + plots. Run as ``python -m experiments.<name>``."""
