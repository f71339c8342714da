"""`python -m fer_models.train`: the command line of :mod:`fer_models.training.train`."""
from .training.train import main

if __name__ == "__main__":
    main()
