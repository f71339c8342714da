"""`python -m fer_models.publish`: the command line of :mod:`fer_models.training.publish`."""
from .training.publish import main

if __name__ == "__main__":
    main()
