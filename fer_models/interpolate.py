"""`python -m fer_models.interpolate`: the command line of :mod:`fer_models.training.interpolate`."""
from .training.interpolate import main

if __name__ == "__main__":
    main()
