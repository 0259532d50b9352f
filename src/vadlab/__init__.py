"""vadlab: visual anomaly detection methods, metrics and data in one small package."""

from vadlab.methods import available_methods, get_method

__version__ = "0.1.0"
__all__ = ["available_methods", "get_method", "__version__"]
