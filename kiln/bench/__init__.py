"""`kiln bench`: measuring (measure.py), running the contenders (run.py, unet_step.py) and
reporting (report.py). Numbers, not verdicts: nothing here passes or fails."""
