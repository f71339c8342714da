"""`python -m fer_models.protocol`: the command line of :mod:`fer_models.training.protocol`."""
from .training.protocol import main

if __name__ == "__main__":
    main()
