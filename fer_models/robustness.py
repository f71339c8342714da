"""`python -m fer_models.robustness`: the command line of :mod:`fer_models.training.robustness`."""
from .training.robustness import main

if __name__ == "__main__":
    main()
