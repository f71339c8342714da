"""`python -m fer_models.calibrate`: the command line of :mod:`fer_models.training.calibrate`."""
from .training.calibrate import main

if __name__ == "__main__":
    main()
