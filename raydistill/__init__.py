"""raydistill: distil large image-text models into small dual encoders with DSMD on Ray."""

__version__ = "0.1.0"
