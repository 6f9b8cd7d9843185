"""bigsid: data-free distillation of diffusion models into one-step generators (SiD, SiD-LSG, SIM, DMD)."""

__version__ = "0.1.0"
