"""fosctrain: adversarial training that measures and controls how well the inner maximization
converges (FOSC and Dynamic Adversarial Training, Wang et al., ICML 2019)."""

__version__ = "0.1.0"
