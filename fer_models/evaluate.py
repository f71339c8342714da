"""`python -m fer_models.evaluate`: the command line of :mod:`fer_models.training.evaluate`."""
from .training.evaluate import main

if __name__ == "__main__":
    main()
