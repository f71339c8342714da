"""`python -m fer_models.interpolate_fusion`: the command line of :mod:`fer_models.training.interpolate_fusion`."""
from .training.interpolate_fusion import main

if __name__ == "__main__":
    main()
